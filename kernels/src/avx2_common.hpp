// What the AVX2 files share (avx2.cpp, and avx2_vnni.cpp for CPUs with AVX-VNNI): 8 input rows per
// tile, the 8×8 transpose of 32-bit elements that packing and the writing of y go through, the INT8
// result of a row's sums, and run_product, which runs any kernel's layout in both task layouts.
// Included only by files compiled with AVX2 flags; internal linkage, as avx512_common.hpp.
#pragma once

#include <immintrin.h>

#include <utility>

#include "internal.hpp"

namespace vitsparse::detail {
namespace {

constexpr std::int64_t kLanes = 8;
constexpr int kTiles = 8;  // tiles per panel

// r[0..7] rows -> r[0..7] columns of the 8×8 matrix of 32-bit elements they hold.
inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
        u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
}

// Lanes [0, count) of 8 set: a mask for maskload/maskstore.
inline __m256i first_lanes(std::int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<std::int64_t>(0, count))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first `count` of 8 floats, bfloat16 values or codes at p, as floats (the other lanes 0.0).
inline __m256 load_lanes(const float* p, std::int64_t count) {
    return count >= kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(count));
}
inline __m256 load_lanes(const Bf16* p, std::int64_t count) {
    alignas(16) Bf16 part[kLanes] = {};
    if (count < kLanes) std::memcpy(part, p, static_cast<std::size_t>(std::max<std::int64_t>(0, count)) * 2);
    const __m128i bits = count >= kLanes ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                         : _mm_load_si128(reinterpret_cast<const __m128i*>(part));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline __m256 load_lanes(const std::int8_t* p, std::int64_t count) {
    alignas(8) std::int8_t part[kLanes] = {};
    std::memcpy(part, p, static_cast<std::size_t>(std::clamp<std::int64_t>(count, 0, kLanes)));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(part))));
}

// 8 floats rounded to the nearest bfloat16, ties to even, and back (to_bf16, internal.hpp): what
// vdpbf16ps multiplies, and what a bfloat16 y holds. NaN stays NaN.
inline __m256 round_to_bf16_and_back(__m256 values) {
    const __m256i bits = _mm256_castps_si256(values);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    const __m256 is_nan = _mm256_cmp_ps(values, values, _CMP_UNORD_Q);
    const __m256 chosen = _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(nan), is_nan);
    return _mm256_and_ps(chosen, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// The same as 8 bfloat16 values.
inline __m128i round_to_bf16(__m256 values) {
    const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(round_to_bf16_and_back(values)), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));  // all <= 0xffff
}

// The first `count` of 8 floats to p, as they are, rounded to bfloat16, or as codes.
inline void store_lanes(float* p, __m256 values, std::int64_t count) {
    if (count >= kLanes) return _mm256_storeu_ps(p, values);
    _mm256_maskstore_ps(p, first_lanes(count), values);
}
inline void store_lanes(Bf16* p, __m256 values, std::int64_t count) {
    const __m128i bits = round_to_bf16(values);
    if (count >= kLanes) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
    alignas(16) Bf16 part[kLanes];
    _mm_store_si128(reinterpret_cast<__m128i*>(part), bits);
    std::memcpy(p, part, static_cast<std::size_t>(std::max<std::int64_t>(0, count)) * sizeof(Bf16));
}

inline void store_lanes(std::int8_t* p, __m256 values, std::int64_t count) {  // codes: whole numbers in range
    alignas(32) std::int32_t codes[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes), _mm256_cvtps_epi32(values));
    for (std::int64_t j = 0; j < std::min<std::int64_t>(count, kLanes); ++j) p[j] = static_cast<std::int8_t>(codes[j]);
}

// 8 values of row `row` of x (floats or Bf16) from column k0 as floats (columns past cols and rows past
// n read 0.0).
template <typename In>
inline __m256 load_row(const In* x, std::int64_t row, std::int64_t n, std::int64_t x_stride, std::int64_t k0,
                       std::int64_t cols) {
    if (row >= n) return _mm256_setzero_ps();
    return load_lanes(x + row * x_stride + k0, cols - k0);
}

inline float horizontal_sum(__m256 values) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(values), _mm256_extractf128_ps(values, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
}

// The LayerNorm of a row of x (RowScale, internal.hpp), summed 8 lanes at a time.
template <typename In>
RowScale row_scale(const In* row, std::int64_t cols, float epsilon) {
    __m256 sum = _mm256_setzero_ps(), squares = _mm256_setzero_ps();
    for (std::int64_t k0 = 0; k0 < cols; k0 += kLanes) {
        sum = _mm256_add_ps(sum, load_lanes(row + k0, cols - k0));
    }
    const float mean = horizontal_sum(sum) / static_cast<float>(cols);
    for (std::int64_t k0 = 0; k0 < cols; k0 += kLanes) {
        const __m256 centered = _mm256_sub_ps(load_lanes(row + k0, cols - k0), _mm256_set1_ps(mean));
        const __m256 kept = _mm256_and_ps(centered, _mm256_castsi256_ps(first_lanes(cols - k0)));
        squares = _mm256_fmadd_ps(kept, kept, squares);
    }
    return row_scale_of(mean, horizontal_sum(squares), cols, epsilon);
}

