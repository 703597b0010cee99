// AVX-512 VBMI kernel for a pruned INT8 MLP (Int8Mlp): fc1, the table, fc2, one panel of input rows per
// task. The panel's activations are packed, fc1 runs over them, and its hidden codes land straight in
// the panel layout fc2 reads (4 channels' codes per 32-bit lane, the first channel's in the low byte);
// then fc2 writes the panel's rows of y. A panel's hidden codes (hidden channels × panel rows bytes,
// 192 KiB for 1536 × 128) stay in L2: nothing but y goes to memory.
#include "avx512_int8.hpp"

namespace vitsparse::detail {

namespace {

// table[code] for the 64 byte codes in `codes`: vpermi2b looks up each 128-byte half, the code's top bit
// picks between them.
inline __m512i lookup256(const __m512i table[4], __m512i codes) {
    const __m512i low = _mm512_permutex2var_epi8(table[0], codes, table[1]);
    const __m512i high = _mm512_permutex2var_epi8(table[2], codes, table[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(codes), low, high);
}

// Byte codes of 4 tiles' 16 lanes each, saturated to [0, 255] by the packs (missing tiles: `fill`). Lane
// L (128 bits) holds rows 4L..4L+3 of tile 0, then of tile 1, 2 and 3: byte 16 (r / 4) + 4 q + r % 4 is
// row r of tile q.
inline __m512i pack_four(const __m512i* codes, int count, __m512i fill) {
    const __m512i c1 = count > 1 ? codes[1] : fill, c2 = count > 2 ? codes[2] : fill;
    const __m512i c3 = count > 3 ? codes[3] : fill;
    return _mm512_packus_epi16(_mm512_packs_epi32(codes[0], c1), _mm512_packs_epi32(c2, c3));
}

// For each tile q of pack_four's layout, the source byte of each 32-bit lane r (every byte of the lane
// names it; a mask picks which byte of the lane receives it).
struct TileBytes {
    alignas(64) std::uint8_t index[4][64];
};

constexpr TileBytes tile_bytes() {
    TileBytes bytes{};
    for (int q = 0; q < 4; ++q) {
        for (int i = 0; i < 64; ++i) bytes.index[q][i] = static_cast<std::uint8_t>(16 * (i / 16) + 4 * q + i / 4 % 4);
    }
    return bytes;
}

constexpr TileBytes kTileBytes = tile_bytes();

// The hidden codes of channels m..m+3 over the panel into `hidden` (fc2's panel layout); channels past
// fc1.rows get the hidden zero point (fc2's weights there are zero padding). Each channel's codes are
// packed to bytes four tiles at a time, looked up in its table 64 at once, and merged into byte j of
// every lane of their tile's group.
template <int Tiles>
void hidden_group(const Int8Mlp& mlp, const std::uint8_t* packed_x, std::int64_t width, std::int64_t m,
                  std::int32_t act_zero_point, std::uint8_t* hidden) {
    const Int8Blocks& fc1 = mlp.fc1;
    const __m512 inverse = _mm512_set1_ps(1.0f / mlp.fc1_out_scale);
    const __m512i out_zero = _mm512_set1_epi32(mlp.fc1_out_zero_point);
    const __m512i index[4] = {_mm512_load_si512(kTileBytes.index[0]), _mm512_load_si512(kTileBytes.index[1]),
                              _mm512_load_si512(kTileBytes.index[2]), _mm512_load_si512(kTileBytes.index[3])};
    __m512i group[Tiles];
    for (int t = 0; t < Tiles; ++t) group[t] = _mm512_set1_epi32(mlp.hidden_zero_point * 0x01010101);
    for (int j = 0; j < 4 && m + j < fc1.rows; ++j) {
        const std::int64_t channel = m + j;
        __m512i acc[Tiles];  // starting at -zero point × row sum, they end as the zero-point-corrected sums
        const __m512i offset = _mm512_set1_epi32(-act_zero_point * fc1.row_sums[channel]);
        for (int t = 0; t < Tiles; ++t) acc[t] = offset;
        accumulate_blocks<Tiles>(fc1, packed_x, width, fc1.row_ptr[channel], fc1.row_ptr[channel + 1], acc);
        const __m512 scale = _mm512_set1_ps(fc1.scale[channel]);
        for (int t = 0; t < Tiles; ++t) {
            acc[t] = unsaturated_codes(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[t]), scale), inverse, out_zero);
        }
        const std::uint8_t* row = mlp.table + channel * 256;
        const __m512i table[4] = {_mm512_loadu_si512(row), _mm512_loadu_si512(row + 64),
                                  _mm512_loadu_si512(row + 128), _mm512_loadu_si512(row + 192)};
        const __mmask64 byte_j = 0x1111111111111111ull << j;
        for (int t0 = 0; t0 < Tiles; t0 += 4) {
            const __m512i codes = lookup256(table, pack_four(acc + t0, Tiles - t0, out_zero));
            for (int q = 0; q < 4 && t0 + q < Tiles; ++q) {
                group[t0 + q] = _mm512_mask_permutexvar_epi8(group[t0 + q], byte_j, index[q], codes);
            }
        }
    }
    for (int t = 0; t < Tiles; ++t) _mm512_store_si512(hidden + t * kLanes * 4, group[t]);
}

// The whole MLP for the Tiles × 16 input rows from n0.
template <int Tiles, typename In, typename Out>
void mlp_panel(const Int8Mlp& mlp, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
               std::int32_t act_zero_point, std::int64_t n0, Out* y) {
    constexpr std::int64_t width = Tiles * kLanes;
    const Int8Blocks &fc1 = mlp.fc1, &fc2 = mlp.fc2;
    const std::int64_t input_bytes = ceil_div(fc1.cols, 4) * width * 4;
    auto* packed_x = static_cast<std::uint8_t*>(
        workspace(static_cast<std::size_t>(input_bytes + ceil_div(fc1.rows, 4) * width * 4)));
    std::uint8_t* hidden = packed_x + input_bytes;
    pack_panel<Tiles>(XRows<In>{x, x_stride}, n, fc1.cols, act_scale, act_zero_point, fc1.norm, n0, packed_x);
    for (std::int64_t m = 0; m < fc1.rows; m += 4) {
        hidden_group<Tiles>(mlp, packed_x, width, m, act_zero_point, hidden + m * width);
    }
    int8_panel_to_y<Tiles>(fc2, hidden, mlp.hidden_zero_point, n0, n, y);
}

template <int Tiles>
struct MlpPanel {
    template <typename... Args>
    static void run(Args&&... args) { mlp_panel<Tiles>(std::forward<Args>(args)...); }
};

}  // namespace

template <typename In, typename Out>
void mlp_avx512_vbmi(const Int8Mlp& mlp, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                     std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for) {
    const EvenPanels panels(n, kLanes, kInt8Tiles, static_cast<std::int64_t>(parallel_for.threads));
    parallel_for(static_cast<std::size_t>(panels.count), [&](std::size_t panel) {
        const auto p = static_cast<std::int64_t>(panel);
        run_panel<kInt8Tiles, MlpPanel>(static_cast<int>(panels.tile_count(p)), mlp, x, n, x_stride, act_scale,
                                        act_zero_point, panels.first_tile(p) * kLanes, y);
    });
}

VITSPARSE_INT8_IO_PAIRS(mlp_avx512_vbmi, VITSPARSE_MLP_ARGS);

}  // namespace vitsparse::detail
