// The INT8 kernel for CPUs with AVX-VNNI but without AVX-512 (Intel's Alder Lake and later client cores,
// the Sierra Forest Xeons): vpdpbusd on 256-bit registers, one instruction per 1×4 block and 8 input
// rows. Activations are packed as uint8 codes, 4 consecutive channels of a row per 32-bit lane (the
// layout of the AVX-512 kernel, 8 rows per tile instead of 16); the zero point comes off each row's
// sums at the end, through its weights' code sum.
#include "avx2_common.hpp"

namespace vitsparse::detail {

namespace {

// round(x × inverse) + zero point for 8 floats, left for the saturating packs: NaN, -inf and values
// below -2^31 convert to INT_MIN (code 0, as quantize_u8 gives them); the min keeps +inf and large
// values from doing the same.
inline __m256i unsaturated_codes(__m256 values, __m256 inverse, __m256i zero_point) {
    return _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(_mm256_set1_ps(512.0f), _mm256_mul_ps(values, inverse))),
                            zero_point);
}

// Quantizes the 8 input rows from `first` (normalized where `norm` is active) into the group layout:
// 32-bit element (g, i) of `packed`, at g × padded_n + i, holds channels 4g..4g+3 of row i as uint8
// codes. 32 channels at a time: per row, two saturating packs turn its 32 codes into 8 groups (in the
// order 0 2 4 6 | 1 3 5 7, which one permute puts right); an 8×8 transpose gives each group its 8 rows.
template <typename In>
void pack_u8_groups(const In* x, std::int64_t n, std::int64_t x_stride, std::int64_t cols, std::int64_t groups,
                    float scale, std::int32_t zero_point, const LayerNorm& norm, std::int32_t* packed,
                    std::int64_t padded_n, std::int64_t first) {
    const PackedRows<In> source(x, n, x_stride, cols, first, norm);
    const __m256 inverse = _mm256_set1_ps(1.0f / scale);
    const __m256i zero_v = _mm256_set1_epi32(zero_point);
    const __m256i group_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (std::int64_t k0 = 0; k0 < cols; k0 += 4 * kLanes) {
        __m256 rows[8];
        for (int r = 0; r < 8; ++r) {
            __m256i codes[4];  // channels k0 + 8q .. k0 + 8q + 7; past cols: 0.0, the zero point
            for (int q = 0; q < 4; ++q) {
                codes[q] = unsaturated_codes(source.load(r, k0 + q * kLanes), inverse, zero_v);
            }
            const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(codes[0], codes[1]),
                                                      _mm256_packs_epi32(codes[2], codes[3]));
            rows[r] = _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(bytes, group_order));
        }
        transpose8(rows);
        for (std::int64_t g = 0; g < kLanes && k0 / 4 + g < groups; ++g) {
            _mm256_store_ps(reinterpret_cast<float*>(packed + (k0 / 4 + g) * padded_n + first), rows[g]);
        }
    }
}

// acc += 4-byte dot products of activations (uint8) and weights (int8), per 32-bit lane. Written as asm
// for the reason avx512_int8.hpp gives: gcc copies the accumulator around the intrinsic (here it even
// spilled accumulators to the stack).
inline __m256i dot_accumulate(__m256i acc, __m256i activations, __m256i weights) {
    asm("%{vex%} vpdpbusd %[w], %[a], %[acc]" : [acc] "+x"(acc) : [a] "x"(activations), [w] "x"(weights));
    return acc;
}

// Inlined at each call for the reason bf16_panel is (avx512_bf16.cpp).
template <int Tiles>
[[gnu::always_inline]] inline void int8_panel(const Int8Blocks& w, const std::int32_t* packed,
                                              std::int64_t padded_n, std::int64_t n0, std::int64_t m0,
                                              std::int64_t rows, std::int32_t zero_point, float* out) {
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t m = m0 + r;
        __m256i acc[Tiles];
        const __m256i start = _mm256_set1_epi32(-zero_point * w.row_sums[m]);
        for (int t = 0; t < Tiles; ++t) acc[t] = start;
        for (std::int32_t b = w.row_ptr[m]; b < w.row_ptr[m + 1]; ++b) {
            std::int32_t block;
            std::memcpy(&block, w.values + 4 * static_cast<std::int64_t>(b), 4);
            const __m256i weights = _mm256_set1_epi32(block);
            const std::int32_t* a = packed + static_cast<std::int64_t>(w.block_col[b]) * padded_n + n0;
            for (int t = 0; t < Tiles; ++t) {
                acc[t] = dot_accumulate(acc[t], _mm256_load_si256(reinterpret_cast<const __m256i*>(a + kLanes * t)),
                                        weights);
            }
        }
        for (int t = 0; t < Tiles; ++t) _mm256_store_ps(out + r * Tiles * kLanes + t * kLanes, int8_results(w, m, acc[t]));
    }
}

// The kernel's layout (avx2_common.hpp).
struct Int8GroupsLayout {
    using Word = std::int32_t;
    const Int8Blocks& w;
    float act_scale;
    std::int32_t act_zero_point;

    std::int64_t rows() const { return w.rows; }
    OutputLayout output() const { return output_of(w); }
    std::int64_t words() const { return ceil_div(w.cols, 4); }
    template <typename In>
    void pack(const In* x, std::int64_t n, std::int64_t x_stride, Word* packed, std::int64_t width,
              std::int64_t first) const {
        pack_u8_groups(x, n, x_stride, w.cols, words(), act_scale, act_zero_point, w.norm, packed, width, first);
    }
    template <int Tiles>
    [[gnu::always_inline]] void panel(const Word* packed, std::int64_t width, std::int64_t n0, std::int64_t m0,
                                      std::int64_t rows, float* out) const {
        int8_panel<Tiles>(w, packed, width, n0, m0, rows, act_zero_point, out);
    }
};

}  // namespace

template <typename In, typename Out>
void int8_avx2_vnni(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                    std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for) {
    run_product(Int8GroupsLayout{w, act_scale, act_zero_point}, x, n, x_stride, y, parallel_for);
}

VITSPARSE_INT8_IO_PAIRS(int8_avx2_vnni, VITSPARSE_INT8_ARGS);
VITSPARSE_INT8_CODE_PAIRS(int8_avx2_vnni, VITSPARSE_INT8_ARGS);

}  // namespace vitsparse::detail
