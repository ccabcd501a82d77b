// tapestry._cuda: the CUDA kernels. Thin: each family binds its own functions in cuda_<family>.cpp.
// Linked against the static CUDA runtime, so it imports where no GPU driver exists;
// device_count() then reports the runtime's error instead of raising.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

namespace py = pybind11;

void bind_cuda_robust(py::module_& m);
void bind_cuda_quant(py::module_& m);
void bind_cuda_chacha(py::module_& m);

static py::tuple device_count() {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) return py::make_tuple(0, std::string(cudaGetErrorString(err)));
    return py::make_tuple(n, std::string());
}

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "Tapestry CUDA kernels (raw device pointers, launched on a given stream)";
    m.def("device_count", &device_count, "(count, error message or '') from the CUDA runtime");
    m.def("runtime_version", [] { int v = 0; cudaRuntimeGetVersion(&v); return v; });
    bind_cuda_robust(m);
    bind_cuda_quant(m);
    bind_cuda_chacha(m);
}
