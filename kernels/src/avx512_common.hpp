// What the AVX-512 files share: the 16×16 transpose that writes y row-major, and the panel plumbing.
// Included only by files compiled with AVX-512 flags; everything has internal linkage.
#pragma once

#include <immintrin.h>

#include <type_traits>

#include "internal.hpp"

namespace vitsparse::detail {
namespace {

constexpr std::int64_t kLanes = 16;

// r[0..15] rows -> r[0..15] columns of the 16×16 float matrix they hold.
inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
        __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), w0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
        __m512 v1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
        __m512 w1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
        r[j] = _mm512_shuffle_f32x4(v0, v1, 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
        r[4 + j] = _mm512_shuffle_f32x4(w0, w1, 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(w0, w1, 0xDD);
    }
}

// The lanes of `mask` of 16 floats, bfloat16 values or codes at p, as floats (the other lanes 0.0).
inline __m512 load_lanes(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_lanes(const std::int8_t* p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}
inline __m512 load_lanes(const Bf16* p, __mmask16 mask) {
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

// The first `count` lanes of 16 (all from 16 up).
inline __mmask16 first_lanes(std::int64_t count) {
    return static_cast<__mmask16>((1u << std::clamp<std::int64_t>(count, 0, 16)) - 1u);
}

// The LayerNorm of a row of x (RowScale, internal.hpp), summed 16 lanes at a time.
template <typename In>
RowScale row_scale(const In* row, std::int64_t cols, float epsilon) {
    __m512 sum = _mm512_setzero_ps(), squares = _mm512_setzero_ps();
    for (std::int64_t k0 = 0; k0 < cols; k0 += kLanes) {
        sum = _mm512_add_ps(sum, load_lanes(row + k0, first_lanes(cols - k0)));
    }
    const float mean = _mm512_reduce_add_ps(sum) / static_cast<float>(cols);
    for (std::int64_t k0 = 0; k0 < cols; k0 += kLanes) {
        const __mmask16 lanes = first_lanes(cols - k0);
        const __m512 centered = _mm512_maskz_sub_ps(lanes, load_lanes(row + k0, lanes), _mm512_set1_ps(mean));
        squares = _mm512_fmadd_ps(centered, centered, squares);
    }
    return row_scale_of(mean, _mm512_reduce_add_ps(squares), cols, epsilon);
}

// 16 floats rounded to bfloat16, to nearest even (to_bf16, internal.hpp; NaN stays NaN).
inline __m256i round_to_bf16(__m512 values) {
    const __m512i bits = _mm512_castps_si512(values);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i half = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));  // ties to even
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, half), 16);
    const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet_nan));
}

// 16 floats to p, as they are, rounded to bfloat16, or as codes (whole numbers in [-128, 127]): all
// lanes, or those of `mask`.
inline void store_lanes(float* p, __m512 values) { _mm512_storeu_ps(p, values); }
inline void store_lanes(std::int8_t* p, __m512 values) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(values)));
}
inline void store_lanes(std::int8_t* p, __m512 values, __mmask16 mask) {
    _mm512_mask_cvtepi32_storeu_epi8(p, mask, _mm512_cvtps_epi32(values));
}
inline void store_lanes(Bf16* p, __m512 values) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_to_bf16(values));
}
inline void store_lanes(float* p, __m512 values, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, values); }
inline void store_lanes(Bf16* p, __m512 values, __mmask16 mask) {
    _mm256_mask_storeu_epi16(p, mask, round_to_bf16(values));
}

// 16 rows of 16 int8 codes (whole floats in [-128, 127]) at out, out_stride apart, to row_at(c) for
// column c, as 16 bytes each. Packs of 4 rows leave in each 128-bit lane L the 4×4 bytes of those rows
// and columns 4L..4L+3; a byte shuffle turns each into 4 columns' dwords, and a 4×4 transpose of dwords
// between the 4 packs gathers each column's 16 rows into one lane (84 operations instead of the float
// transpose's 128).
template <typename RowAt>
inline void store_codes_transposed(const float* out, std::int64_t out_stride, RowAt row_at) {
    __m512i packs[4];
    const __m512i columns_first = _mm512_set4_epi32(0x0f0b0703, 0x0e0a0602, 0x0d090501, 0x0c080400);
    for (int q = 0; q < 4; ++q) {
        __m512i rows[4];
        for (int j = 0; j < 4; ++j) rows[j] = _mm512_cvtps_epi32(_mm512_load_ps(out + (4 * q + j) * out_stride));
        const __m512i pack = _mm512_packs_epi16(_mm512_packs_epi32(rows[0], rows[1]),
                                                _mm512_packs_epi32(rows[2], rows[3]));
        packs[q] = _mm512_shuffle_epi8(pack, columns_first);  // lane L, dword c: rows 4q.. of column 4L + c
    }
    const __m512i low01 = _mm512_unpacklo_epi32(packs[0], packs[1]), high01 = _mm512_unpackhi_epi32(packs[0], packs[1]);
    const __m512i low23 = _mm512_unpacklo_epi32(packs[2], packs[3]), high23 = _mm512_unpackhi_epi32(packs[2], packs[3]);
    const __m512i column[4] = {_mm512_unpacklo_epi64(low01, low23), _mm512_unpackhi_epi64(low01, low23),
                               _mm512_unpacklo_epi64(high01, high23), _mm512_unpackhi_epi64(high01, high23)};
    for (int c = 0; c < 4; ++c) {  // column[c], lane L: column 4L + c
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row_at(c)), _mm512_castsi512_si128(column[c]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row_at(4 + c)), _mm512_extracti32x4_epi32(column[c], 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row_at(8 + c)), _mm512_extracti32x4_epi32(column[c], 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row_at(12 + c)), _mm512_extracti32x4_epi32(column[c], 3));
    }
}

