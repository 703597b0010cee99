// AVX-512 kernels, one layer per call. Activations are packed column-major so that one 64-byte load
// holds 16 input rows: for INT8, 4 consecutive input channels per row as uint8 (what
// vpdpbusd multiplies with a broadcast 1×4 block; avx512_int8.hpp), for f32 one channel per row. Each
// task computes 16 output channels × one panel of input rows, then transposes 16×16 tiles to write y
// row-major with scale and bias applied.
#include "avx512_int8.hpp"

namespace vitsparse::detail {

namespace {

constexpr int kF32Tiles = 4;

// Inlined at each call for the reason bf16_panel is (avx512_bf16.cpp).
template <int Tiles>
[[gnu::always_inline]] inline void f32_panel(const F32Csr& w, const float* packed, std::int64_t padded_n,
                                             std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
    float_panel<Tiles>(w.bias, m0, rows, out, [&](std::int64_t m, __m512* acc) {
        for (std::int32_t j = w.row_ptr[m]; j < w.row_ptr[m + 1]; ++j) {
            const __m512 weight = _mm512_set1_ps(w.values[j]);
            const float* a = packed + static_cast<std::int64_t>(w.col[j]) * padded_n + n0;
            for (int t = 0; t < Tiles; ++t) acc[t] = _mm512_fmadd_ps(_mm512_load_ps(a + kLanes * t), weight, acc[t]);
        }
    });
}

template <int Tiles>
struct F32Panel {
    template <typename... Args>
    static void run(Args&&... args) { f32_panel<Tiles>(std::forward<Args>(args)...); }
};

// The 16 input rows from `first` (rows past n read as 0), one 64-byte line per input channel, lines
// `width` floats apart: a 16×16 transpose per 16 channels.
void pack_f32(const float* x, std::int64_t n, std::int64_t x_stride, std::int64_t cols, float* packed,
              std::int64_t width, std::int64_t first) {
    for (std::int64_t k0 = 0; k0 < cols; k0 += kLanes) {
        const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<std::int64_t>(kLanes, cols - k0)) - 1u);
        __m512 tile[16];
        for (int r = 0; r < 16; ++r) {
            tile[r] = first + r < n ? _mm512_maskz_loadu_ps(lanes, x + (first + r) * x_stride + k0)
                                    : _mm512_setzero_ps();
        }
        transpose16(tile);
        for (int c = 0; c < 16; ++c) _mm512_store_ps(packed + (k0 + c) * width + first, tile[c]);
    }
}

// The panel of Tiles × 16 input rows from n0, packed into this thread's workspace, through every output
// channel into y (the panel-per-task layout, internal.hpp).
template <int Tiles>
struct F32OwnPanel {
    static void run(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, std::int64_t n0,
                    float* y) {
        constexpr std::int64_t width = Tiles * kLanes;
        const auto bytes = static_cast<std::size_t>(round_up(w.cols, kLanes) * width) * sizeof(float);
        auto* packed = static_cast<float*>(workspace(bytes));
        for (int t = 0; t < Tiles; ++t) {
            pack_f32(x + n0 * x_stride, n - n0, x_stride, w.cols, packed, width, t * kLanes);
        }
        panel_to_y<Tiles>(w.rows, n0, n, y, [&](std::int64_t m0, std::int64_t rows, float* out) {
            f32_panel<Tiles>(w, packed, width, 0, m0, rows, out);
        });
    }
};

// The INT8 panel of Tiles × 16 input rows from n0, packed into this thread's workspace, through every
// output channel into y (the panel-per-task layout, internal.hpp).
template <int Tiles>
struct OwnPanel {
    template <typename In, typename Out>
    static void run(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                    std::int32_t act_zero_point, std::int64_t n0, Out* y) {
        const auto bytes = static_cast<std::size_t>(ceil_div(w.cols, 4) * Tiles * kLanes * 4);
        auto* packed = static_cast<std::uint8_t*>(workspace(bytes));
        pack_panel<Tiles>(x_rows(w, x, x_stride), n, w.cols, act_scale, act_zero_point, w.norm, n0, packed);
        int8_panel_to_y<Tiles>(w, packed, act_zero_point, n0, n, y);
    }
};

