// Run-time SIMD dispatch and the element helpers shared by the robust-aggregation kernels.
//
// Each kernel body is an always-inline template written as plain loops over a tile of lanes; it is
// compiled three times, inside wrappers marked TAPESTRY_AVX512 / TAPESTRY_AVX2 / nothing, and GCC
// vectorises each copy for that ISA. The build needs no -march flag: the copy to run is chosen
// at run time from __builtin_cpu_supports. Lanes never mix (no -ffast-math, and -std=c++17 keeps
// fp-contract off outside gram.cpp), so every ISA computes bit-identical per-coordinate results.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common.h"

#define TAPESTRY_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,prefer-vector-width=512")))
#define TAPESTRY_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#define TAPESTRY_INLINE inline __attribute__((always_inline))

namespace tapestry {
namespace simd {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detected() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
        return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return kAvx2;
    return kPortable;
}

// The ISA cap set by tapestry._C.set_isa (tests force every path on one machine); -1: none.
inline int& isa_cap() {
    static int cap = -1;
    return cap;
}

inline Isa active() {
    static const Isa best = detected();
    int cap = isa_cap();
    return cap < 0 ? best : static_cast<Isa>(std::min<int>(cap, best));
}

inline const char* isa_name(Isa isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "portable"; }

// Cap every kernel family at the named path ("portable", "avx2", "avx512"; "best" lifts the cap);
// false for an unknown name. tapestry._C.set_isa, for tests of every path on one machine.
inline bool set_isa(const char* name) {
    for (int isa : {kPortable, kAvx2, kAvx512})
        if (std::strcmp(name, isa_name(static_cast<Isa>(isa))) == 0) return isa_cap() = isa, true;
    if (std::strcmp(name, "best") == 0) return isa_cap() = -1, true;
    return false;
}

// NAME PARAMS runs BODY ARGS compiled three times (AVX-512, AVX2, portable), the copy chosen by
// active(): BODY is a TAPESTRY_INLINE function of plain loops that GCC vectorises per wrapper.
#define TAPESTRY_ISA_DISPATCH(NAME, BODY, PARAMS, ARGS)                      \
    TAPESTRY_AVX512 void NAME##_avx512 PARAMS { BODY ARGS; }                 \
    TAPESTRY_AVX2 void NAME##_avx2 PARAMS { BODY ARGS; }                     \
    void NAME##_portable PARAMS { BODY ARGS; }                               \
    void NAME PARAMS {                                                       \
        switch (::tapestry::simd::active()) {                                \
            case ::tapestry::simd::kAvx512: return NAME##_avx512 ARGS;       \
            case ::tapestry::simd::kAvx2: return NAME##_avx2 ARGS;           \
            default: return NAME##_portable ARGS;                            \
        }                                                                    \
    }

// 64-byte aligned scratch, freed on scope exit.
template <class T>
struct Scratch {
    T* p = nullptr;
    explicit Scratch(size_t count) {
        size_t bytes = ((count * sizeof(T) + 63) / 64) * 64;
        p = static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64));
        if (!p) throw std::bad_alloc();
    }
    ~Scratch() { std::free(p); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

TAPESTRY_INLINE float f32_from_bits(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
TAPESTRY_INLINE uint32_t bits_from_f32(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

// IEEE binary16 -> binary32, exact, branch-free (vectorises): rebias the exponent; Inf/NaN get the
// full float exponent; subnormals are made normal with an implicit 2^-14 that is subtracted back.
TAPESTRY_INLINE float half_to_float(uint16_t h) {
    uint32_t em = h & 0x7fffu;
    uint32_t exp = em & 0x7c00u;
    uint32_t o = (em << 13) + ((127u - 15u) << 23);
    o = exp == 0x7c00u ? o + ((128u - 16u) << 23) : o;
    o = exp == 0 ? o + (1u << 23) : o;
    float f = f32_from_bits(o);
    f = exp == 0 ? f - 6.103515625e-05f : f;  // 2^-14
    return f32_from_bits(bits_from_f32(f) | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// v where keep, else +0.0, through the bits: GCC if-converts (and so vectorises) a select of bits
// but not a conditional floating-point add, which might trap.
TAPESTRY_INLINE double kept_or_zero(double v, bool keep) {
    uint64_t b;
    std::memcpy(&b, &v, 8);
    b &= -static_cast<uint64_t>(keep);
    std::memcpy(&v, &b, 8);
    return v;
}

TAPESTRY_INLINE float bf16_to_float(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// Total-order keys: signed integers ordered like -Inf < finite < +Inf < NaN (torch.sort's order).
// Negative floats get their magnitude bits flipped; every NaN becomes the largest key. -0 sorts
// just below +0 (equal values, so no sum or median changes). The map is its own inverse on
// non-NaN keys, and the NaN key maps back to a quiet NaN.
TAPESTRY_INLINE int32_t key32(uint32_t b) {
    int32_t s = static_cast<int32_t>(b);
    int32_t k = s ^ ((s >> 31) & 0x7fffffff);
    return (b & 0x7fffffffu) > 0x7f800000u ? 0x7fffffff : k;
}
TAPESTRY_INLINE uint32_t unkey32(int32_t k) { return static_cast<uint32_t>(k ^ ((k >> 31) & 0x7fffffff)); }

// The same on 16-bit floats; nan_above is 0x7f80 (bfloat16) or 0x7c00 (float16).
TAPESTRY_INLINE int16_t key16(uint16_t b, uint16_t nan_above) {
    int16_t s = static_cast<int16_t>(b);
    int16_t k = static_cast<int16_t>(s ^ ((s >> 15) & 0x7fff));
    return (b & 0x7fffu) > nan_above ? static_cast<int16_t>(0x7fff) : k;
}
TAPESTRY_INLINE uint16_t unkey16(int16_t k) { return static_cast<uint16_t>(k ^ ((k >> 15) & 0x7fff)); }

// Per dtype: how raw elements become keys, and keys become float64 values.
struct F32 {
    using Raw = uint32_t;
    using Key = int32_t;
    static TAPESTRY_INLINE Key key(Raw r) { return key32(r); }
    static TAPESTRY_INLINE double value(Key k) { return static_cast<double>(f32_from_bits(unkey32(k))); }
    static TAPESTRY_INLINE float to_float(Raw r) { return f32_from_bits(r); }
};
struct F16 {
    using Raw = uint16_t;
    using Key = int16_t;
    static TAPESTRY_INLINE Key key(Raw r) { return key16(r, 0x7c00); }
    static TAPESTRY_INLINE double value(Key k) { return static_cast<double>(half_to_float(unkey16(k))); }
    static TAPESTRY_INLINE float value_f(Key k) { return half_to_float(unkey16(k)); }
    static TAPESTRY_INLINE float to_float(Raw r) { return half_to_float(r); }
};
struct BF16 {
    using Raw = uint16_t;
    using Key = int16_t;
    static TAPESTRY_INLINE Key key(Raw r) { return key16(r, 0x7f80); }
    static TAPESTRY_INLINE double value(Key k) { return static_cast<double>(bf16_to_float(unkey16(k))); }
    static TAPESTRY_INLINE float value_f(Key k) { return bf16_to_float(unkey16(k)); }
    static TAPESTRY_INLINE float to_float(Raw r) { return bf16_to_float(r); }
};

}  // namespace simd
}  // namespace tapestry
