// tapestry._C: the CPU kernels. Thin: each family binds its own functions in cpu_<family>.cpp.
#include <pybind11/pybind11.h>
#include <omp.h>

namespace py = pybind11;

void bind_robust(py::module_& m);
void bind_quant(py::module_& m);
void bind_chacha(py::module_& m);
void bind_privacy(py::module_& m);

static py::dict cpu_features() {
    py::dict d;
    __builtin_cpu_init();
    d["avx2"] = bool(__builtin_cpu_supports("avx2"));
    d["fma"] = bool(__builtin_cpu_supports("fma"));
    d["avx512f"] = bool(__builtin_cpu_supports("avx512f"));
    d["avx512bw"] = bool(__builtin_cpu_supports("avx512bw"));
    d["omp_max_threads"] = omp_get_max_threads();
    return d;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "Tapestry CPU kernels (C++17, OpenMP, AVX2/AVX-512 with runtime dispatch)";
    m.def("cpu_features", &cpu_features, "CPU SIMD features seen at run time and OpenMP threads");
    m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });
    bind_robust(m);
    bind_quant(m);
    bind_chacha(m);
    bind_privacy(m);
}
