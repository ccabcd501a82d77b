// tapestry._cuda bindings for the robust kernels: argument unpacking only. Pointers and the
// stream arrive as integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); the
// GIL is released around each launch; a launch error becomes a RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/robust.cuh"
#include "cuda_device.h"

namespace py = pybind11;
using tapestry::kMaxSelectRows;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t err, const char* op) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("tapestry._cuda.") + op + ": CUDA error " + cudaGetErrorName(err) + " (" +
                                 cudaGetErrorString(err) + ")");
}

}  // namespace

void bind_cuda_robust(py::module_& m) {
    m.attr("MAX_SELECT_ROWS") = kMaxSelectRows;
    m.def(
        "weighted_mean",
        [](uintptr_t X, int dtype, int64_t d, int64_t stride, uintptr_t rows, uintptr_t weights, int64_t n_rows,
           uintptr_t out, uintptr_t stream, int device) {
            cudaError_t err;
            {
                py::gil_scoped_release nogil;
                err = tapestry::on_device(device, [&] {
                    return tapestry::weighted_mean(ptr<const void>(X), dtype, d, stride, ptr<const int64_t>(rows),
                                                   ptr<const double>(weights), n_rows, ptr<float>(out),
                                                   stream_of(stream));
                });
            }
            check(err, "weighted_mean");
        },
        py::arg("X"), py::arg("dtype"), py::arg("d"), py::arg("stride"), py::arg("rows"), py::arg("weights"),
        py::arg("m"), py::arg("out"), py::arg("stream"), py::arg("device"),
        "out[j] = sum_t weights[t] * X[rows[t], j] (float64 accumulation); device pointers as ints");
    m.def(
        "trimmed_mean",
        [](uintptr_t X, int dtype, int64_t n, int64_t d, int64_t stride, int64_t f, uintptr_t out, uintptr_t stream, int device) {
            cudaError_t err;
            {
                py::gil_scoped_release nogil;
                err = tapestry::on_device(device, [&] {
                    return tapestry::trimmed_mean(ptr<const void>(X), dtype, n, d, stride, f, ptr<float>(out),
                                                  stream_of(stream));
                });
            }
            check(err, "trimmed_mean");
        },
        py::arg("X"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("stride"), py::arg("f"), py::arg("out"),
        py::arg("stream"), py::arg("device"), "per column, the mean of the values ranked f .. n-f-1");
    m.def(
        "coord_median",
        [](uintptr_t X, int dtype, int64_t n, int64_t d, int64_t stride, uintptr_t out, uintptr_t stream, int device) {
            cudaError_t err;
            {
                py::gil_scoped_release nogil;
                err = tapestry::on_device(device, [&] {
                    return tapestry::coord_median(ptr<const void>(X), dtype, n, d, stride, ptr<float>(out),
                                                  stream_of(stream));
                });
            }
            check(err, "coord_median");
        },
        py::arg("X"), py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("stride"), py::arg("out"),
        py::arg("stream"), py::arg("device"), "per column median (mean of the two middle values for even n)");
    m.def(
        "mean_around_median",
        [](uintptr_t X, int dtype, int64_t d, int64_t stride, uintptr_t rows, int64_t n_rows, int64_t k, uintptr_t out,
           uintptr_t stream, int device) {
            cudaError_t err;
            {
                py::gil_scoped_release nogil;
                err = tapestry::on_device(device, [&] {
                    return tapestry::mean_around_median(ptr<const void>(X), dtype, d, stride,
                                                        ptr<const int64_t>(rows), n_rows, k, ptr<float>(out),
                                                        stream_of(stream));
                });
            }
            check(err, "mean_around_median");
        },
        py::arg("X"), py::arg("dtype"), py::arg("d"), py::arg("stride"), py::arg("rows"), py::arg("m"), py::arg("k"),
        py::arg("out"), py::arg("stream"), py::arg("device"), "per column over rows, the mean of the k values closest to their median");
}