constexpr std::int64_t kHeadsOwnPanelTiles = 32;  // tiles a thread, at least, for own panels split into heads

// Panels that would leave threads idle: x is packed once, panel by panel (every panel contiguous, so
// that a task's loads stay within a few pages), then the tasks are row blocks × panels.
template <typename In, typename Out>
void int8_shared_panels(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for) {
    const OutputLayout output = output_of(w);
    // split into heads, every thread reads every panel: panels of the own-panel width, which stay in L1
    const int full_tiles = panel_tiles(w.rows, output.row_major() ? kInt8Tiles : kOwnPanelTiles, sizeof(Out));
    const std::int64_t width = full_tiles * kLanes;
    const std::int64_t padded_n = round_up(n, kLanes), panel_bytes = ceil_div(w.cols, 4) * width * 4;
    auto* packed = static_cast<std::uint8_t*>(
        workspace(static_cast<std::size_t>(ceil_div(padded_n, width) * panel_bytes)));
    const XRows<In> rows = x_rows(w, x, x_stride);
    parallel_for(static_cast<std::size_t>(padded_n / kLanes), [&](std::size_t chunk) {
        const std::int64_t first = static_cast<std::int64_t>(chunk) * kLanes, n0 = first / width * width;
        pack_int8(rows.shifted(n0), n - n0, w.cols, act_scale, act_zero_point, w.norm,
                  packed + n0 / width * panel_bytes, width, first - n0);
    });
    run_task_grid<kLanes, kInt8Tiles>(w.rows, n, padded_n, full_tiles, y, parallel_for,
                                      [&](int tiles, std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
        run_panel<kInt8Tiles, Int8Panel>(tiles, w, packed + n0 / width * panel_bytes, width, m0, rows,
                                         act_zero_point, out);
    }, store_into(store_transposed_to, output, w.rows, n, y), !output.row_major());
}

}  // namespace

template <typename In, typename Out>
void int8_avx512(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                 std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for) {
    // Split into heads, only over many tiles a thread: each thread then writes every head's rows of its
    // own tokens, which beat the shared panels' contiguous runs of heads over DeiT-S's 197 tiles at batch
    // 16 (2-5 % of the model on this VM); over 13 at batch 1 their even split of the rows wins.
    const auto threads = static_cast<std::int64_t>(std::max<std::size_t>(1, parallel_for.threads));
    if ((w.heads == 0 || ceil_div(n, kLanes) >= kHeadsOwnPanelTiles * threads) &&
        run_own_panels<OwnPanel>(n, w.rows, y, parallel_for, 8, w, x, n, x_stride, act_scale, act_zero_point)) {
        return;
    }
    int8_shared_panels(w, x, n, x_stride, act_scale, act_zero_point, y, parallel_for);
}

VITSPARSE_INT8_IO_PAIRS(int8_avx512, VITSPARSE_INT8_ARGS);
VITSPARSE_INT8_CODE_PAIRS(int8_avx512, VITSPARSE_INT8_ARGS);

void f32_avx512(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                const ParallelFor& parallel_for) {
    if (run_own_panels<F32OwnPanel>(n, w.rows, y, parallel_for, 4, w, x, n, x_stride)) return;
    const std::int64_t padded_n = round_up(n, kLanes), padded_k = round_up(w.cols, kLanes);
    auto* packed = static_cast<float*>(workspace(static_cast<std::size_t>(padded_k * padded_n) * sizeof(float)));
    parallel_for(static_cast<std::size_t>(padded_n / kLanes), [&](std::size_t chunk) {
        pack_f32(x, n, x_stride, w.cols, packed, padded_n, static_cast<std::int64_t>(chunk) * kLanes);
    });
    run_tasks<kF32Tiles>(w.rows, n, padded_n, y, parallel_for,
                         [&](int tiles, std::int64_t n0, std::int64_t m0, std::int64_t rows, float* out) {
        run_panel<kF32Tiles, F32Panel>(tiles, w, packed, padded_n, n0, m0, rows, out);
    });
}

}  // namespace vitsparse::detail
