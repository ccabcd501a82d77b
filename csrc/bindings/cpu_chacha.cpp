// tapestry._C bindings for the chacha kernels: argument unpacking only.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_chacha(py::module_& m) {
    (void)m;
}
