// AVX-512 BF16 kernel: 1×2 bfloat16 blocks, what one vdpbf16ps lane multiplies. Activations are rounded
// to bfloat16 and packed column-major: each 64-byte line holds a pair of input channels of 16 input
// rows. Otherwise as the INT8 kernel: 16 output channels × a panel of input rows per task, 16×16
// transposes on the way out, bias added in float32.
#include "avx512_common.hpp"

namespace vitsparse::detail {

namespace {

constexpr int kTiles = 8;

// acc += a[2i]·w[2i] + a[2i+1]·w[2i+1] per float lane; asm for the reason dot_accumulate gives.
inline __m512 pair_accumulate(__m512 acc, __m512i activations, __m512i weights) {
    asm("vdpbf16ps %[w], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(activations), [w] "v"(weights));
    return acc;
}

// 16 input rows from `first` (rows past n read as 0) into the panel layout: per channel pair, 64 bytes
// holding the pair of each row in row order. 16 channels (8 pairs) at a time: each row's 16 floats
// rounded to 8 pairs, then a 16×16 transpose of 32-bit lanes.
void pack_bf16(const float* x, std::int64_t n, std::int64_t x_stride, std::int64_t cols, std::uint16_t* packed,
               std::int64_t padded_n, std::int64_t first) {
    const std::int64_t pairs = ceil_div(cols, 2);
    for (std::int64_t k0 = 0; k0 < cols; k0 += 16) {
        const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<std::int64_t>(16, cols - k0)) - 1u);
        __m512 tile[16];
        for (int r = 0; r < 16; ++r) {
            const __m512 values = first + r < n ? _mm512_maskz_loadu_ps(lanes, x + (first + r) * x_stride + k0)
                                                : _mm512_setzero_ps();
            const __m256i rounded = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(values));
            tile[r] = _mm512_castsi512_ps(_mm512_castsi256_si512(rounded));
        }
        transpose16(tile);  // tile[p] = pair p of the 16 rows
        for (std::int64_t p = 0; p < 8 && k0 / 2 + p < pairs; ++p) {
            _mm512_store_ps(reinterpret_cast<float*>(packed + ((k0 / 2 + p) * padded_n + first) * 2), tile[p]);
        }
    }
}

// Inlined at each call, so that the panel-per-task layout's constant stride reaches the inner loop
// (shared with the other layout, its index arithmetic took a multiply per block: fc1 at batch 1 ran
// 25 % slower).
template <int Tiles>
[[gnu::always_inline]] inline void bf16_panel(const Bf16Pairs& w, const std::uint16_t* packed,
                                              std::int64_t padded_n, std::int64_t n0, std::int64_t m0,
                                              std::int64_t rows, float* out) {
    float_panel<Tiles>(w.bias, m0, rows, out, [&](std::int64_t m, __m512* acc) {
        for (std::int32_t b = w.row_ptr[m]; b < w.row_ptr[m + 1]; ++b) {
            std::int32_t pair;
            std::memcpy(&pair, w.values + 2 * static_cast<std::int64_t>(b), 4);
            const __m512i weights = _mm512_set1_epi32(pair);
            const std::uint16_t* a = packed + (static_cast<std::int64_t>(w.block_col[b]) * padded_n + n0) * 2;
#pragma GCC unroll 8
            for (int t = 0; t < Tiles; ++t) acc[t] = pair_accumulate(acc[t], _mm512_load_si512(a + 32 * t), weights);
        }
    });
}

template <int Tiles>
struct Bf16Panel {
    template <typename... Args>
    static void run(Args&&... args) { bf16_panel<Tiles>(std::forward<Args>(args)...); }
};

// The panel of Tiles × 16 input rows from n0, packed into this thread's workspace, through every output
// channel into y (the panel-per-task layout, internal.hpp).
template <int Tiles>
struct OwnPanel {
    static void run(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, std::int64_t n0,
                    float* y) {
        constexpr std::int64_t width = Tiles * kLanes;
        const auto bytes = static_cast<std::size_t>(round_up(ceil_div(w.cols, 2), 8) * width * 4);
        auto* packed = static_cast<std::uint16_t*>(workspace(bytes));
        for (int t = 0; t < Tiles; ++t) {
            pack_bf16(x + n0 * x_stride, n - n0, x_stride, w.cols, packed, width, t * kLanes);
        }
        panel_to_y<Tiles>(w.rows, n0, n, y, [&](std::int64_t m0, std::int64_t rows, float* out) {
            bf16_panel<Tiles>(w, packed, width, 0, m0, rows, out);
        });
    }
};

}  // namespace

void bf16_avx512(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                 const ParallelFor& parallel_for) {
    if (run_own_panels<OwnPanel>(n, w.rows, y, parallel_for, 4, w, x, n, x_stride)) return;
    const std::int64_t padded_n = round_up(n, kLanes), pairs = round_up(ceil_div(w.cols, 2), 8);
    auto* packed = static_cast<std::uint16_t*>(workspace(static_cast<std::size_t>(pairs * padded_n * 4)));
    parallel_for(static_cast<std::size_t>(padded_n / kLanes), [&](std::size_t chunk) {
        pack_bf16(x, n, x_stride, w.cols, packed, padded_n, static_cast<std::int64_t>(chunk) * kLanes);
    });
    run_tasks<kTiles>(w.rows, n, padded_n, y, parallel_for,
                      [&](int tiles, std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
        run_panel<kTiles, Bf16Panel>(tiles, w, packed, padded_n, n0, m0, rows, out);
    });
}

}  // namespace vitsparse::detail
