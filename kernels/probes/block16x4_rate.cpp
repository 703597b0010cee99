// What a 16×4 block pattern (16 output channels × 4 input channels per non-zero block) would give an INT8
// sparse linear on this CPU: a whole call, float32 x in and float32 y out, as the SparseLinear node does.
// The 1×4 kernel (kernels/src) keeps input rows in the vector lanes and so needs packed activations and
// 16×16 transposes on the way out; here the lanes hold output channels, as in a dense INT8 GEMM: each
// block's 64 weight bytes are the vector and each input row's 4 activation codes are broadcast. The
// result is checked against exact integer sums before anything is timed.
//
//   g++ -O2 -std=c++17 -mavx512f -mavx512bw -mavx512vnni -pthread kernels/probes/block16x4_rate.cpp -o /tmp/b16x4
//   /tmp/b16x4 K M N SPARSITY [THREADS=2] [CALLS=200]
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

namespace {

constexpr int kRowTile = 8;  // input rows per task: 8 accumulators, each 16 output channels

// Output blocks of 16 channels in CSR order; block b's 64 codes hold channel r's 4 codes in lane r.
struct Blocks16x4 {
    int in_features = 0, out_features = 0;
    std::vector<std::int32_t> block_ptr, block_col;
    std::vector<std::int8_t> codes;
    std::vector<std::int32_t> row_sums;  // per output channel, for the activation zero point
    std::vector<float> scale, bias;
};

Blocks16x4 random_weights(int in_features, int out_features, double sparsity, std::mt19937& rng) {
    Blocks16x4 w;
    w.in_features = in_features;
    w.out_features = out_features;
    w.block_ptr.push_back(0);
    w.row_sums.assign(out_features, 0);
    std::uniform_real_distribution<double> keep(0.0, 1.0);
    std::uniform_int_distribution<int> code(-127, 127);
    for (int m0 = 0; m0 < out_features; m0 += 16) {
        for (int group = 0; group < in_features / 4; ++group) {
            if (keep(rng) < sparsity) continue;
            w.block_col.push_back(group);
            for (int lane = 0; lane < 64; ++lane) {
                const auto value = static_cast<std::int8_t>(code(rng));
                w.codes.push_back(value);
                w.row_sums[m0 + lane / 4] += value;
            }
        }
        w.block_ptr.push_back(static_cast<std::int32_t>(w.block_col.size()));
    }
    std::uniform_real_distribution<float> uniform(-0.01f, 0.01f);
    for (int m = 0; m < out_features; ++m) {
        w.scale.push_back(1e-4f + std::fabs(uniform(rng)));
        w.bias.push_back(uniform(rng));
    }
    return w;
}

// Rows [first, last) of x as uint8 codes, row-major: round half to even of x / scale, plus zero point.
void quantize_rows(const float* x, int cols, float scale, int zero_point, std::uint8_t* codes, int first,
                   int last) {
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    const __m512i zero = _mm512_set1_epi32(zero_point);
    for (int i = first; i < last; ++i) {
        for (int k = 0; k < cols; k += 16) {
            const __m512 steps = _mm512_mul_ps(_mm512_loadu_ps(x + static_cast<std::int64_t>(i) * cols + k), inverse);
            __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(steps), zero);
            q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(255));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + static_cast<std::int64_t>(i) * cols + k),
                             _mm512_cvtepi32_epi8(q));
        }
    }
}

// y rows [first, last): per tile of 8 input rows, every output block, its blocks' products, then
// y = (sum - zero point × row sum) × scale + bias stored straight into the rows of y.
void product_rows(const Blocks16x4& w, const std::uint8_t* codes, int zero_point, float* y, int first, int last) {
    const int k = w.in_features, m = w.out_features;
    for (int i0 = first; i0 < last; i0 += kRowTile) {
        const int rows = std::min(kRowTile, last - i0);
        for (int block = 0; block < m / 16; ++block) {
            __m512i acc[kRowTile];
#pragma GCC unroll 8
            for (int t = 0; t < kRowTile; ++t) acc[t] = _mm512_setzero_si512();
            for (int b = w.block_ptr[block]; b < w.block_ptr[block + 1]; ++b) {
                const __m512i weights = _mm512_loadu_si512(w.codes.data() + 64 * static_cast<std::int64_t>(b));
                const std::uint8_t* column = codes + static_cast<std::int64_t>(i0) * k + 4 * w.block_col[b];
#pragma GCC unroll 8
                for (int t = 0; t < kRowTile; ++t) {
                    std::int32_t quad;
                    std::memcpy(&quad, column + static_cast<std::int64_t>(t) * k, 4);
                    acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_set1_epi32(quad), weights);
                }
            }
            const int m0 = block * 16;
            const __m512i offset = _mm512_mullo_epi32(_mm512_loadu_si512(w.row_sums.data() + m0),
                                                      _mm512_set1_epi32(zero_point));
            const __m512 scale = _mm512_loadu_ps(w.scale.data() + m0), bias = _mm512_loadu_ps(w.bias.data() + m0);
#pragma GCC unroll 8
            for (int t = 0; t < kRowTile; ++t) {
                if (t >= rows) break;
                const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], offset));
                _mm512_storeu_ps(y + static_cast<std::int64_t>(i0 + t) * m + m0, _mm512_fmadd_ps(sum, scale, bias));
            }
        }
    }
}

