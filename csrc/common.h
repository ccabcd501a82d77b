// Shared by every native kernel: dtype codes (must match tapestry.backends.cpu.DTYPE_CODES).
#pragma once
#include <cstdint>

namespace tapestry {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace tapestry
