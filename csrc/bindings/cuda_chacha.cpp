// tapestry._cuda bindings for the chacha kernels: argument unpacking only.
// Pointers and the stream arrive as integers; the Python wrapper checked sizes and ranges.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda/chacha.cuh"
#include "cuda_device.h"

namespace py = pybind11;

template <class T>
static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

void bind_cuda_chacha(py::module_& m) {
    m.def("chacha20_keystream",
          [](uintptr_t out, uintptr_t key, uintptr_t nonce, uint64_t offset, int64_t count, uintptr_t stream,
             int device) {
              cudaError_t err;
              {
                  py::gil_scoped_release release;
                  err = tapestry::on_device(device, [&] {
                      return tapestry::cuda::chacha20_keystream(ptr<uint32_t>(out), ptr<const uint32_t>(key),
                                                                ptr<const uint32_t>(nonce), offset, count,
                                                                reinterpret_cast<cudaStream_t>(stream));
                  });
              }
              check(err, "chacha20_keystream launch");
          },
          py::arg("out"), py::arg("key"), py::arg("nonce"), py::arg("offset"), py::arg("count"), py::arg("stream"),
          py::arg("device"));
    m.def("chacha20_mask",
          [](uintptr_t out, uintptr_t x, int64_t count, uintptr_t keys, uintptr_t signs, int64_t nkeys, uintptr_t nonce,
             uint64_t offset, uintptr_t stream, int device) {
              cudaError_t err;
              {
                  py::gil_scoped_release release;
                  err = tapestry::on_device(device, [&] {
                      return tapestry::cuda::chacha20_mask(ptr<uint32_t>(out), ptr<const uint32_t>(x), count,
                                                           ptr<const uint32_t>(keys), ptr<const int8_t>(signs),
                                                           nkeys, ptr<const uint32_t>(nonce), offset,
                                                           reinterpret_cast<cudaStream_t>(stream));
                  });
              }
              check(err, "chacha20_mask launch");
          },
          py::arg("out"), py::arg("x"), py::arg("count"), py::arg("keys"), py::arg("signs"), py::arg("nkeys"),
          py::arg("nonce"), py::arg("offset"), py::arg("stream"), py::arg("device"));
}
