// tapestry._C bindings for the differential-privacy kernels: argument unpacking only.
// Pointers arrive as integers (tensor.data_ptr()); python/tapestry/privacy/ checked every argument.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/privacy.h"

namespace py = pybind11;

template <class T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void bind_privacy(py::module_& m) {
    m.def("dp_discrete_gaussian",
          [](uintptr_t out, int64_t count, uint64_t sigma2_q8, uintptr_t key, uint32_t purpose, int64_t chunk) {
              py::gil_scoped_release release;
              return tapestry::dp_discrete_gaussian(ptr<int64_t>(out), count, sigma2_q8, ptr<const uint32_t>(key),
                                                    purpose, chunk);
          });
    m.def("dp_skellam", [](uintptr_t out, int64_t count, uint64_t mu_q8, uintptr_t key, uint32_t purpose, int64_t chunk) {
        py::gil_scoped_release release;
        return tapestry::dp_skellam(ptr<int64_t>(out), count, mu_q8, ptr<const uint32_t>(key), purpose, chunk);
    });
    m.def("dp_fwht", [](uintptr_t x, int64_t n, uintptr_t signs, float scale) {
        py::gil_scoped_release release;
        tapestry::dp_fwht(ptr<float>(x), n, signs ? ptr<const uint32_t>(signs) : nullptr, scale);
    });
    m.def("dp_apply_signs", [](uintptr_t x, int64_t n, uintptr_t signs) {
        py::gil_scoped_release release;
        tapestry::dp_apply_signs(ptr<float>(x), n, ptr<const uint32_t>(signs));
    });
}