// Threads that stay up between calls and spin while idle, so that a call's time holds no thread start
// (the host engine's pool does the same for the real kernels).
class SpinPool {
public:
    explicit SpinPool(int threads) {
        for (int part = 1; part < threads; ++part) {
            workers_.emplace_back([this, part] {
                int seen = 0;
                while (true) {
                    while (generation_.load(std::memory_order_acquire) == seen) {}
                    seen = generation_.load(std::memory_order_acquire);
                    if (stopping_.load()) return;
                    (*body_)(part);
                    done_.fetch_add(1, std::memory_order_release);
                }
            });
        }
    }
    ~SpinPool() {
        stopping_.store(true);
        generation_.fetch_add(1, std::memory_order_release);
        for (auto& worker : workers_) worker.join();
    }
    int size() const { return static_cast<int>(workers_.size()) + 1; }
    // body(part) for every part in [0, size()), part 0 on the calling thread.
    void run(const std::function<void(int)>& body) {
        body_ = &body;
        done_.store(0);
        generation_.fetch_add(1, std::memory_order_release);
        body(0);
        while (done_.load(std::memory_order_acquire) != size() - 1) {}
    }

private:
    std::vector<std::thread> workers_;
    std::atomic<int> generation_{0}, done_{0};
    std::atomic<bool> stopping_{false};
    const std::function<void(int)>* body_ = nullptr;
};

// The whole call, each thread taking a contiguous share of the input rows (a multiple of 8).
void sparse_linear(const Blocks16x4& w, const float* x, int n, float scale, int zero_point, std::uint8_t* codes,
                   float* y, SpinPool& pool) {
    const int tiles = (n + kRowTile - 1) / kRowTile, threads = pool.size();
    pool.run([&](int part) {
        const int first = std::min(n, tiles * part / threads * kRowTile);
        const int last = std::min(n, tiles * (part + 1) / threads * kRowTile);
        quantize_rows(x, w.in_features, scale, zero_point, codes, first, last);
        product_rows(w, codes, zero_point, y, first, last);
    });
}

// Largest |difference| from exact integer sums over every output.
double largest_error(const Blocks16x4& w, const std::uint8_t* codes, int n, int zero_point, const float* y) {
    double worst = 0.0;
    for (int i = 0; i < n; ++i) {
        for (int block = 0; block < w.out_features / 16; ++block) {
            for (int r = 0; r < 16; ++r) {
                std::int64_t sum = 0;
                for (int b = w.block_ptr[block]; b < w.block_ptr[block + 1]; ++b) {
                    for (int j = 0; j < 4; ++j) {
                        sum += static_cast<std::int64_t>(codes[static_cast<std::int64_t>(i) * w.in_features +
                                                               4 * w.block_col[b] + j]) *
                               w.codes[64 * static_cast<std::int64_t>(b) + 4 * r + j];
                    }
                }
                const int m = block * 16 + r;
                const double expected = static_cast<double>(sum - static_cast<std::int64_t>(zero_point) * w.row_sums[m]) *
                                            w.scale[m] + w.bias[m];
                worst = std::max(worst, std::fabs(expected - y[static_cast<std::int64_t>(i) * w.out_features + m]));
            }
        }
    }
    return worst;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s K M N SPARSITY [THREADS=2] [CALLS=200]\n", argv[0]);
        return 2;
    }
    const int k = std::atoi(argv[1]), m = std::atoi(argv[2]), n = std::atoi(argv[3]);
    const double sparsity = std::atof(argv[4]);
    const int threads = argc > 5 ? std::atoi(argv[5]) : 2, calls = argc > 6 ? std::atoi(argv[6]) : 200;
    if (k <= 0 || k % 16 != 0 || m <= 0 || m % 16 != 0 || n <= 0 || sparsity < 0.0 || sparsity > 1.0 ||
        threads <= 0 || calls <= 0) {
        std::fprintf(stderr, "K and M must be positive multiples of 16, N positive, SPARSITY in [0, 1], "
                             "THREADS and CALLS positive\n");
        return 2;
    }
    std::mt19937 rng(0);
    const Blocks16x4 w = random_weights(k, m, sparsity, rng);
    std::vector<float> x(static_cast<std::size_t>(n) * k), y(static_cast<std::size_t>(n) * m);
    std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
    for (float& value : x) value = uniform(rng);
    // padded to whole tiles of 8 rows: a last, partial tile reads (and never stores) rows past n
    std::vector<std::uint8_t> codes(static_cast<std::size_t>((n + kRowTile - 1) / kRowTile * kRowTile) * k);
    const float scale = 4.0f / 255.0f;
    const int zero_point = 128;

    SpinPool pool(threads);
    sparse_linear(w, x.data(), n, scale, zero_point, codes.data(), y.data(), pool);
    const double error = largest_error(w, codes.data(), n, zero_point, y.data());
    if (error > 1e-3) {
        std::fprintf(stderr, "wrong result: largest error %.3g\n", error);
        return 1;
    }
    double best = 1e30;
    for (int call = 0; call < calls; ++call) {
        const auto start = std::chrono::steady_clock::now();
        sparse_linear(w, x.data(), n, scale, zero_point, codes.data(), y.data(), pool);
        best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    const double products = static_cast<double>(w.block_col.size()) * n;  // one vpdpbusd per block and input row
    std::printf("K=%d M=%d N=%d sparsity=%.2f threads=%d: %.3f ms (fastest of %d calls), %zu blocks, "
                "%.2f G vpdpbusd/s per thread, largest error %.2g\n",
                k, m, n, sparsity, threads, best, calls, w.block_col.size(), products / best / 1e6 / threads, error);
    return 0;
}
