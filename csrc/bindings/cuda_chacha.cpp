// tapestry._cuda bindings for the chacha kernels: argument unpacking only.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_cuda_chacha(py::module_& m) {
    (void)m;
}
