// Host harness for csrc/cuda/select.cuh: runs the CUDA selection kernels' per-column code (keys,
// sorting network, rank windows) on the CPU, so that tests/test_kernels_cuda.py checks its logic
// against the reference where no GPU exists. Usage: cuda_select_host IN OUT n d f k
// IN: n*d float32 (row-major); OUT: 3*d float32 = trimmed_mean(f), coord_median, mean_around_median(k).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/select.cuh"

using namespace tapestry;

template <int NP>
static void columns(const std::vector<float>& X, int n, int d, int f, int k, std::vector<float>& out) {
    for (int c = 0; c < d; ++c) {
        uint32_t a[NP];
        for (int r = 0; r < NP; ++r) a[r] = r < n ? float_key(X[(size_t)r * d + c]) : kTopKey;
        sort_network<NP>(a);
        out[c] = window_mean<NP>(a, f, n - 2 * f);
        out[d + c] = window_mean<NP>(a, (n - 1) / 2, n % 2 ? 1 : 2);
        out[2 * d + c] = median_window_mean<NP>(a, n, k);
    }
}

int main(int argc, char** argv) {
    if (argc != 7) return 2;
    const int n = atoi(argv[3]), d = atoi(argv[4]), f = atoi(argv[5]), k = atoi(argv[6]);
    std::vector<float> X((size_t)n * d), out(3 * (size_t)d);
    FILE* in = fopen(argv[1], "rb");
    if (!in || fread(X.data(), 4, X.size(), in) != X.size()) return 3;
    fclose(in);
    if (n <= 1) columns<1>(X, n, d, f, k, out);
    else if (n <= 2) columns<2>(X, n, d, f, k, out);
    else if (n <= 4) columns<4>(X, n, d, f, k, out);
    else if (n <= 8) columns<8>(X, n, d, f, k, out);
    else if (n <= 16) columns<16>(X, n, d, f, k, out);
    else if (n <= 32) columns<32>(X, n, d, f, k, out);
    else if (n <= 64) columns<64>(X, n, d, f, k, out);
    else return 4;
    FILE* o = fopen(argv[2], "wb");
    if (!o || fwrite(out.data(), 4, out.size(), o) != out.size()) return 5;
    fclose(o);
    return 0;
}
