// AVX2 kernels, for CPUs without AVX-512 VNNI (for INT8, without AVX-VNNI either: avx2_vnni.cpp), and
// for bf16 on CPUs without AVX-512 BF16. INT8 activations are packed as int16 with the zero point
// already subtracted, two channels per 32-bit lane, so vpmaddwd sums exact pairs (vpmaddubsw would
// saturate at 16 bits); float activations are packed one channel per row, rounded to bfloat16 for the
// bf16 kernel. 8 input rows per tile: the packing and the writing of y go through 8×8 transposes of
// 32-bit elements.
#include <type_traits>

#include "avx2_common.hpp"

namespace vitsparse::detail {

namespace {

// code - zero point for 8 floats: round(x × inverse) half to even, plus the zero point, saturated to
// [0, 255], as quantize_u8 computes it. The min keeps +inf and large values from converting to
// INT_MIN; NaN, -inf and values below -2^31 convert to INT_MIN, which saturates to code 0.
inline __m256i centered_codes(__m256 values, __m256 inverse, __m256i zero_point) {
    const __m256i codes = _mm256_add_epi32(
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_set1_ps(512.0f), _mm256_mul_ps(values, inverse))), zero_point);
    const __m256i clamped = _mm256_min_epi32(_mm256_max_epi32(codes, _mm256_setzero_si256()), _mm256_set1_epi32(255));
    return _mm256_sub_epi32(clamped, zero_point);
}

// Quantizes the 8 input rows from `first` (normalized where `norm` is active) into the int16 pair
// layout: 32-bit element (p, i) of `packed`, at p × padded_n + i, holds channels 2p and 2p + 1 of row i.
// 16 channels at a time: per row, the saturating pack of its two 8-channel halves gives its 8 pairs; an
// 8×8 transpose gives each pair's rows.
template <typename In>
void pack_int16_pairs(const In* x, std::int64_t n, std::int64_t x_stride, std::int64_t cols,
                      std::int64_t pairs, float scale, std::int32_t zero_point, const LayerNorm& norm,
                      std::int32_t* packed, std::int64_t padded_n, std::int64_t first) {
    const PackedRows<In> source(x, n, x_stride, cols, first, norm);
    const __m256 inverse = _mm256_set1_ps(1.0f / scale);
    const __m256i zero_v = _mm256_set1_epi32(zero_point);
    for (std::int64_t k0 = 0; k0 < cols; k0 += 2 * kLanes) {
        __m256 rows[8];
        for (int r = 0; r < 8; ++r) {
            const __m256i low = centered_codes(source.load(r, k0), inverse, zero_v);
            const __m256i high = centered_codes(source.load(r, k0 + kLanes), inverse, zero_v);
            // packs interleaves 64-bit groups per 128-bit lane (pairs 0 1 4 5 | 2 3 6 7): put them in order
            rows[r] = _mm256_castsi256_ps(_mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8));
        }
        transpose8(rows);
        for (std::int64_t p = 0; p < kLanes && k0 / 2 + p < pairs; ++p) {
            _mm256_store_ps(reinterpret_cast<float*>(packed + (k0 / 2 + p) * padded_n + first), rows[p]);
        }
    }
}

// The 8 float channels of x from k0 for the 8 input rows from `first`, transposed into packed
// (channel k of row i at k × width + i) for channels below `padded_cols` (those past cols read 0.0),
// rounded to bfloat16 for the bf16 kernel.
template <bool RoundToBf16>
void pack_floats(const float* x, std::int64_t n, std::int64_t x_stride, std::int64_t cols, std::int64_t padded_cols,
                 float* packed, std::int64_t width, std::int64_t first) {
    for (std::int64_t k0 = 0; k0 < padded_cols; k0 += kLanes) {
        __m256 rows[8];
        for (int r = 0; r < 8; ++r) {
            rows[r] = load_row(x, first + r, n, x_stride, k0, cols);
            if constexpr (RoundToBf16) rows[r] = round_to_bf16_and_back(rows[r]);
        }
        transpose8(rows);
        for (std::int64_t k = 0; k < kLanes && k0 + k < padded_cols; ++k) {
            _mm256_store_ps(packed + (k0 + k) * width + first, rows[k]);
        }
    }
}

