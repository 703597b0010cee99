// The INT8 pieces the AVX-512 kernels share (avx512.cpp one layer at a time, avx512_mlp.cpp two fused):
// quantizing activations into the panel layout, and the 1×4-block product of one panel. In the panel
// layout each 64-byte line holds 4 consecutive input channels of 16 input rows as uint8 codes, what
// vpdpbusd multiplies with a broadcast 1×4 block. Internal linkage, as avx512_common.hpp.
#pragma once

#include "avx512_common.hpp"

namespace vitsparse::detail {
namespace {

constexpr int kInt8Tiles = 8;  // 16-row tiles per panel at most: 8 independent accumulator chains
// 1.5 × 2^23: adding it to a float of magnitude below 2^22 and subtracting it again rounds that float to
// a whole number, half to even (the build has no -ffast-math, so the compiler keeps both operations)
constexpr float kRoundingShift = 12582912.0f;

// round(x × inverse) + zero point for 16 floats, left for the packs to saturate to [0, 255]: NaN, -inf and
// values below -2^31 convert to INT_MIN (code 0, as quantize_u8 gives them); the min keeps +inf and
// large values from doing the same.
inline __m512i unsaturated_codes(__m512 values, __m512 inverse, __m512i zero_point) {
    const __m512 steps = _mm512_min_ps(_mm512_set1_ps(512.0f), _mm512_mul_ps(values, inverse));
    return _mm512_add_epi32(_mm512_cvtps_epi32(steps), zero_point);
}

// Quantizes 16 input rows from `first` (rows past n read as the zero point) into the INT8 panel layout:
// for each group of 4 channels, 64 bytes holding the group's 4 codes of each row in row order, the
// groups `width` rows apart (the panel's width, or every input row when there is one panel). Works
// on 16 channels (4 groups) at a time: one row load each; the saturating packs of rows 4q..4q+3 leave
// group L's codes of those rows in 128-bit lane L, and a 4×4 transpose of lanes puts each group in one
// register. x holds floats or Bf16, row-major or head by head (16 channels never cross a head: the
// dispatch gathers x first where they would); with a LayerNorm (row-major only) each row is normalized first.
template <typename In>
void pack_int8(const XRows<In>& x, std::int64_t n, std::int64_t cols, float scale, std::int32_t zero_point,
               const LayerNorm& norm, std::uint8_t* packed, std::int64_t width, std::int64_t first) {
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    const __m512i zero_v = _mm512_set1_epi32(zero_point);
    const std::int64_t groups = ceil_div(cols, 4);
    const In* row_at[16];
    RowScale rows[16];
    for (int r = 0; r < 16 && first + r < n; ++r) {
        row_at[r] = x.row(first + r);
        if (norm.active()) rows[r] = row_scale(row_at[r], cols, norm.epsilon);
    }
    for (std::int64_t k0 = 0; k0 < cols; k0 += 16) {
        const __mmask16 lanes = first_lanes(cols - k0);
        const std::int64_t column = x.column(k0);
        __m512 gamma = _mm512_setzero_ps(), beta = _mm512_setzero_ps();
        if (norm.active()) {
            gamma = load_lanes(norm.gamma + k0, lanes);
            beta = load_lanes(norm.beta + k0, lanes);
        }
        __m512i codes[16];  // channels past cols and rows past n read 0.0: the zero point
        for (int r = 0; r < 16; ++r) {
            __m512 values = _mm512_setzero_ps();
            if (first + r < n) {
                values = load_lanes(row_at[r] + column, lanes);
                if (norm.active()) {  // channels past cols stay 0.0: gamma and beta are 0.0 there
                    values = _mm512_fmadd_ps(values, _mm512_set1_ps(rows[r].rstd), _mm512_set1_ps(rows[r].shift));
                    values = _mm512_fmadd_ps(values, gamma, beta);
                }
            }
            codes[r] = unsaturated_codes(values, inverse, zero_v);
        }
        __m512i quads[4];  // quads[q] lane L: group L of rows 4q..4q+3, 4 codes each
        for (int q = 0; q < 4; ++q) {
            quads[q] = _mm512_packus_epi16(_mm512_packs_epi32(codes[4 * q], codes[4 * q + 1]),
                                           _mm512_packs_epi32(codes[4 * q + 2], codes[4 * q + 3]));
        }
        const __m512i t0 = _mm512_shuffle_i32x4(quads[0], quads[1], 0x44);  // lanes 0, 1 of quads 0 and 1
        const __m512i t1 = _mm512_shuffle_i32x4(quads[0], quads[1], 0xEE);  // lanes 2, 3
        const __m512i t2 = _mm512_shuffle_i32x4(quads[2], quads[3], 0x44);
        const __m512i t3 = _mm512_shuffle_i32x4(quads[2], quads[3], 0xEE);
        const __m512i out[4] = {_mm512_shuffle_i32x4(t0, t2, 0x88), _mm512_shuffle_i32x4(t0, t2, 0xDD),
                                _mm512_shuffle_i32x4(t1, t3, 0x88), _mm512_shuffle_i32x4(t1, t3, 0xDD)};
        for (std::int64_t g = 0; g < 4 && k0 / 4 + g < groups; ++g) {
            _mm512_store_si512(packed + ((k0 / 4 + g) * width + first) * 4, out[g]);
        }
    }
}

// acc += 4-byte dot products of activations (uint8) and weights (int8), per 32-bit lane. Written as
// asm because gcc copies the accumulator around the intrinsic (which it models as non-destructive),
// adding two register moves per product to the inner loop.
inline __m512i dot_accumulate(__m512i acc, __m512i activations, __m512i weights) {
    asm("vpdpbusd %[w], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(activations), [w] "v"(weights));
    return acc;
}

// acc[t] += blocks [begin, end) of a row times tile t of the panel at `panel` (packed activations, groups
// `width` rows apart).
template <int Tiles>
inline void accumulate_blocks(const Int8Blocks& w, const std::uint8_t* panel, std::int64_t width,
                              std::int32_t begin, std::int32_t end, __m512i* acc) {
    for (std::int32_t b = begin; b < end; ++b) {
        std::int32_t block;
        std::memcpy(&block, w.values + 4 * static_cast<std::int64_t>(b), 4);
        const __m512i weights = _mm512_set1_epi32(block);
        const std::uint8_t* a = panel + static_cast<std::int64_t>(w.block_col[b]) * width * 4;
#pragma GCC unroll 8
        for (int t = 0; t < Tiles; ++t) acc[t] = dot_accumulate(acc[t], _mm512_load_si512(a + 64 * t), weights);
    }
}

// out[t] = acc[t] × scale + bias for output channel m, acc[t] holding the sums less zero point × row sum.
template <int Tiles>
inline void finish_row(const Int8Blocks& w, std::int64_t m, const __m512i* acc, float* out) {
    const float bias = w.bias ? w.bias[m] : 0.0f;
    if (w.codes) {  // int8_result: the code of the result, minus 128, as a float
        // round(sum × scale / out_scale + bias / out_scale) + out_zero_point - 128 in one FMA, rounded half
        // to even as QuantizeLinear rounds (larger magnitudes saturate either way)
        const float inverse = 1.0f / w.out_scale;
        const __m512 factor = _mm512_set1_ps(w.scale[m] * inverse);
        const __m512 shift = _mm512_set1_ps(bias * inverse + static_cast<float>(w.out_zero_point - 128));
        const __m512 low = _mm512_set1_ps(-128.0f), high = _mm512_set1_ps(127.0f);
        const __m512 round = _mm512_set1_ps(kRoundingShift);
        for (int t = 0; t < Tiles; ++t) {
            const __m512 steps = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), factor, shift);
            const __m512 code = _mm512_sub_ps(_mm512_add_ps(steps, round), round);
            _mm512_store_ps(out + t * kLanes, _mm512_min_ps(_mm512_max_ps(code, low), high));
        }
        return;
    }
    const __m512 scale = _mm512_set1_ps(w.scale[m]), bias_v = _mm512_set1_ps(bias);
    if (w.out_scale > 0.0f) {  // int8_result (internal.hpp): fake-quantized, then the bias
        // steps = round(sum × scale × inverse) saturated to [-zero point, 255 - zero point]
        const __m512 inverse = _mm512_set1_ps(1.0f / w.out_scale), out_scale = _mm512_set1_ps(w.out_scale);
        const __m512 round = _mm512_set1_ps(kRoundingShift);
        const __m512 low = _mm512_set1_ps(static_cast<float>(-w.out_zero_point));
        const __m512 high = _mm512_set1_ps(static_cast<float>(255 - w.out_zero_point));
        for (int t = 0; t < Tiles; ++t) {
            const __m512 value = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[t]), scale), inverse);
            const __m512 steps = _mm512_sub_ps(_mm512_add_ps(value, round), round);
            const __m512 saturated = _mm512_min_ps(_mm512_max_ps(steps, low), high);
            _mm512_store_ps(out + t * kLanes, _mm512_fmadd_ps(saturated, out_scale, bias_v));
        }
        return;
    }
    for (int t = 0; t < Tiles; ++t) {
        _mm512_store_ps(out + t * kLanes, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), scale, bias_v));
    }
}

