// tapestry._C bindings for the chacha kernels: argument unpacking only.
// Pointers arrive as integers (tensor.data_ptr()); the Python wrapper checked sizes and ranges.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cpu/chacha.h"

namespace py = pybind11;

template <class T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void bind_chacha(py::module_& m) {
    m.def("chacha20_keystream",
          [](uintptr_t out, uintptr_t key, uintptr_t nonce, uint64_t offset, int64_t count) {
              py::gil_scoped_release release;
              tapestry::chacha20_keystream(ptr<uint32_t>(out), ptr<const uint32_t>(key), ptr<const uint32_t>(nonce),
                                           offset, count);
          },
          py::arg("out"), py::arg("key"), py::arg("nonce"), py::arg("offset"), py::arg("count"));
    m.def("chacha20_mask",
          [](uintptr_t out, uintptr_t in, int64_t count, uintptr_t keys, uintptr_t signs, int64_t nkeys,
             uintptr_t nonce, uint64_t offset) {
              py::gil_scoped_release release;
              tapestry::chacha20_mask(ptr<uint32_t>(out), ptr<const uint32_t>(in), count, ptr<const uint32_t>(keys),
                                      ptr<const int8_t>(signs), nkeys, ptr<const uint32_t>(nonce), offset);
          },
          py::arg("out"), py::arg("in"), py::arg("count"), py::arg("keys"), py::arg("signs"), py::arg("nkeys"),
          py::arg("nonce"), py::arg("offset"));
}