// Inlined at each call for the reason bf16_panel is (avx512_bf16.cpp).
template <int Tiles>
[[gnu::always_inline]] inline void int8_panel(const Int8Blocks& w, const std::int32_t* packed,
                                              std::int64_t padded_n, std::int64_t n0, std::int64_t m0,
                                              std::int64_t rows, float* out) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t m = m0 + r;
        __m256i acc[Tiles];
        for (int t = 0; t < Tiles; ++t) acc[t] = _mm256_setzero_si256();
        for (std::int32_t b = w.row_ptr[m]; b < w.row_ptr[m + 1]; ++b) {
            std::int32_t block;
            std::memcpy(&block, w.values + 4 * static_cast<std::int64_t>(b), 4);
            const __m128i codes = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(block));  // 4 int16 weights
            const __m256i low = _mm256_broadcastd_epi32(codes);                   // channels 0, 1
            const __m256i high = _mm256_broadcastd_epi32(_mm_srli_si128(codes, 4));  // channels 2, 3
            const std::int32_t* a0 = packed + 2 * static_cast<std::int64_t>(w.block_col[b]) * padded_n + n0;
            const std::int32_t* a1 = a0 + padded_n;
            for (int t = 0; t < Tiles; ++t) {
                const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a0 + kLanes * t));
                const __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a1 + kLanes * t));
                acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(x0, low),
                                                                   _mm256_madd_epi16(x1, high)));
            }
        }
        for (int t = 0; t < Tiles; ++t) _mm256_store_ps(out + r * Tiles * kLanes + t * kLanes, int8_results(w, m, acc[t]));
    }
}

// The float kernels' panel: for each of `rows` output channels from m0, accumulators start at its bias,
// `accumulate(m, acc)` adds its products, and they land in out[r]. Inlined at each call for the reason
// bf16_panel is (avx512_bf16.cpp).
template <int Tiles, typename Accumulate>
[[gnu::always_inline]] inline void float_panel(const float* bias, std::int64_t m0, std::int64_t rows, float* out,
                                               Accumulate accumulate) {
    for (std::int64_t r = 0; r < rows; ++r) {
        __m256 acc[Tiles];
        for (int t = 0; t < Tiles; ++t) acc[t] = _mm256_set1_ps(bias ? bias[m0 + r] : 0.0f);
        accumulate(m0 + r, acc);
        for (int t = 0; t < Tiles; ++t) _mm256_store_ps(out + r * Tiles * kLanes + t * kLanes, acc[t]);
    }
}

template <int Tiles>
[[gnu::always_inline]] inline void f32_panel(const F32Csr& w, const float* packed, std::int64_t padded_n,
                                             std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
    float_panel<Tiles>(w.bias, m0, rows, out, [&](std::int64_t m, __m256* acc) {
        for (std::int32_t j = w.row_ptr[m]; j < w.row_ptr[m + 1]; ++j) {
            const __m256 weight = _mm256_set1_ps(w.values[j]);
            const float* a = packed + static_cast<std::int64_t>(w.col[j]) * padded_n + n0;
            for (int t = 0; t < Tiles; ++t) acc[t] = _mm256_fmadd_ps(_mm256_load_ps(a + kLanes * t), weight, acc[t]);
        }
    });
}

