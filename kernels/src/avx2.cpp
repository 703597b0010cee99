// AVX2 kernels, for CPUs without AVX-512 VNNI. INT8 activations are packed as int16 with the zero
// point already subtracted, two channels per row, so vpmaddwd sums exact pairs (vpmaddubsw would
// saturate at 16 bits); f32 activations are packed one channel per row. 8 input rows per tile.
#include <immintrin.h>

#include "internal.hpp"

namespace vitsparse::detail {

namespace {

constexpr std::int64_t kLanes = 8;
constexpr int kTiles = 8;

// out[r][c] -> y[n0 + c][m0 + r], plainly: the AVX2 kernels are the fallback, not the fast path.
void store_transposed(const float* out, std::int64_t out_stride, std::int64_t columns, std::int64_t rows,
                      float* y, std::int64_t y_stride) {
    for (std::int64_t c = 0; c < columns; ++c) {
        for (std::int64_t r = 0; r < rows; ++r) y[c * y_stride + r] = out[r * out_stride + c];
    }
}

// int8_result (internal.hpp) for 8 sums of output channel m.
inline __m256 int8_results(const Int8Blocks& w, std::int64_t m, __m256i sums) {
    __m256 value = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(w.scale[m]));
    if (w.out_scale > 0.0f) {
        const float zero_point = static_cast<float>(w.out_zero_point);
        const __m256 steps = _mm256_round_ps(_mm256_mul_ps(value, _mm256_set1_ps(1.0f / w.out_scale)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 clamped = _mm256_min_ps(_mm256_max_ps(steps, _mm256_set1_ps(-zero_point)),
                                             _mm256_set1_ps(255.0f - zero_point));
        value = _mm256_mul_ps(clamped, _mm256_set1_ps(w.out_scale));
    }
    return _mm256_add_ps(value, _mm256_set1_ps(w.bias ? w.bias[m] : 0.0f));
}

template <int Tiles>
void int8_panel(const Int8Blocks& w, const std::int16_t* packed, std::int64_t padded_n, std::int64_t n0,
                std::int64_t m0, std::int64_t rows, float* out) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t m = m0 + r;
        __m256i acc[Tiles];
        for (int t = 0; t < Tiles; ++t) acc[t] = _mm256_setzero_si256();
        for (std::int32_t b = w.row_ptr[m]; b < w.row_ptr[m + 1]; ++b) {
            const std::int8_t* v = w.values + 4 * static_cast<std::int64_t>(b);
            const __m256i low = _mm256_set1_epi32(static_cast<std::uint16_t>(v[0]) | (static_cast<std::uint32_t>(static_cast<std::uint16_t>(v[1])) << 16));
            const __m256i high = _mm256_set1_epi32(static_cast<std::uint16_t>(v[2]) | (static_cast<std::uint32_t>(static_cast<std::uint16_t>(v[3])) << 16));
            const std::int64_t pair = 2 * static_cast<std::int64_t>(w.block_col[b]);
            const std::int16_t* a0 = packed + (pair * padded_n + n0) * 2;
            const std::int16_t* a1 = a0 + padded_n * 2;
            for (int t = 0; t < Tiles; ++t) {
                const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a0 + 16 * t));
                const __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a1 + 16 * t));
                acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(x0, low), _mm256_madd_epi16(x1, high)));
            }
        }
        for (int t = 0; t < Tiles; ++t) _mm256_store_ps(out + r * Tiles * kLanes + t * kLanes, int8_results(w, m, acc[t]));
    }
}

template <int Tiles>
void f32_panel(const F32Csr& w, const float* packed, std::int64_t padded_n, std::int64_t n0, std::int64_t m0,
               std::int64_t rows, float* out) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t m = m0 + r;
        __m256 acc[Tiles];
        for (int t = 0; t < Tiles; ++t) acc[t] = _mm256_set1_ps(w.bias ? w.bias[m] : 0.0f);
        for (std::int32_t j = w.row_ptr[m]; j < w.row_ptr[m + 1]; ++j) {
            const __m256 weight = _mm256_set1_ps(w.values[j]);
            const float* a = packed + static_cast<std::int64_t>(w.col[j]) * padded_n + n0;
            for (int t = 0; t < Tiles; ++t) acc[t] = _mm256_fmadd_ps(_mm256_load_ps(a + kLanes * t), weight, acc[t]);
        }
        for (int t = 0; t < Tiles; ++t) _mm256_store_ps(out + r * Tiles * kLanes + t * kLanes, acc[t]);
    }
}

template <int Tiles>
struct Int8Panel {
    template <typename... Args>
    static void run(Args&&... args) { int8_panel<Tiles>(std::forward<Args>(args)...); }
};

template <int Tiles>
struct F32Panel {
    template <typename... Args>
    static void run(Args&&... args) { f32_panel<Tiles>(std::forward<Args>(args)...); }
};

}  // namespace

void int8_avx2(const Int8Blocks& w, const float* x, std::int64_t n, std::int64_t x_stride, float act_scale,
               std::int32_t act_zero_point, float* y, const ParallelFor& parallel_for) {
    const std::int64_t padded_n = round_up(n, kLanes), pairs = 2 * ceil_div(w.cols, 4);
    auto* packed = static_cast<std::int16_t*>(workspace(static_cast<std::size_t>(pairs * padded_n * 2) * 2));
    parallel_for(static_cast<std::size_t>(padded_n / kLanes), [&](std::size_t chunk) {
        for (std::int64_t i = static_cast<std::int64_t>(chunk) * kLanes; i < static_cast<std::int64_t>(chunk + 1) * kLanes; ++i) {
            for (std::int64_t k = 0; k < 2 * pairs; ++k) {
                const bool real = i < n && k < w.cols;
                const std::int32_t code = real ? quantize_u8(x[i * x_stride + k], 1.0f / act_scale, act_zero_point) : act_zero_point;
                packed[((k / 2) * padded_n + i) * 2 + k % 2] = static_cast<std::int16_t>(code - act_zero_point);
            }
        }
    });
    run_task_grid<kLanes, kTiles>(w.rows, n, padded_n, kTiles, y, parallel_for,
                                  [&](int tiles, std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
        run_panel<kTiles, Int8Panel>(tiles, w, packed, padded_n, n0, m0, rows, out);
    }, store_transposed);
}

void f32_avx2(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
              const ParallelFor& parallel_for) {
    const std::int64_t padded_n = round_up(n, kLanes);
    auto* packed = static_cast<float*>(workspace(static_cast<std::size_t>(w.cols * padded_n) * sizeof(float)));
    parallel_for(static_cast<std::size_t>(padded_n / kLanes), [&](std::size_t chunk) {
        for (std::int64_t i = static_cast<std::int64_t>(chunk) * kLanes; i < static_cast<std::int64_t>(chunk + 1) * kLanes; ++i) {
            for (std::int64_t k = 0; k < w.cols; ++k) packed[k * padded_n + i] = i < n ? x[i * x_stride + k] : 0.0f;
        }
    });
    run_task_grid<kLanes, kTiles>(w.rows, n, padded_n, kTiles, y, parallel_for,
                                  [&](int tiles, std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
        run_panel<kTiles, F32Panel>(tiles, w, packed, padded_n, n0, m0, rows, out);
    }, store_transposed);
}

}  // namespace vitsparse::detail
