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
    m.def("dp_fwht", [](uintptr_t dst, uintptr_t src, int64_t n, uintptr_t signs, float scale) {
        py::gil_scoped_release release;
        tapestry::dp_fwht(ptr<float>(dst), ptr<const float>(src), n, signs ? ptr<const uint32_t>(signs) : nullptr,
                          scale);
    });
    m.def("dp_client_encode",
          [](uintptr_t out, uintptr_t work, uintptr_t x, int64_t d, int64_t D, double factor, uintptr_t signs,
             float rot_scale, double scale, uintptr_t round_key, uintptr_t round_nonce, int64_t bound2,
             int64_t max_tries, uint64_t noise_q8, bool skellam, uintptr_t noise_key, uint32_t purpose, int64_t chunk,
             int bits, uintptr_t mask_keys, uintptr_t mask_signs, int64_t nmask, uintptr_t mask_nonce) {
              py::gil_scoped_release release;
              return tapestry::dp_client_encode(
                  ptr<uint32_t>(out), ptr<float>(work), ptr<const float>(x), d, D, factor, ptr<const uint32_t>(signs),
                  rot_scale, scale, ptr<const uint32_t>(round_key), ptr<const uint32_t>(round_nonce), bound2, max_tries,
                  noise_q8, skellam, ptr<const uint32_t>(noise_key), purpose, chunk, bits,
                  ptr<const uint32_t>(mask_keys), ptr<const int8_t>(mask_signs), nmask, ptr<const uint32_t>(mask_nonce));
          });
    m.def("dp_apply_signs", [](uintptr_t x, int64_t n, uintptr_t signs) {
        py::gil_scoped_release release;
        tapestry::dp_apply_signs(ptr<float>(x), n, ptr<const uint32_t>(signs));
    });
}