// The bf16 pairs on CPUs without AVX-512 BF16: each pair's two weights widened to float32 and two FMAs
// on activations packed already rounded to bfloat16, so every product is exact, as in vdpbf16ps.
template <int Tiles>
[[gnu::always_inline]] inline void bf16_panel(const Bf16Pairs& w, const float* packed, std::int64_t padded_n,
                                              std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
    float_panel<Tiles>(w.bias, m0, rows, out, [&](std::int64_t m, __m256* acc) {
        for (std::int32_t b = w.row_ptr[m]; b < w.row_ptr[m + 1]; ++b) {
            const __m256 w0 = _mm256_set1_ps(from_bf16(w.values[2 * static_cast<std::int64_t>(b)]));
            const __m256 w1 = _mm256_set1_ps(from_bf16(w.values[2 * static_cast<std::int64_t>(b) + 1]));
            const float* a0 = packed + 2 * static_cast<std::int64_t>(w.block_col[b]) * padded_n + n0;
            const float* a1 = a0 + padded_n;
            for (int t = 0; t < Tiles; ++t) {
                acc[t] = _mm256_fmadd_ps(_mm256_load_ps(a0 + kLanes * t), w0, acc[t]);
                acc[t] = _mm256_fmadd_ps(_mm256_load_ps(a1 + kLanes * t), w1, acc[t]);
            }
        }
    });
}

// The layouts (avx2_common.hpp) of the three kernels: INT8 here, the float two below.
struct Int8PairsLayout {
    using Word = std::int32_t;
    const Int8Blocks& w;
    float act_scale;
    std::int32_t act_zero_point;

    std::int64_t rows() const { return w.rows; }
    OutputLayout output() const { return output_of(w); }
    std::int64_t words() const { return 2 * ceil_div(w.cols, 4); }
    template <typename In>
    void pack(const In* x, std::int64_t n, std::int64_t x_stride, Word* packed, std::int64_t width,
              std::int64_t first) const {
        pack_int16_pairs(x, n, x_stride, w.cols, words(), act_scale, act_zero_point, w.norm, packed, width,
                         first);
    }
    template <int Tiles>
    [[gnu::always_inline]] void panel(const Word* packed, std::int64_t width, std::int64_t n0, std::int64_t m0,
                                      std::int64_t rows, float* out) const {
        int8_panel<Tiles>(w, packed, width, n0, m0, rows, out);
    }
};

// F32Csr or Bf16Pairs: the activations packed as floats (rounded to bfloat16 for pairs, whose packing
// holds channels in twos).
template <typename Weight>
struct FloatLayout {
    static constexpr bool kBf16 = std::is_same_v<Weight, Bf16Pairs>;
    using Word = float;
    const Weight& w;

    std::int64_t rows() const { return w.rows; }
    OutputLayout output() const { return {}; }
    std::int64_t words() const { return kBf16 ? round_up(w.cols, 2) : w.cols; }
    void pack(const float* x, std::int64_t n, std::int64_t x_stride, Word* packed, std::int64_t width,
              std::int64_t first) const {
        pack_floats<kBf16>(x, n, x_stride, w.cols, words(), packed, width, first);
    }
    template <int Tiles>
    [[gnu::always_inline]] void panel(const Word* packed, std::int64_t width, std::int64_t n0, std::int64_t m0,
                                      std::int64_t rows, float* out) const {
        if constexpr (kBf16) {
            bf16_panel<Tiles>(w, packed, width, n0, m0, rows, out);
        } else {
            f32_panel<Tiles>(w, packed, width, n0, m0, rows, out);
        }
    }
};

}  // namespace

template <typename In, typename Out>
void int8_avx2(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
               std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for) {
    run_product(Int8PairsLayout{w, act_scale, act_zero_point}, x, n, x_stride, y, parallel_for);
}

VITSPARSE_INT8_IO_PAIRS(int8_avx2, VITSPARSE_INT8_ARGS);
VITSPARSE_INT8_CODE_PAIRS(int8_avx2, VITSPARSE_INT8_ARGS);

void f32_avx2(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
              const ParallelFor& parallel_for) {
    run_product(FloatLayout<F32Csr>{w}, x, n, x_stride, y, parallel_for);
}

void bf16_avx2(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
               const ParallelFor& parallel_for) {
    run_product(FloatLayout<Bf16Pairs>{w}, x, n, x_stride, y, parallel_for);
}

}  // namespace vitsparse::detail