// out[r][c] (r < `rows` output channels, c < columns input rows) -> row_at(c)[r], plus addend[c ×
// addend_stride + r] where addend is given (store_into, internal.hpp, gives the row addresses). Rows and
// addend hold y's element type, float, Bf16 or std::int8_t.
constexpr auto store_transposed_to = [](const float* out, std::int64_t out_stride, std::int64_t columns,
                                        std::int64_t rows, auto row_at, auto addend, std::int64_t addend_stride) {
    const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1u);
    using Out = std::remove_pointer_t<decltype(row_at(0))>;
    for (std::int64_t c0 = 0; c0 < columns; c0 += kLanes) {
        if constexpr (std::is_same_v<Out, std::int8_t>) {  // codes: whole tiles transposed as bytes
            if (rows == kRowBlock && columns - c0 >= kLanes && addend == nullptr) {
                store_codes_transposed(out + c0, out_stride, [&](std::int64_t c) { return row_at(c0 + c); });
                continue;
            }
        }
        __m512 tile[16];
        for (int r = 0; r < 16; ++r) tile[r] = _mm512_load_ps(out + r * out_stride + c0);
        transpose16(tile);
        const std::int64_t count = std::min<std::int64_t>(kLanes, columns - c0);
        if (addend != nullptr) {
            for (std::int64_t c = 0; c < count; ++c) {
                tile[c] = _mm512_add_ps(tile[c], load_lanes(addend + (c0 + c) * addend_stride, row_mask));
            }
        }
        if (rows == kRowBlock) {
            for (std::int64_t c = 0; c < count; ++c) store_lanes(row_at(c0 + c), tile[c]);
        } else {
            for (std::int64_t c = 0; c < count; ++c) store_lanes(row_at(c0 + c), tile[c], row_mask);
        }
    }
};

// out[r][c] (r < 16 output channels from m0, c < columns input rows from n0) -> y[n0 + c][m0 + r].
inline void store_transposed(const float* out, std::int64_t out_stride, std::int64_t columns, std::int64_t rows,
                             float* y, std::int64_t y_stride) {
    store_transposed_to(out, out_stride, columns, rows, [=](std::int64_t c) { return y + c * y_stride; },
                        static_cast<const float*>(nullptr), 0);
}

// Panels of input rows that split evenly enough among the threads get one task each (the panel-per-task
// layout, internal.hpp): at most kOwnPanelTiles tiles of 16 rows, fewer where y's row stride needs it.
constexpr int kOwnPanelTiles = 4;

// Every output channel (`rows` of them) over one panel of Tiles × 16 input rows from n0, written to y
// through 16×16 transposes: compute(m0, count, out) fills out[16][Tiles × 16].
template <int Tiles, typename Compute>
void panel_to_y(std::int64_t rows, std::int64_t n0, std::int64_t n, float* y, Compute compute) {
    panel_rows_to_y<kLanes, Tiles>(rows, n0, n, y, compute, store_transposed, true);
}

// run_panels_per_task (internal.hpp) with 16-row tiles.
template <template <int> class Panel, typename Out, typename... Args>
bool run_own_panels(std::int64_t n, std::int64_t rows, Out* y, const ParallelFor& parallel_for,
                    std::int64_t busy_per_idle, const Args&... args) {
    return run_panels_per_task<kLanes, kOwnPanelTiles, Panel>(n, panel_tiles(rows, kOwnPanelTiles, sizeof(Out)), y,
                                                             parallel_for, busy_per_idle, args...);
}

// The float kernels' panel: for each of 16 output channels from m0, accumulators start at its bias,
// `accumulate(m, acc)` adds its products (rows past `rows` stay zero), and they land in out[r].
template <int Tiles, typename Accumulate>
[[gnu::always_inline]] inline void float_panel(const float* bias, std::int64_t m0, std::int64_t rows, float* out,
                                               Accumulate accumulate) {
    for (std::int64_t r = 0; r < kRowBlock; ++r) {
        __m512 acc[Tiles];
        const __m512 start = _mm512_set1_ps(r < rows && bias ? bias[m0 + r] : 0.0f);
        for (int t = 0; t < Tiles; ++t) acc[t] = start;
        if (r < rows) accumulate(m0 + r, acc);
        for (int t = 0; t < Tiles; ++t) _mm512_store_ps(out + r * Tiles * kLanes + t * kLanes, acc[t]);
    }
}

// Every task of a product (run_task_grid), panels narrowed by panel_tiles, written through 16×16 transposes.
template <int MaxTiles, typename Compute>
void run_tasks(std::int64_t out_features, std::int64_t n, std::int64_t padded_n, float* y,
               const ParallelFor& parallel_for, Compute compute) {
    run_task_grid<kLanes, MaxTiles>(out_features, n, padded_n, panel_tiles(out_features, MaxTiles), y,
                                    parallel_for, compute, store_transposed);
}

}  // namespace
}  // namespace vitsparse::detail
