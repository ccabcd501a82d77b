"""Input normalisation: every form docs/spec.md accepts, and clear errors for everything else."""

import numpy as np
import pytest
import torch

import tapestry as tp
from tapestry.updates import as_matrix


def test_stacked_contiguous_is_not_copied():
    X = torch.randn(5, 100)
    Y, spec = as_matrix(X)
    assert Y.data_ptr() == X.data_ptr()
    assert spec.form == "stacked" and spec.d == 100


def test_stacked_with_row_stride_is_not_copied():
    big = torch.randn(5, 130)
    X = big[:, 10:110]  # row stride 130, unit column stride
    Y, _ = as_matrix(X)
    assert Y.data_ptr() == X.data_ptr() and Y.stride() == (130, 1)


def test_non_contiguous_columns_work():
    X = torch.randn(100, 7).T  # column stride 7
    Y, _ = as_matrix(X)
    assert Y.stride(1) == 1 and torch.equal(Y, X)
    assert torch.allclose(tp.mean(X), X.double().mean(0).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_dtypes_are_kept(dtype):
    X, _ = as_matrix(torch.randn(3, 8).to(dtype))
    assert X.dtype == dtype


def test_float64_is_rounded_to_float32():
    X, _ = as_matrix(torch.randn(3, 8, dtype=torch.float64))
    assert X.dtype == torch.float32


def test_list_of_vectors_and_numpy_round_trip():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(10).astype(np.float32) for _ in range(4)]
    out = tp.mean(arrays)
    assert isinstance(out, np.ndarray) and out.shape == (10,)
    np.testing.assert_allclose(out, np.mean(arrays, axis=0), rtol=1e-6, atol=1e-7)
    tensors = [torch.from_numpy(a) for a in arrays]
    assert isinstance(tp.mean(tensors), torch.Tensor)


def test_state_dicts_round_trip_names_shapes_dtypes():
    sds = [{"w": torch.randn(3, 4), "b": torch.randn(4), "h": torch.randn(2).half()} for _ in range(5)]
    out = tp.median(sds)
    assert list(out) == ["w", "b", "h"]
    assert out["w"].shape == (3, 4) and out["h"].dtype == torch.float16 and out["w"].dtype == torch.float32
    expect = torch.stack([sd["w"] for sd in sds]).double().median(0).values.float()
    assert torch.allclose(out["w"], expect)


def test_flower_lists_of_arrays_round_trip():
    clients = [[np.full((2, 3), i, np.float32), np.full(5, -i, np.float32)] for i in range(5)]
    out = tp.trimmed_mean(clients, f=1)
    assert isinstance(out, list) and [o.shape for o in out] == [(2, 3), (5,)]
    assert isinstance(out[0], np.ndarray)
    np.testing.assert_array_equal(out[0], np.full((2, 3), 2.0, np.float32))
    np.testing.assert_array_equal(out[1], np.full(5, -2.0, np.float32))


def test_inputs_are_never_modified():
    X = torch.randn(9, 50)
    X[2, 3] = float("nan")
    before = X.clone()
    for rule in [tp.Mean(), tp.TrimmedMean(f=2), tp.Median(), tp.Krum(f=2), tp.MultiKrum(f=2, m=3), tp.Bulyan(f=1),
                 tp.NNM(2, tp.Median()), tp.GeometricMedian(), tp.CenteredClipping(tau=1.0)]:
        out = rule(X)
        out.add_(1.0)  # the result never aliases the input
        assert torch.equal(X.nan_to_num(7.0), before.nan_to_num(7.0)), type(rule).__name__


@pytest.mark.parametrize(
    "updates, error, match",
    [
        ([], ValueError, "empty"),
        (torch.empty(0, 5), ValueError, "n = 0"),
        (torch.randn(5), ValueError, "2-D"),
        ("abc", TypeError, "stacked tensor or a list"),
        ({"a": torch.randn(3)}, TypeError, "stacked tensor or a list"),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, "not a floating type"),
        (torch.ones(3, 4, dtype=torch.complex64), TypeError, "not a floating type"),
        ([np.ones(3, np.int32), np.ones(3, np.int32)], TypeError, "client 0.*not a floating type"),
        ([torch.randn(3), torch.randn(4)], ValueError, "client 1: 4 values, client 0 has 3"),
        ([torch.randn(3), torch.randn(3, 1)], ValueError, "client 1.*1-D"),
        ([torch.randn(3), [1.0, 2.0]], TypeError, "client 1"),
    ],
)
def test_bad_inputs(updates, error, match):
    with pytest.raises(error, match=match):
        tp.mean(updates)


def test_state_dict_mismatches_name_client_and_key():
    good = {"w": torch.randn(2, 2), "b": torch.randn(2)}
    with pytest.raises(ValueError, match=r"client 2, key 'w': shape \(2, 3\), client 0 has \(2, 2\)"):
        tp.mean([good, good, {"w": torch.randn(2, 3), "b": torch.randn(2)}])
    with pytest.raises(ValueError, match=r"client 1, key 'b': dtype torch.float16"):
        tp.mean([good, {"w": torch.randn(2, 2), "b": torch.randn(2).half()}])
    with pytest.raises(ValueError, match=r"client 1: key 'x' where client 0 has 'b'"):
        tp.mean([good, {"w": torch.randn(2, 2), "x": torch.randn(2)}])
    with pytest.raises(ValueError, match=r"client 1: 1 entries, client 0 has 2; missing \['b'\]"):
        tp.mean([good, {"w": torch.randn(2, 2)}])
    with pytest.raises(TypeError, match=r"client 1, key 'n'.*int64"):
        tp.mean([{"n": torch.ones(1)}, {"n": torch.ones(1, dtype=torch.int64)}])
    with pytest.raises(TypeError, match="client 1: expected a state_dict"):
        tp.mean([good, [torch.randn(2, 2), torch.randn(2)]])


def test_mixed_devices_name_both_devices():
    # the meta device stands in for a second device on machines without a GPU
    with pytest.raises(ValueError, match=r"client 0 on cpu, client 1 on meta"):
        tp.mean([torch.randn(3), torch.empty(3, device="meta")])
    with pytest.raises(ValueError, match=r"client 1, key 'w': on meta, client 0 is on cpu"):
        tp.mean([{"w": torch.randn(3)}, {"w": torch.empty(3, device="meta")}])