// The 8 input rows from `first` of x as the INT8 packs read them: load(r, k0) gives 8 values of row
// first + r from column k0 as floats (columns past cols and rows past n read 0.0), normalized where
// `norm` is active (each row's RowScale computed once, here).
template <typename In>
struct PackedRows {
    const In* x;
    std::int64_t n, x_stride, cols, first;
    const LayerNorm& norm;
    RowScale scale[8];

    PackedRows(const In* x_, std::int64_t n_, std::int64_t x_stride_, std::int64_t cols_, std::int64_t first_,
               const LayerNorm& norm_)
        : x(x_), n(n_), x_stride(x_stride_), cols(cols_), first(first_), norm(norm_) {
        for (int r = 0; r < 8 && norm.active() && first + r < n; ++r) {
            scale[r] = row_scale(x + (first + r) * x_stride, cols, norm.epsilon);
        }
    }
    __m256 load(int r, std::int64_t k0) const {
        const __m256 values = load_row(x, first + r, n, x_stride, k0, cols);
        if (!norm.active() || first + r >= n) return values;
        const __m256 normalized =
            _mm256_fmadd_ps(values, _mm256_set1_ps(scale[r].rstd), _mm256_set1_ps(scale[r].shift));
        return _mm256_fmadd_ps(normalized, load_lanes(norm.gamma + k0, cols - k0),
                               load_lanes(norm.beta + k0, cols - k0));
    }
};

// out[r][c] (r < `rows` output channels, c < columns input rows) -> row_at(c)[r], plus addend[c ×
// addend_stride + r] where addend is given (store_into, internal.hpp, gives the row addresses). Rows and
// addend hold y's element type, float, Bf16 or std::int8_t.
constexpr auto store_transposed_to = [](const float* out, std::int64_t out_stride, std::int64_t columns,
                                        std::int64_t rows, auto row_at, auto addend, std::int64_t addend_stride) {
    for (std::int64_t c0 = 0; c0 < columns; c0 += kLanes) {
        const std::int64_t count = std::min<std::int64_t>(kLanes, columns - c0);
        for (std::int64_t r0 = 0; r0 < rows; r0 += kLanes) {
            __m256 tile[8];
            for (int r = 0; r < 8; ++r) tile[r] = _mm256_load_ps(out + (r0 + r) * out_stride + c0);
            transpose8(tile);
            const std::int64_t lanes = std::min<std::int64_t>(kLanes, rows - r0);
            if (addend != nullptr) {
                const auto* from = addend + c0 * addend_stride + r0;
                for (std::int64_t c = 0; c < count; ++c) {
                    tile[c] = _mm256_add_ps(tile[c], load_lanes(from + c * addend_stride, lanes));
                }
            }
            for (std::int64_t c = 0; c < count; ++c) store_lanes(row_at(c0 + c) + r0, tile[c], lanes);
        }
    }
};

// out[r][c] (r < 16 output channels from m0, c < columns input rows from n0) -> y[n0 + c][m0 + r].
inline void store_transposed(const float* out, std::int64_t out_stride, std::int64_t columns, std::int64_t rows,
                             float* y, std::int64_t y_stride) {
    store_transposed_to(out, out_stride, columns, rows, [=](std::int64_t c) { return y + c * y_stride; },
                        static_cast<const float*>(nullptr), 0);
}

