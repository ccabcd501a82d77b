// How many threads a parallel region gets: one per `grain` bytes of work, at most the runtime's
// maximum. Small inputs get 1, and `if (T > 1)` then skips the parallel region entirely: waking a
// team costs microseconds on an idle machine and a whole scheduler slice on a busy one (a thread
// that is not running holds up the region's closing barrier), more than a single core needs for
// the input.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace tapestry {

inline int threads_for(int64_t bytes, int64_t grain) {
    const int64_t want = bytes / std::max<int64_t>(grain, 1);
    return static_cast<int>(std::clamp<int64_t>(want, 1, std::max(1, omp_get_max_threads())));
}

}  // namespace tapestry