// 16 output channels from m0 (`rows` of them real) over the packed panel at `panel`, into out.
template <int Tiles>
void int8_panel(const Int8Blocks& w, const std::uint8_t* panel, std::int64_t width, std::int64_t m0,
                std::int64_t rows, std::int32_t zero_point, float* out) {
    for (std::int64_t r = 0; r < kRowBlock; ++r) {
        if (r < rows) {
            __m512i acc[Tiles];  // starting at -zero point × row sum, they end as the zero-point-corrected sums
            const __m512i offset = _mm512_set1_epi32(-zero_point * w.row_sums[m0 + r]);
            for (int t = 0; t < Tiles; ++t) acc[t] = offset;
            accumulate_blocks<Tiles>(w, panel, width, w.row_ptr[m0 + r], w.row_ptr[m0 + r + 1], acc);
            finish_row<Tiles>(w, m0 + r, acc, out + r * Tiles * kLanes);
        } else {
            for (int t = 0; t < Tiles; ++t) _mm512_store_ps(out + r * Tiles * kLanes + t * kLanes, _mm512_setzero_ps());
        }
    }
}

// Packs the Tiles × 16 input rows from n0 into one panel at `packed` (rows past n: the zero point),
// normalized where `norm` is active.
template <int Tiles, typename In>
void pack_panel(const XRows<In>& x, std::int64_t n, std::int64_t cols, float scale, std::int32_t zero_point,
                const LayerNorm& norm, std::int64_t n0, std::uint8_t* packed) {
    for (int t = 0; t < Tiles; ++t) {
        pack_int8(x.shifted(n0), n - n0, cols, scale, zero_point, norm, packed, Tiles * kLanes, t * kLanes);
    }
}

// Every output channel of `w` over the packed panel of the Tiles × 16 input rows from n0, written to y
// (n rows of w.rows floats or Bf16) 16 channels at a time.
template <int Tiles, typename Out>
void int8_panel_to_y(const Int8Blocks& w, const std::uint8_t* panel, std::int32_t zero_point, std::int64_t n0,
                     std::int64_t n, Out* y) {
    panel_rows_to_y<kLanes, Tiles>(w.rows, n0, n, y, [&](std::int64_t m0, std::int64_t rows, float* out) {
        int8_panel<Tiles>(w, panel, Tiles * kLanes, m0, rows, zero_point, out);
    }, store_into(store_transposed_to, output_of(w), w.rows, n, y), output_of(w).row_major());
}

template <int Tiles>
struct Int8Panel {
    template <typename... Args>
    static void run(Args&&... args) { int8_panel<Tiles>(std::forward<Args>(args)...); }
};

}  // namespace
}  // namespace vitsparse::detail