// round(value / out_scale) saturated to [-zero point, 255 - zero point]: a uint8 code minus its zero point.
inline __m256 quantized_steps(const Int8Blocks& w, __m256 value) {
    const float zero_point = static_cast<float>(w.out_zero_point);
    const __m256 steps = _mm256_round_ps(_mm256_mul_ps(value, _mm256_set1_ps(1.0f / w.out_scale)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(_mm256_max_ps(steps, _mm256_set1_ps(-zero_point)), _mm256_set1_ps(255.0f - zero_point));
}

// int8_result (internal.hpp) for 8 sums of output channel m.
inline __m256 int8_results(const Int8Blocks& w, std::int64_t m, __m256i sums) {
    __m256 value = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(w.scale[m]));
    const __m256 bias = _mm256_set1_ps(w.bias ? w.bias[m] : 0.0f);
    if (w.codes) {
        const __m256 steps = quantized_steps(w, _mm256_add_ps(value, bias));
        return _mm256_add_ps(steps, _mm256_set1_ps(static_cast<float>(w.out_zero_point - 128)));
    }
    if (w.out_scale > 0.0f) value = _mm256_mul_ps(quantized_steps(w, value), _mm256_set1_ps(w.out_scale));
    return _mm256_add_ps(value, bias);
}

// run_panels_per_task (internal.hpp) with 8-row tiles: panels of up to 64 input rows, narrowed as
// panel_tiles narrows the AVX-512 kernels' 16-row tiles.
template <template <int> class Panel, typename Out, typename... Args>
bool run_own_panels(std::int64_t n, std::int64_t rows, Out* y, const ParallelFor& parallel_for,
                    std::int64_t busy_per_idle, const Args&... args) {
    return run_panels_per_task<kLanes, kTiles, Panel>(n, 2 * panel_tiles(rows, kTiles / 2, sizeof(Out)), y,
                                                      parallel_for, busy_per_idle, args...);
}

// Every AVX2 kernel is one Layout run by run_product. A Layout packs x into 32-bit words and runs output
// channels over them:
//   using Word;                          (float or std::int32_t)
//   std::int64_t rows() const;           output channels
//   std::int64_t words() const;          packed words per input row
//   OutputLayout output() const;         how y is laid out (internal.hpp: row-major, an addend, heads)
//   void pack(x, n, x_stride, packed, width, first) const;
//                                        the 8 input rows from `first` (rows past n: zeros), word w of
//                                        row i at w × width + i (x: floats, or for INT8 also Bf16)
//   template <int Tiles> void panel(packed, width, n0, m0, rows, out) const;
//                                        out[r][0, Tiles × 8) for the `rows` output channels from m0,
//                                        over the packed input rows from n0
template <typename Layout>
struct LayoutPanel {
    template <int Tiles>
    struct Of {
        template <typename... Args>
        static void run(const Layout& layout, Args&&... args) {
            layout.template panel<Tiles>(std::forward<Args>(args)...);
        }
    };
};

// The panel of Tiles × 8 input rows from n0, packed into this thread's workspace, through every output
// channel into y (the panel-per-task layout, internal.hpp).
template <typename Layout>
struct LayoutOwnPanel {
    template <int Tiles>
    struct Of {
        template <typename In, typename Out>
        static void run(const Layout& layout, const In* x, std::int64_t n, std::int64_t x_stride, std::int64_t n0,
                        Out* y) {
            using Word = typename Layout::Word;
            constexpr std::int64_t width = Tiles * kLanes;
            auto* packed = static_cast<Word*>(workspace(static_cast<std::size_t>(layout.words() * width) * sizeof(Word)));
            for (int t = 0; t < Tiles; ++t) layout.pack(x + n0 * x_stride, n - n0, x_stride, packed, width, t * kLanes);
            panel_rows_to_y<kLanes, Tiles>(layout.rows(), n0, n, y, [&](std::int64_t m0, std::int64_t rows, float* out) {
                layout.template panel<Tiles>(packed, width, 0, m0, rows, out);
            }, store_into(store_transposed_to, layout.output(), layout.rows(), n, y), layout.output().row_major());
        }
    };
};

// One product: the panel-per-task layout where its panels keep the threads busy (and y is row-major),
// else x packed once and tasks of 16 output channels × one panel.
template <typename Layout, typename In, typename Out>
void run_product(const Layout& layout, const In* x, std::int64_t n, std::int64_t x_stride, Out* y,
                 const ParallelFor& parallel_for) {
    const OutputLayout output = layout.output();  // split into heads: the shared panels (run_task_grid says why)
    if (output.row_major() && run_own_panels<LayoutOwnPanel<Layout>::template Of>(n, layout.rows(), y, parallel_for, 4,
                                                                                  layout, x, n, x_stride)) {
        return;
    }
    using Word = typename Layout::Word;
    const std::int64_t padded_n = round_up(n, kLanes);
    auto* packed = static_cast<Word*>(workspace(static_cast<std::size_t>(layout.words() * padded_n) * sizeof(Word)));
    parallel_for(static_cast<std::size_t>(padded_n / kLanes), [&](std::size_t chunk) {
        layout.pack(x, n, x_stride, packed, padded_n, static_cast<std::int64_t>(chunk) * kLanes);
    });
    run_task_grid<kLanes, kTiles>(layout.rows(), n, padded_n, kTiles, y, parallel_for,
                                  [&](int tiles, std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
        run_panel<kTiles, LayoutPanel<Layout>::template Of>(tiles, layout, packed, padded_n, n0, m0, rows, out);
    }, store_into(store_transposed_to, output, layout.rows(), n, y), !output.row_major());
}

}  // namespace
}  // namespace vitsparse::detail
