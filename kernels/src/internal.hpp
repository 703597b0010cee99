// What the per-ISA kernel files share: the workspace, the task grid and their entry points.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>

#include "vitsparse_kernels.hpp"

namespace vitsparse::detail {

// Every file compiles with its own instruction-set flags, so the helpers below get internal linkage:
// the linker must never pick one file's AVX-512 copy for the scalar path.
namespace {

constexpr std::int64_t kRowBlock = 16;  // output channels per task: one 16×16 transpose on the way out

inline std::int64_t round_up(std::int64_t value, std::int64_t multiple) {
    return (value + multiple - 1) / multiple * multiple;
}

inline std::int64_t ceil_div(std::int64_t value, std::int64_t divisor) {
    return (value + divisor - 1) / divisor;
}

// A 64-byte aligned scratch buffer per calling thread, grown on demand and kept between calls
// (a fresh multi-megabyte allocation per call would page-fault on every inference).
inline void* workspace(std::size_t bytes) {
    struct Free {
        void operator()(void* p) const { std::free(p); }
    };
    thread_local std::unique_ptr<void, Free> buffer;
    thread_local std::size_t capacity = 0;
    if (bytes > capacity) {
        std::size_t size = static_cast<std::size_t>(round_up(static_cast<std::int64_t>(bytes), 4096));
        void* fresh = std::aligned_alloc(64, size);
        if (fresh == nullptr) throw std::bad_alloc();
        buffer.reset(fresh);
        capacity = size;
    }
    return buffer.get();
}

// Where the rows of an INT8 product's x lie: row-major, `stride` elements apart, or head by head
// (Int8Blocks::x_heads): row i's channels in runs of head_dim, one per head, each a row of its batch
// item's [tokens, head_dim] matrix of that head. `first` counts rows already passed (shifted).
template <typename In>
struct XRows {
    const In* x;
    std::int64_t stride;
    std::int64_t heads = 0, tokens = 1, head_dim = 0, first = 0;

