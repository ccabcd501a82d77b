// tapestry._C bindings for the quant kernels: argument unpacking only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;

#include "cpu/kernels.h"

template <typename T>
static std::vector<const T*> ptrs(const std::vector<uintptr_t>& v) {
    std::vector<const T*> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = reinterpret_cast<const T*>(v[i]);
    return out;
}

void bind_quant(py::module_& m) {
    m.def(
        "quantize_int8",
        [](uintptr_t x, int dtype, int64_t n, int64_t block, bool stochastic, uint32_t k0, uint32_t k1, uintptr_t q,
           uintptr_t scales) {
            py::gil_scoped_release nogil;
            tapestry::quantize_int8(reinterpret_cast<const void*>(x), dtype, n, block, stochastic, k0, k1,
                                    reinterpret_cast<int8_t*>(q), reinterpret_cast<float*>(scales));
        },
        "quantize_int8(x_ptr, dtype, m, block, stochastic, k0, k1, q_ptr, scales_ptr)");
    m.def(
        "quantize_int4",
        [](uintptr_t x, int dtype, int64_t n, int64_t block, bool stochastic, uint32_t k0, uint32_t k1,
           uintptr_t packed, uintptr_t scales) {
            py::gil_scoped_release nogil;
            tapestry::quantize_int4(reinterpret_cast<const void*>(x), dtype, n, block, stochastic, k0, k1,
                                    reinterpret_cast<uint8_t*>(packed), reinterpret_cast<float*>(scales));
        },
        "quantize_int4(x_ptr, dtype, m, block, stochastic, k0, k1, packed_ptr, scales_ptr)");
    m.def(
        "dequantize_int8",
        [](const std::vector<uintptr_t>& q, const std::vector<uintptr_t>& scales, int64_t m, int64_t block,
           const std::vector<uintptr_t>& out) {
            auto qp = ptrs<int8_t>(q);
            auto sp = ptrs<float>(scales);
            std::vector<float*> op(out.size());
            for (size_t i = 0; i < out.size(); ++i) op[i] = reinterpret_cast<float*>(out[i]);
            py::gil_scoped_release nogil;
            tapestry::dequantize_int8(qp.data(), sp.data(), int64_t(qp.size()), m, block,
                                      op.data());
        },
        "dequantize_int8([q_ptr]*n, [scales_ptr]*n, m, block, [out_ptr]*n)");
    m.def(
        "dequantize_int4",
        [](const std::vector<uintptr_t>& q, const std::vector<uintptr_t>& scales, int64_t m, int64_t block,
           const std::vector<uintptr_t>& out) {
            auto qp = ptrs<uint8_t>(q);
            auto sp = ptrs<float>(scales);
            std::vector<float*> op(out.size());
            for (size_t i = 0; i < out.size(); ++i) op[i] = reinterpret_cast<float*>(out[i]);
            py::gil_scoped_release nogil;
            tapestry::dequantize_int4(qp.data(), sp.data(), int64_t(qp.size()), m, block,
                                      op.data());
        },
        "dequantize_int4([packed_ptr]*n, [scales_ptr]*n, m, block, [out_ptr]*n)");
}
