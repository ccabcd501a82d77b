// tapestry._cuda bindings for the quant kernels: argument unpacking only.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_device.h"

namespace py = pybind11;

namespace tapestry {
cudaError_t quantize_int8_cuda(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0,
                               uint32_t k1, int8_t* q, float* scales, cudaStream_t stream);
cudaError_t quantize_int4_cuda(const void* x, int dtype, int64_t m, int64_t block, bool stochastic, uint32_t k0,
                               uint32_t k1, uint8_t* packed, float* scales, cudaStream_t stream);
cudaError_t dequantize_int8_cuda(const int8_t* const* q, const float* const* scales, int64_t n, int64_t m,
                                 int64_t block, float* const* out, cudaStream_t stream);
cudaError_t dequantize_int4_cuda(const uint8_t* const* packed, const float* const* scales, int64_t n, int64_t m,
                                 int64_t block, float* const* out, cudaStream_t stream);
}  // namespace tapestry

static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
static std::vector<T> ptrs(const std::vector<uintptr_t>& v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = reinterpret_cast<T>(v[i]);
    return out;
}

void bind_cuda_quant(py::module_& m) {
    m.def("quantize_int8", [](uintptr_t x, int dtype, int64_t n, int64_t block, bool stochastic, uint32_t k0,
                              uint32_t k1, uintptr_t q, uintptr_t scales, uintptr_t stream, int device) {
        cudaError_t err;
        {
            py::gil_scoped_release nogil;
            err = tapestry::on_device(device, [&] {
                return tapestry::quantize_int8_cuda(reinterpret_cast<const void*>(x), dtype, n, block, stochastic,
                                                    k0, k1, reinterpret_cast<int8_t*>(q),
                                                    reinterpret_cast<float*>(scales),
                                                    reinterpret_cast<cudaStream_t>(stream));
            });
        }
        check(err, "quantize_int8");
    });
    m.def("quantize_int4", [](uintptr_t x, int dtype, int64_t n, int64_t block, bool stochastic, uint32_t k0,
                              uint32_t k1, uintptr_t packed, uintptr_t scales, uintptr_t stream, int device) {
        cudaError_t err;
        {
            py::gil_scoped_release nogil;
            err = tapestry::on_device(device, [&] {
                return tapestry::quantize_int4_cuda(reinterpret_cast<const void*>(x), dtype, n, block, stochastic,
                                                    k0, k1, reinterpret_cast<uint8_t*>(packed),
                                                    reinterpret_cast<float*>(scales),
                                                    reinterpret_cast<cudaStream_t>(stream));
            });
        }
        check(err, "quantize_int4");
    });
    m.def("dequantize_int8", [](const std::vector<uintptr_t>& q, const std::vector<uintptr_t>& scales, int64_t mm,
                                int64_t block, const std::vector<uintptr_t>& out, uintptr_t stream, int device) {
        auto qp = ptrs<const int8_t*>(q);
        auto sp = ptrs<const float*>(scales);
        auto op = ptrs<float*>(out);
        cudaError_t err;
        {
            py::gil_scoped_release nogil;
            err = tapestry::on_device(device, [&] {
                return tapestry::dequantize_int8_cuda(qp.data(), sp.data(), int64_t(qp.size()), mm, block, op.data(),
                                                      reinterpret_cast<cudaStream_t>(stream));
            });
        }
        check(err, "dequantize_int8");
    });
    m.def("dequantize_int4", [](const std::vector<uintptr_t>& q, const std::vector<uintptr_t>& scales, int64_t mm,
                                int64_t block, const std::vector<uintptr_t>& out, uintptr_t stream, int device) {
        auto qp = ptrs<const uint8_t*>(q);
        auto sp = ptrs<const float*>(scales);
        auto op = ptrs<float*>(out);
        cudaError_t err;
        {
            py::gil_scoped_release nogil;
            err = tapestry::on_device(device, [&] {
                return tapestry::dequantize_int4_cuda(qp.data(), sp.data(), int64_t(qp.size()), mm, block, op.data(),
                                                      reinterpret_cast<cudaStream_t>(stream));
            });
        }
        check(err, "dequantize_int4");
    });
}