    // Row i's first channel, and channel k's place from there (k, k + 1, ... up to the head's end lie
    // one after the other).
    const In* row(std::int64_t i) const {
        i += first;
        return heads == 0 ? x + i * stride : x + (i / tokens * heads * tokens + i % tokens) * head_dim;
    }
    std::int64_t column(std::int64_t k) const {
        return heads == 0 ? k : k / head_dim * tokens * head_dim + k % head_dim;
    }
    XRows shifted(std::int64_t rows) const {
        XRows rest = *this;
        rest.first += rows;
        return rest;
    }
};

// x's rows as `w` says they lie.
template <typename In>
XRows<In> x_rows(const Int8Blocks& w, const In* x, std::int64_t x_stride) {
    if (w.x_heads == 0) return {x, x_stride};
    return {x, x_stride, w.x_heads, w.tokens, w.cols / w.x_heads};
}

// QuantizeLinear to uint8 as OpenVINO and torch compute it: round half to even of x × (1 / scale),
// plus the zero point, saturated. (ONNX divides by the scale; the two differ on rare near-ties.)
inline std::int32_t quantize_u8(float x, float inverse_scale, std::int32_t zero_point) {
    float code = __builtin_nearbyintf(x * inverse_scale) + static_cast<float>(zero_point);
    return static_cast<std::int32_t>(std::min(255.0f, std::max(0.0f, code)));
}

// QuantizeLinear then DequantizeLinear to uint8: the nearest value of the quantized grid.
inline float fake_quantize_u8(float x, float scale, std::int32_t zero_point) {
    return static_cast<float>(quantize_u8(x, 1.0f / scale, zero_point) - zero_point) * scale;
}

// An INT8 layer's result for output channel m from its exact sum: sum × scale, fake-quantized when the
// layer quantizes its output, plus the bias. (The vector kernels compute the same, lane by lane.)
// With w.codes, the result's INT8 code (as a float) instead.
inline float int8_result(const Int8Blocks& w, std::int64_t m, std::int32_t sum) {
    float value = static_cast<float>(sum) * w.scale[m];
    const float bias = w.bias ? w.bias[m] : 0.0f;
    if (w.codes) return static_cast<float>(quantize_u8(value + bias, 1.0f / w.out_scale, w.out_zero_point) - 128);
    if (w.out_scale > 0.0f) value = fake_quantize_u8(value, w.out_scale, w.out_zero_point);
    return value + bias;
}

// float -> bfloat16, rounding to nearest even (what vcvtneps2bf16 does; NaN stays NaN). Branch-free, so
// that loops over it vectorize.
inline std::uint16_t to_bf16(float value) {
    std::uint32_t bits;
    std::memcpy(&bits, &value, 4);
    const std::uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const std::uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return static_cast<std::uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float from_bf16(std::uint16_t value) {
    const std::uint32_t bits = static_cast<std::uint32_t>(value) << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// One row of x under a LayerNorm (Int8Blocks::norm): x × rstd + shift is the row normalized, shift being
// −mean × rstd. Each instruction set computes it over the row (row_scale) where it quantizes x.
struct RowScale {
    float rstd = 1.0f;
    float shift = 0.0f;
};

// From the row's mean and its sum of (x − mean)² over `cols` channels.
inline RowScale row_scale_of(float mean, float centered_squares, std::int64_t cols, float epsilon) {
    const float rstd = 1.0f / std::sqrt(centered_squares / static_cast<float>(cols) + epsilon);
    return {rstd, -mean * rstd};
}

// The INT8 kernels' x and y elements: float, or Bf16, which a float result is rounded to once; y also
// std::int8_t, which holds codes (Int8Blocks::codes: the float results are whole numbers in its range).
inline float to_float(float value) { return value; }
inline float to_float(Bf16 value) { return from_bf16(value.bits); }
inline float to_float(std::int8_t value) { return value; }
inline void store_value(float* to, float value) { *to = value; }
inline void store_value(Bf16* to, float value) { to->bits = to_bf16(value); }
inline void store_value(std::int8_t* to, float value) { *to = static_cast<std::int8_t>(value); }

// The blocks of up to kRowBlock output channels a product writes y in. When y starts inside a 64-byte
// line (OpenVINO's output buffers do) and every row shares that offset, the first block is shorter, so
// that all the others write whole lines (half lines of bfloat16) instead of splitting each store across
// two. Not where y is split into heads (row_major false): blocks start at 0, and since a head's width is
// a multiple of 16, none spans two heads (a shift per head measured no faster).
struct RowBlocks {
    std::int64_t rows;
    std::int64_t shift;  // channels the first block lacks: y's offset within a block's bytes, in elements
    std::int64_t count;

    // element_bytes: y's element size (4 for float, 2 for Bf16)
    RowBlocks(std::int64_t rows_, const void* y, std::size_t element_bytes, bool row_major = true)
        : rows(rows_), shift(row_major ? line_offset(y, rows_, static_cast<std::int64_t>(element_bytes)) : 0),
          count(ceil_div(rows_ + shift, kRowBlock)) {}
    std::int64_t first(std::int64_t block) const { return std::max<std::int64_t>(0, block * kRowBlock - shift); }
    std::int64_t size(std::int64_t block) const {
        return std::min(block * kRowBlock - shift + kRowBlock, rows) - first(block);
    }

    static std::int64_t line_offset(const void* y, std::int64_t rows, std::int64_t element_bytes) {
        const std::int64_t block_bytes = kRowBlock * element_bytes;  // a line for float
        const auto offset = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(y) %
                                                      static_cast<std::uintptr_t>(block_bytes));
        if (offset % element_bytes != 0 || rows * element_bytes % block_bytes != 0) return 0;
        return offset / element_bytes;
    }
};

// Panels of at most `max_tiles` tiles of `Lanes` input rows over n rows, as even as the tile count
// allows (13 tiles, 8 at most: 7 and 6), for kernels whose tasks each take one whole panel. Given the
// thread count, the panels are as many as a multiple of it where there are tiles enough (197 tiles, 8
// at most, 2 threads: 26 panels, 13 for each thread, instead of 25, 13 for one and 12 for the other).
struct EvenPanels {
    std::int64_t tiles;
    std::int64_t count;

    EvenPanels(std::int64_t n, std::int64_t lanes, std::int64_t max_tiles, std::int64_t threads = 1)
        : tiles(ceil_div(n, lanes)),
          count(std::min(tiles, round_up(ceil_div(tiles, max_tiles), std::max<std::int64_t>(1, threads)))) {}
    std::int64_t first_tile(std::int64_t panel) const { return tiles * panel / count; }
    std::int64_t tile_count(std::int64_t panel) const { return first_tile(panel + 1) - first_tile(panel); }
};

// The tasks of a product: row blocks × column panels, panel-major so that one thread's consecutive
// tasks reuse the same packed activations from cache.
struct TaskGrid {
    RowBlocks blocks;
    std::int64_t panels;
    std::int64_t panel_columns;

    TaskGrid(std::int64_t rows, std::int64_t columns, std::int64_t panel_columns_, const void* y,
             std::size_t element_bytes, bool row_major)
        : blocks(rows, y, element_bytes, row_major), panels(ceil_div(columns, panel_columns_)),
          panel_columns(panel_columns_) {}
    std::size_t size() const { return static_cast<std::size_t>(blocks.count * panels); }
    std::int64_t panel(std::size_t task) const { return static_cast<std::int64_t>(task) / blocks.count; }
    std::int64_t row_block(std::size_t task) const { return static_cast<std::int64_t>(task) % blocks.count; }
};

// Every task of a product, on each instruction set: `compute(tiles, n0, m0, rows, out)` fills
// out[16][tiles × Lanes] for `rows` output channels from m0 (the rest stay zero) over the panel of
// input rows from n0 (panels of `panel_tiles` tiles, the last one narrower); then `store(out,
// out_stride, columns, rows, y_block, y_stride)` writes it to y row-major, or, where y is split into
// heads, where y_block's place in the row-major grid says (store_into).
// Split into heads, a task per (panel, block) would leave each thread's results spread over all of y,
// and threads would share the lines where their panels meet in the rows of kᵀ. Instead each thread
// runs its contiguous part of the row blocks over every panel: it writes one contiguous part of y (the
// part the next node's thread reads), whole rows of kᵀ and no line another thread writes.
template <std::int64_t Lanes, int MaxTiles, typename Out, typename Compute, typename Store>
void run_task_grid(std::int64_t out_features, std::int64_t n, std::int64_t padded_n, int panel_tiles, Out* y,
                   const ParallelFor& parallel_for, Compute compute, Store store, bool split_into_heads = false) {
    const TaskGrid grid(out_features, padded_n, panel_tiles * Lanes, y, sizeof(Out), !split_into_heads);
    auto run = [&](std::int64_t panel, std::int64_t block) {
        alignas(64) float out[kRowBlock * MaxTiles * Lanes];
        const std::int64_t n0 = panel * grid.panel_columns;
        const std::int64_t m0 = grid.blocks.first(block), rows = grid.blocks.size(block);
        const std::int64_t columns = std::min(grid.panel_columns, padded_n - n0);
        const int tiles = static_cast<int>(columns / Lanes);
        compute(tiles, n0, m0, rows, out);
        store(out, tiles * Lanes, std::min(columns, n - n0), rows, y + n0 * out_features + m0, out_features);
    };
    if (!split_into_heads) {
        parallel_for(grid.size(), [&](std::size_t task) { run(grid.panel(task), grid.row_block(task)); });
        return;
    }
    const auto parts = static_cast<std::int64_t>(std::max<std::size_t>(1, parallel_for.threads));
    parallel_for(static_cast<std::size_t>(parts), [&](std::size_t part) {
        const auto p = static_cast<std::int64_t>(part);
        const std::int64_t first = grid.blocks.count * p / parts, end = grid.blocks.count * (p + 1) / parts;
        for (std::int64_t panel = 0; panel < grid.panels; ++panel) {
            for (std::int64_t block = first; block < end; ++block) run(panel, block);
        }
    });
}

// How an INT8 product writes y (Int8Blocks): row-major, plus an addend laid out as y and of its element
// type (or nullptr), or split into attention heads.
struct OutputLayout {
    const void* addend = nullptr;
    std::int64_t heads = 0;
    std::int64_t tokens = 0;

    bool row_major() const { return heads == 0; }
};

inline OutputLayout output_of(const Int8Blocks& w) { return {w.addend, w.heads, w.tokens}; }

// to[0, count) = from[0, count) in fixed-size copies of 16 floats (one vector move on AVX-512, the
// file's widest on the others), the last one overlapping the one before where count is not a multiple
// of 16; one float at a time only below 16.
inline void copy_row(float* to, const float* from, std::int64_t count) {
    if (count < 16) {
        for (std::int64_t j = 0; j < count; ++j) to[j] = from[j];
        return;
    }
    std::int64_t j = 0;
    for (; j + 16 <= count; j += 16) __builtin_memcpy(to + j, from + j, 16 * sizeof(float));
    if (j < count) __builtin_memcpy(to + count - 16, from + count - 16, 16 * sizeof(float));
}

// The same rounded to bfloat16 (a loop the compiler vectorizes with the file's instruction set).
inline void copy_row(Bf16* to, const float* from, std::int64_t count) {
    for (std::int64_t j = 0; j < count; ++j) to[j].bits = to_bf16(from[j]);
}

// The same as codes (whole numbers in [-128, 127]).
inline void copy_row(std::int8_t* to, const float* from, std::int64_t count) {
    for (std::int64_t j = 0; j < count; ++j) to[j] = static_cast<std::int8_t>(from[j]);
}

// Where a qkv product's results go when split into heads (Int8Blocks::heads): the slab of each part,
// batch item and head, q and v token-major, kᵀ channel-major. All zero for a row-major layout.
struct HeadsLayout {
    std::int64_t heads, tokens, head_dim, batch;

    HeadsLayout(const OutputLayout& layout, std::int64_t rows, std::int64_t n)
        : heads(layout.heads), tokens(layout.tokens), head_dim(heads > 0 ? rows / (3 * heads) : 0),
          batch(tokens > 0 ? n / tokens : 0) {}
    // group: part × heads + head, that is output channel / head_dim
    bool transposed(std::int64_t group) const { return group / heads == 1; }
    std::int64_t slab(std::int64_t group, std::int64_t b) const {
        return ((group / heads * batch + b) * heads + group % heads) * tokens * head_dim;
    }
    std::int64_t offset(std::int64_t i, std::int64_t m) const {
        const std::int64_t group = m / head_dim, d = m % head_dim, t = i % tokens;
        return slab(group, i / tokens) + (transposed(group) ? d * tokens + t : t * head_dim + d);
    }

    // Writes out[count][columns] (channels m0.. of one head × input rows n0..; out_stride apart) into y:
    // kᵀ row by row as it is; q and v through store_to, the transposed store, row by row of tokens. The
    // row addresses step batch item by batch item (no division per row: these run for every block).
    template <typename StoreTo, typename Out>
    void store(StoreTo store_to, const float* out, std::int64_t out_stride, std::int64_t columns, std::int64_t count,
               std::int64_t n0, std::int64_t m0, Out* y) const {
        const std::int64_t group = m0 / head_dim, slab_stride = heads * tokens * head_dim;
        std::int64_t b = n0 / tokens, t = n0 % tokens;
        Out* head = y + slab(group, b);  // this batch item's slab of the head
        if (transposed(group)) {
            head += m0 % head_dim * tokens;
            for (std::int64_t c = 0; c < columns; head += slab_stride, t = 0) {  // one batch item at a time
                const std::int64_t run = std::min(columns - c, tokens - t);
                for (std::int64_t r = 0; r < count; ++r) {
                    copy_row(head + r * tokens + t, out + r * out_stride + c, run);
                }
                c += run;
            }
            return;
        }
        head += m0 % head_dim;
        constexpr std::int64_t kChunk = 128;  // columns whose row addresses are listed at once
        Out* rows_at[kChunk];
        for (std::int64_t c0 = 0; c0 < columns; c0 += kChunk) {  // c0: a multiple of 16, so out + c0 stays aligned
            const std::int64_t width = std::min(kChunk, columns - c0);
            for (std::int64_t c = 0; c < width; ++c, ++t) {
                if (t == tokens) t = 0, head += slab_stride;
                rows_at[c] = head + t * head_dim;
            }
            store_to(out + c0, out_stride, width, count, [&](std::int64_t c) { return rows_at[c]; },
                     static_cast<const Out*>(nullptr), 0);
        }
    }
};

// The store panel_rows_to_y and run_task_grid take for an INT8 product of `rows` output channels over n
// input rows, writing the block at `part` (its place in the row-major grid over y) through
// store_to(out, out_stride, columns, rows, row_at, addend, addend_stride): each ISA's transposed store,
// column c going to row_at(c) plus the addend row at addend + c × addend_stride.
template <typename StoreTo, typename Out>
auto store_into(StoreTo store_to, const OutputLayout& layout, std::int64_t rows, std::int64_t n, Out* y) {
    const HeadsLayout heads(layout, rows, n);
    const auto* addend = static_cast<const Out*>(layout.addend);
    return [=](const float* out, std::int64_t out_stride, std::int64_t columns, std::int64_t count, Out* part,
               std::int64_t y_stride) {
        if (layout.row_major()) {
            store_to(out, out_stride, columns, count, [=](std::int64_t c) { return part + c * y_stride; },
                     addend ? addend + (part - y) : nullptr, y_stride);
            return;
        }
        const std::int64_t offset = part - y;
        heads.store(store_to, out, out_stride, columns, count, offset / rows, offset % rows, y);
    };
}

// Calls Panel<tiles> for the panel's tile count (the last panel may be narrower).
template <int MaxTiles, template <int> class Panel, typename... Args>
void run_panel(int tiles, Args&&... args) {
    if constexpr (MaxTiles >= 1) {
        if (tiles == MaxTiles) return Panel<MaxTiles>::run(std::forward<Args>(args)...);
        if constexpr (MaxTiles > 1) return run_panel<MaxTiles - 1, Panel>(tiles, std::forward<Args>(args)...);
    }
}

// Tiles of 16 input rows per panel for an output of `rows` floats per input row. A task writes 16 × tiles
// lines of y, one per input row; when the row stride maps them onto few L1 sets (every 64 lines apart
// for 1536 channels, 16 KiB / 12 ways) they evict one another before the stores drain, so the panel
// narrows until at most ~16 lines share a set. L1 has 64 sets of 64-byte lines on every x86 CPU with
// AVX-512; the AVX2 kernels count their 8-row tiles in pairs.
inline int panel_tiles(std::int64_t rows, int max_tiles, std::int64_t element_bytes = 4) {
    constexpr std::int64_t kSets = 64;
    const std::int64_t row_bytes = rows * element_bytes;
    const std::int64_t line_stride = row_bytes % 64 == 0 ? row_bytes / 64 % kSets : 1;
    const std::int64_t sets_used = line_stride == 0 ? 1 : kSets / std::gcd(kSets, line_stride);
    int tiles = max_tiles;
    while (tiles > 1 && tiles > sets_used) tiles /= 2;
    return tiles;
}

// The panel-per-task layout (below: panels_fill_threads, panel_rows_to_y, run_panels_per_task). Where
// panels split evenly enough among the threads, each gets one task: it packs its panel into its own
// thread's workspace and runs every output channel over it while the panel is still in cache, so there
// is no second pass over a packed copy of x and no wait between packing and products. Panels are as
// even as the tile count allows.

// Whether `panels` tasks keep `threads` threads busy: at least `busy_per_idle` panels for each turn a
// thread sits idle. The AVX-512 INT8 kernel asks 8 (on 2 threads, 4 panels pass and 7 do not); the
// others, whose products weigh more against their packing, ask 4 (7 pass, 3 do not).
inline bool panels_fill_threads(std::int64_t panels, std::int64_t threads, std::int64_t busy_per_idle) {
    const std::int64_t idle = ceil_div(panels, threads) * threads - panels;
    return idle * busy_per_idle <= panels;
}

// Every output channel (`rows` of them) over one panel of Tiles × Lanes input rows from n0, written to y
// (n rows of `rows` floats or Bf16) 16 channels at a time: compute(m0, count, out) fills out[16][Tiles × Lanes]
// for the `count` channels from m0, and store writes it (as run_task_grid's store does); blocks as
// RowBlocks lays them out for y `row_major` or split into heads.
template <std::int64_t Lanes, int Tiles, typename Out, typename Compute, typename Store>
void panel_rows_to_y(std::int64_t rows, std::int64_t n0, std::int64_t n, Out* y, Compute compute, Store store,
                     bool row_major) {
    constexpr std::int64_t width = Tiles * Lanes;
    alignas(64) float out[kRowBlock * width];
    const RowBlocks blocks(rows, y, sizeof(Out), row_major);
    for (std::int64_t block = 0; block < blocks.count; ++block) {
        const std::int64_t m0 = blocks.first(block), count = blocks.size(block);
        compute(m0, count, out);
        store(out, width, std::min(width, n - n0), count, y + n0 * rows + m0, rows);
    }
}

// Panel<tiles>::run(args..., n0, y) for each panel (at most `panel_tiles` tiles of Lanes rows) of the n
// input rows, one task each, where panels_fill_threads(..., busy_per_idle) says they keep the threads
// busy. Returns false, having run nothing, where the kernel should take its shared layout instead.
template <std::int64_t Lanes, int MaxTiles, template <int> class Panel, typename Out, typename... Args>
bool run_panels_per_task(std::int64_t n, int panel_tiles, Out* y, const ParallelFor& parallel_for,
                         std::int64_t busy_per_idle, const Args&... args) {
    const EvenPanels panels(n, Lanes, panel_tiles);
    const auto threads = static_cast<std::int64_t>(std::max<std::size_t>(1, parallel_for.threads));
    if (!panels_fill_threads(panels.count, threads, busy_per_idle)) return false;
    parallel_for(static_cast<std::size_t>(panels.count), [&](std::size_t panel) {
        const auto p = static_cast<std::int64_t>(panel);
        run_panel<MaxTiles, Panel>(static_cast<int>(panels.tile_count(p)), args..., panels.first_tile(p) * Lanes, y);
    });
    return true;
}

}  // namespace

// The INT8 entry points read x as In and write y (and read the addend) as Out, each float or Bf16; every
// kernel file instantiates the four pairs (INT8_IO_PAIRS), and the per-layer ones also Out = std::int8_t
// for codes (INT8_CODE_PAIRS).
template <typename In, typename Out>
void int8_scalar(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                 std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for);
template <typename In, typename Out>
void int8_avx2(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
               std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for);
template <typename In, typename Out>
void int8_avx2_vnni(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                    std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for);
template <typename In, typename Out>
void int8_avx512(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                 std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for);
template <typename In, typename Out>
void mlp_avx512_vbmi(const Int8Mlp& mlp, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                     std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for);

// The parameter types of the INT8 entry points above (a layer; the MLP), for INT8_IO_PAIRS.
#define VITSPARSE_INT8_ARGS(In, Out)                                                                           \
    const Int8Blocks&, const In*, std::int64_t, std::int64_t, float, std::int32_t, Out*, const ParallelFor&
#define VITSPARSE_MLP_ARGS(In, Out)                                                                            \
    const Int8Mlp&, const In*, std::int64_t, std::int64_t, float, std::int32_t, Out*, const ParallelFor&

// Explicit instantiations of an INT8 entry point for every (In, Out) pair: its file ends with
// VITSPARSE_INT8_IO_PAIRS(entry, VITSPARSE_INT8_ARGS) (or _MLP_ARGS).
#define VITSPARSE_INT8_IO_PAIRS(entry, ...)                                                \
    template void entry<float, float>(__VA_ARGS__(float, float));                          \
    template void entry<Bf16, Bf16>(__VA_ARGS__(Bf16, Bf16));                              \
    template void entry<Bf16, float>(__VA_ARGS__(Bf16, float));                            \
    template void entry<float, Bf16>(__VA_ARGS__(float, Bf16))
// ... and the pairs that write codes (the per-layer entry points only)
#define VITSPARSE_INT8_CODE_PAIRS(entry, ...)                                              \
    template void entry<float, std::int8_t>(__VA_ARGS__(float, std::int8_t));              \
    template void entry<Bf16, std::int8_t>(__VA_ARGS__(Bf16, std::int8_t))
void bf16_scalar(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                 const ParallelFor& parallel_for);
void bf16_avx2(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
               const ParallelFor& parallel_for);
void bf16_avx512(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                 const ParallelFor& parallel_for);
void f32_scalar(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                const ParallelFor& parallel_for);
void f32_avx2(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
              const ParallelFor& parallel_for);
void f32_avx512(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                const ParallelFor& parallel_for);

}  // namespace vitsparse::detail
