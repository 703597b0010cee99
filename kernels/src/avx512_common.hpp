// What the AVX-512 files share: the 16×16 transpose that writes y row-major, and the panel plumbing.
// Included only by files compiled with AVX-512 flags; everything has internal linkage.
#pragma once

#include <immintrin.h>

#include <numeric>

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

// out[r][c] (r < 16 output channels from m0, c < columns input rows from n0) -> y[n0 + c][m0 + r].
void store_transposed(const float* out, std::int64_t out_stride, std::int64_t columns, std::int64_t rows,
                      float* y, std::int64_t y_stride) {
    const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1u);
    for (std::int64_t c0 = 0; c0 < columns; c0 += kLanes) {
        __m512 tile[16];
        for (int r = 0; r < 16; ++r) tile[r] = _mm512_load_ps(out + r * out_stride + c0);
        transpose16(tile);
        const std::int64_t count = std::min<std::int64_t>(kLanes, columns - c0);
        if (rows == kRowBlock) {
            for (std::int64_t c = 0; c < count; ++c) _mm512_storeu_ps(y + (c0 + c) * y_stride, tile[c]);
        } else {
            for (std::int64_t c = 0; c < count; ++c) _mm512_mask_storeu_ps(y + (c0 + c) * y_stride, row_mask, tile[c]);
        }
    }
}

// Tiles per panel for an output of `rows` floats per input row. A task writes 16 × tiles lines of y, one
// per input row; when the row stride maps them onto few L1 sets (every 64 lines apart for 1536
// channels, 16 KiB / 12 ways) they evict one another before the stores drain, so the panel narrows
// until at most ~16 lines share a set. L1 has 64 sets of 64-byte lines on every x86 CPU with AVX-512.
int panel_tiles(std::int64_t rows, int max_tiles) {
    constexpr std::int64_t kSets = 64;
    const std::int64_t line_stride = rows * 4 % 64 == 0 ? rows * 4 / 64 % kSets : 1;
    const std::int64_t sets_used = line_stride == 0 ? 1 : kSets / std::gcd(kSets, line_stride);
    int tiles = max_tiles;
    while (tiles > 1 && tiles > sets_used) tiles /= 2;
    return tiles;
}

// Panels that split evenly among the threads get one task each: it packs its panel into its own thread's
// workspace and runs every output channel over it while the panel is still in cache, so there is no
// second pass over a packed copy of x and no wait between packing and products. Panels hold at most
// kOwnPanelTiles tiles (fewer where panel_tiles says y's row stride needs it), as even as the tile
// count allows.
constexpr int kOwnPanelTiles = 4;

inline EvenPanels own_panels(std::int64_t n, std::int64_t rows) {
    return EvenPanels(n, kLanes, panel_tiles(rows, kOwnPanelTiles));
}

// Whether `panels` tasks keep `threads` threads busy: at least `busy_per_idle` panels for each turn a
// thread sits idle. INT8 asks 8 (on 2 threads, 4 panels pass and 7 do not); bf16, whose products weigh
// more against its packing, asks 4 (7 pass, 3 do not).
inline bool panels_fill_threads(std::int64_t panels, std::int64_t threads, std::int64_t busy_per_idle) {
    const std::int64_t idle = ceil_div(panels, threads) * threads - panels;
    return idle * busy_per_idle <= panels;
}

// Every output channel (`rows` of them) over one panel of Tiles × 16 input rows from n0, written to y
// (n rows of `rows` floats) 16 channels at a time: compute(m0, count, out) fills out[16][Tiles × 16]
// for the `count` channels from m0.
template <int Tiles, typename Compute>
void panel_to_y(std::int64_t rows, std::int64_t n0, std::int64_t n, float* y, Compute compute) {
    constexpr std::int64_t width = Tiles * kLanes;
    alignas(64) float out[kRowBlock * width];
    const RowBlocks blocks(rows, y);
    for (std::int64_t block = 0; block < blocks.count; ++block) {
        const std::int64_t m0 = blocks.first(block), count = blocks.size(block);
        compute(m0, count, out);
        store_transposed(out, width, std::min(width, n - n0), count, y + n0 * rows + m0, rows);
    }
}

// The panel-per-task layout, where panels_fill_threads(..., busy_per_idle) says it keeps the threads busy:
// Panel<tiles>::run(args..., n0, y) for each panel of the n input rows, one task each. Returns false,
// having run nothing, where the kernel should take its shared layout instead.
template <template <int> class Panel, typename... Args>
bool run_own_panels(std::int64_t n, std::int64_t rows, float* y, const ParallelFor& parallel_for,
                    std::int64_t busy_per_idle, const Args&... args) {
    const EvenPanels panels = own_panels(n, rows);
    const auto threads = static_cast<std::int64_t>(std::max<std::size_t>(1, parallel_for.threads));
    if (!panels_fill_threads(panels.count, threads, busy_per_idle)) return false;
    parallel_for(static_cast<std::size_t>(panels.count), [&](std::size_t panel) {
        const auto p = static_cast<std::int64_t>(panel);
        run_panel<kOwnPanelTiles, Panel>(static_cast<int>(panels.tile_count(p)), args..., panels.first_tile(p) * kLanes,
                                         y);
    });
    return true;
}

// The float kernels' panel: for each of 16 output channels from m0, accumulators start at its bias,
// `accumulate(m, acc)` adds its products (rows past `rows` stay zero), and they land in out[r].
template <int Tiles, typename Accumulate>
[[gnu::always_inline]] inline void float_panel(const float* bias, std::int64_t m0, std::int64_t rows, float* out, Accumulate accumulate) {
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
