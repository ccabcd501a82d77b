// tapestry._C bindings for the robust kernels: argument unpacking only. Pointers are data_ptr()s
// of tensors that tapestry.backends.cpu has checked (dtype, shape, unit stride along d).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace py = pybind11;

template <class T>
static T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

// n payload rows: their codes and scales pointers (scales 0 for float16/bfloat16 rows)
struct QuantArgs {
    std::vector<const void*> codes;
    std::vector<const float*> scales;
    QuantArgs(const std::vector<uintptr_t>& c, const std::vector<uintptr_t>& s) {
        if (c.size() != s.size()) throw std::invalid_argument("codes and scales lists differ in length");
        for (size_t i = 0; i < c.size(); ++i) {
            codes.push_back(ptr<const void>(c[i]));
            scales.push_back(ptr<const float>(s[i]));
        }
    }
    int64_t n() const { return static_cast<int64_t>(codes.size()); }
};

void bind_robust(py::module_& m) {
    using namespace tapestry;
    auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("weighted_mean",
          [](uintptr_t X, int64_t n, int64_t d, int64_t stride, int dtype, uintptr_t w, uintptr_t out) {
              weighted_mean(ptr<const void>(X), n, d, stride, dtype, ptr<const double>(w), ptr<float>(out));
          },
          nogil, "out[j] = sum_i w[i] X[i, j] over rows with w[i] != 0 (float64 accumulation)");
    m.def("trimmed_mean",
          [](uintptr_t X, int64_t n, int64_t d, int64_t stride, int dtype, int64_t f, uintptr_t out) {
              trimmed_mean(ptr<const void>(X), n, d, stride, dtype, f, ptr<float>(out));
          },
          nogil, "per column, mean of the values ranked f .. n-f-1");
    m.def("coord_median",
          [](uintptr_t X, int64_t n, int64_t d, int64_t stride, int dtype, uintptr_t out) {
              coord_median(ptr<const void>(X), n, d, stride, dtype, ptr<float>(out));
          },
          nogil, "per column median (mean of the two middle values for even n)");
    m.def("mean_around_median",
          [](uintptr_t X, int64_t n, int64_t d, int64_t stride, int dtype, uintptr_t rows, int64_t m, int64_t k,
             uintptr_t out) {
              mean_around_median(ptr<const void>(X), n, d, stride, dtype, ptr<const int64_t>(rows), m, k,
                                 ptr<float>(out));
          },
          nogil, "per column over the given rows, mean of the k values nearest their median");
    m.def("anchor_dots",
          [](uintptr_t X, int64_t n, int64_t d, int64_t stride, int dtype, uintptr_t z, uintptr_t out) {
              anchor_dots(ptr<const void>(X), n, d, stride, dtype, ptr<const float>(z), ptr<double>(out));
          },
          nogil, "out (n, 3) float64: per row, sum (x - z)^2, sum x z, sum x^2");
    m.def("gram",
          [](uintptr_t X, int64_t n, int64_t d, int64_t stride, int dtype, uintptr_t G) {
              gram(ptr<const void>(X), n, d, stride, dtype, ptr<double>(G));
          },
          nogil, "float64 Gram matrix of the rows after a per-column shift (first finite value)");
    using Ptrs = const std::vector<uintptr_t>&;
    m.def("weighted_mean_encoded",
          [](Ptrs codes, Ptrs scales, int codec, int64_t block, int64_t d, uintptr_t w, uintptr_t out) {
              QuantArgs q(codes, scales);
              py::gil_scoped_release nogil;
              weighted_mean_encoded(q.codes.data(), q.scales.data(), codec, block, q.n(), d, ptr<const double>(w),
                                      ptr<float>(out));
          },
          "weighted_mean of n payload rows ([codes_ptr]*n, [scales_ptr]*n, codec, block, d, w_ptr, out_ptr)");
    m.def("gram_encoded",
          [](Ptrs codes, Ptrs scales, int codec, int64_t block, int64_t d, uintptr_t G) {
              QuantArgs q(codes, scales);
              py::gil_scoped_release nogil;
              gram_encoded(q.codes.data(), q.scales.data(), codec, block, q.n(), d, ptr<double>(G));
          },
          "gram of n payload rows ([codes_ptr]*n, [scales_ptr]*n, codec, block, d, G_ptr)");
    m.def("trimmed_mean_encoded",
          [](Ptrs codes, Ptrs scales, int codec, int64_t block, int64_t d, int64_t f, uintptr_t out) {
              QuantArgs q(codes, scales);
              py::gil_scoped_release nogil;
              trimmed_mean_encoded(q.codes.data(), q.scales.data(), codec, block, q.n(), d, f, ptr<float>(out));
          },
          "trimmed_mean of n payload rows ([codes_ptr]*n, [scales_ptr]*n, codec, block, d, f, out_ptr)");
    m.def("coord_median_encoded",
          [](Ptrs codes, Ptrs scales, int codec, int64_t block, int64_t d, uintptr_t out) {
              QuantArgs q(codes, scales);
              py::gil_scoped_release nogil;
              coord_median_encoded(q.codes.data(), q.scales.data(), codec, block, q.n(), d, ptr<float>(out));
          },
          "coord_median of n payload rows ([codes_ptr]*n, [scales_ptr]*n, codec, block, d, out_ptr)");
    m.def("mean_around_median_encoded",
          [](Ptrs codes, Ptrs scales, int codec, int64_t block, int64_t d, uintptr_t rows, int64_t m, int64_t k,
             uintptr_t out) {
              QuantArgs q(codes, scales);
              py::gil_scoped_release nogil;
              mean_around_median_encoded(q.codes.data(), q.scales.data(), codec, block, q.n(), d,
                                           ptr<const int64_t>(rows), m, k, ptr<float>(out));
          },
          "mean_around_median over the given rows of n payload rows");
    m.def("set_isa",
          [](const std::string& name) {
              if (!simd::set_isa(name.c_str()))
                  throw std::invalid_argument("set_isa: '" + name + "' is not portable, avx2, avx512 or best");
              return std::string(simd::isa_name(simd::active()));
          },
          "cap the SIMD path of every kernel (portable, avx2, avx512; best lifts the cap); returns the path in use");
    m.def("isa", []() { return std::string(simd::isa_name(simd::active())); },
          "the SIMD path the kernels use now");
}
