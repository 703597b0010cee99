// What AMX would give an INT8 sparse linear whose non-zero blocks are 16 output channels × 4 input
// channels (a pattern the pruners do not make yet), on one core: a whole call, float32 x in and float32
// y out, as the SparseLinear node does. 1×4 blocks cannot use AMX: a tile multiplies 16 output channels
// over 64 input channels, and the rows' non-zero blocks rarely line up. With 16×4 blocks the 16 rows of
// an output group share their non-zero groups of 4 input channels, so 16 of them make one tile product:
//
//   C[16 channels][16 input rows] += W[16 channels][16 groups × 4] · X[16 groups][16 input rows × 4]
//
// W (signed) is packed once, 16 blocks per 1 KiB tile. X (unsigned activation codes) is the 1×4
// kernel's packed layout: per 16 input rows, one 64-byte line per group holding each row's 4 codes,
// which is one row of the tile's VNNI layout. The 16 lines a product needs are copied into a 1 KiB
// buffer and loaded as a tile (tdpbsud: signed × unsigned bytes). C is stored, transposed 16×16 and
// scaled into y. The result is checked against exact integer sums before anything is timed.
//
//   g++ -O2 -std=c++17 -mavx512f -mavx512bw -mamx-tile -mamx-int8 kernels/probes/amx16x4_rate.cpp -o /tmp/amx
//   /tmp/amx K M N SPARSITY [CALLS=200]
//
// Exit status 3 where the CPU or the kernel does not offer AMX.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr int kGroupsPerTile = 16;  // groups of 4 input channels per tile product: 64 bytes a row

// Output groups of 16 channels; group o's blocks, padded to whole tiles of 16 with zero weights, are
// tiles[tile_ptr[o] .. tile_ptr[o + 1]), and block_col[16 × tile + j] is the input group of block j.
struct Tiles16x4 {
    int in_features = 0, out_features = 0;
    long blocks = 0;                        // non-zero 16×4 blocks, padding excluded
    std::vector<std::int32_t> tile_ptr, block_col;
    std::vector<std::int8_t> codes;         // 1 KiB per tile: row r = channel r's 4 codes of each block
    std::vector<std::int32_t> row_sums;     // per output channel, for the activation zero point
    std::vector<float> scale, bias;
};

Tiles16x4 random_weights(int in_features, int out_features, double sparsity, std::mt19937& rng) {
    Tiles16x4 w;
    w.in_features = in_features;
    w.out_features = out_features;
    w.tile_ptr.push_back(0);
    w.row_sums.assign(out_features, 0);
    std::uniform_real_distribution<double> keep(0.0, 1.0);
    std::uniform_int_distribution<int> code(-127, 127);
    for (int m0 = 0; m0 < out_features; m0 += 16) {
        std::vector<int> groups;
        for (int group = 0; group < in_features / 4; ++group) {
            if (keep(rng) >= sparsity) groups.push_back(group);
        }
        w.blocks += static_cast<long>(groups.size());
        const int tiles = (static_cast<int>(groups.size()) + kGroupsPerTile - 1) / kGroupsPerTile;
        for (int t = 0; t < tiles; ++t) {
            std::vector<std::int8_t> tile(1024, 0);
            for (int j = 0; j < kGroupsPerTile; ++j) {
                const int index = t * kGroupsPerTile + j;
                const bool real = index < static_cast<int>(groups.size());
                w.block_col.push_back(real ? groups[index] : 0);  // padding: any line, times zero weights
                for (int r = 0; r < 16 && real; ++r) {
                    for (int c = 0; c < 4; ++c) {
                        const auto value = static_cast<std::int8_t>(code(rng));
                        tile[64 * r + 4 * j + c] = value;
                        w.row_sums[m0 + r] += value;
                    }
                }
            }
            w.codes.insert(w.codes.end(), tile.begin(), tile.end());
        }
        w.tile_ptr.push_back(w.tile_ptr.back() + tiles);
    }
    std::uniform_real_distribution<float> uniform(-0.01f, 0.01f);
    for (int m = 0; m < out_features; ++m) {
        w.scale.push_back(1e-4f + std::fabs(uniform(rng)));
        w.bias.push_back(uniform(rng));
    }
    return w;
}

// x (n rows of `cols` floats) as uint8 codes in the packed layout: per 16 input rows, `cols` / 4 lines
// of 64 bytes, line g holding row r's codes of channels 4g..4g+3 at bytes 4r..4r+3 (rows past n: the
// zero point). Codes: round half to even of x / scale, plus the zero point, saturated.
void pack_activations(const float* x, int n, int cols, float scale, int zero_point, std::uint8_t* packed) {
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    const __m512i zero = _mm512_set1_epi32(zero_point);
    const int groups = cols / 4;
    for (int i = 0; i < (n + 15) / 16 * 16; ++i) {
        std::uint8_t* tile = packed + static_cast<std::int64_t>(i / 16) * groups * 64 + 4 * (i % 16);
        for (int k = 0; k < cols; k += 16) {
            __m512i q = zero;
            if (i < n) {
                const __m512 steps = _mm512_mul_ps(_mm512_loadu_ps(x + static_cast<std::int64_t>(i) * cols + k), inverse);
                q = _mm512_add_epi32(_mm512_cvtps_epi32(steps), zero);
                q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(255));
            }
            alignas(16) std::uint8_t bytes[16];
            _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm512_cvtepi32_epi8(q));
            for (int g = 0; g < 4; ++g) std::memcpy(tile + static_cast<std::int64_t>(k / 4 + g) * 64, bytes + 4 * g, 4);
        }
    }
}

// r[0..15] rows -> r[0..15] columns of the 16×16 float matrix they hold.
void transpose16(__m512 r[16]) {
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

struct alignas(64) TileConfig {
    std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
    std::uint16_t colsb[16] = {};
    std::uint8_t rows[16] = {};
};

// Tiles 0 (C, int32 16×16), 1 (W) and 2 (X): 16 rows of 64 bytes each.
void configure_tiles() {
    TileConfig config;
    for (int t = 0; t < 3; ++t) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

// y = (sum - zero point × row sum) × scale + bias for output channels m0.. and input rows i0.. (those
// below n), from the 16×16 sums c[channel][row].
void store_rows(const Tiles16x4& w, const std::int32_t* c, int zero_point, int m0, int i0, int n, float* y) {
    __m512 tile[16];
    for (int r = 0; r < 16; ++r) {
        const int m = m0 + r;
        const __m512i sums = _mm512_sub_epi32(_mm512_load_si512(c + 16 * r), _mm512_set1_epi32(zero_point * w.row_sums[m]));
        tile[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(w.scale[m]), _mm512_set1_ps(w.bias[m]));
    }
    transpose16(tile);
    for (int t = 0; t < 16 && i0 + t < n; ++t) {
        _mm512_storeu_ps(y + static_cast<std::int64_t>(i0 + t) * w.out_features + m0, tile[t]);
    }
}

// The whole call on one core: pack x, then per 16 input rows and 16 output channels, one tile product
// per 16 non-zero blocks.
void sparse_linear(const Tiles16x4& w, const float* x, int n, float scale, int zero_point, std::uint8_t* packed,
                   float* y) {
    pack_activations(x, n, w.in_features, scale, zero_point, packed);
    const std::int64_t tile_stride = static_cast<std::int64_t>(w.in_features / 4) * 64;
    alignas(64) std::uint8_t lines[1024];
    alignas(64) std::int32_t c[256];
    for (int i0 = 0; i0 < n; i0 += 16) {
        const std::uint8_t* rows = packed + i0 / 16 * tile_stride;
        for (int o = 0; o < w.out_features / 16; ++o) {
            _tile_zero(0);
            for (int t = w.tile_ptr[o]; t < w.tile_ptr[o + 1]; ++t) {
                const std::int32_t* cols = w.block_col.data() + kGroupsPerTile * static_cast<std::int64_t>(t);
                for (int j = 0; j < kGroupsPerTile; ++j) {
                    _mm512_store_si512(lines + 64 * j, _mm512_load_si512(rows + static_cast<std::int64_t>(cols[j]) * 64));
                }
                _tile_loadd(1, w.codes.data() + 1024 * static_cast<std::int64_t>(t), 64);
                _tile_loadd(2, lines, 64);
                _tile_dpbsud(0, 1, 2);
            }
            _tile_stored(0, c, 64);
            store_rows(w, c, zero_point, 16 * o, i0, n, y);
        }
    }
}

// Largest |difference| from exact integer sums over every output.
double largest_error(const Tiles16x4& w, const std::uint8_t* packed, int n, int zero_point, const float* y) {
    const std::int64_t tile_stride = static_cast<std::int64_t>(w.in_features / 4) * 64;
    double worst = 0.0;
    for (int i = 0; i < n; ++i) {
        const std::uint8_t* rows = packed + i / 16 * tile_stride + 4 * (i % 16);
        for (int o = 0; o < w.out_features / 16; ++o) {
            for (int r = 0; r < 16; ++r) {
                std::int64_t sum = 0;
                for (int t = w.tile_ptr[o]; t < w.tile_ptr[o + 1]; ++t) {
                    for (int j = 0; j < kGroupsPerTile; ++j) {
                        const std::uint8_t* a = rows + static_cast<std::int64_t>(w.block_col[kGroupsPerTile * t + j]) * 64;
                        const std::int8_t* b = w.codes.data() + 1024 * static_cast<std::int64_t>(t) + 64 * r + 4 * j;
                        for (int k = 0; k < 4; ++k) sum += static_cast<std::int64_t>(a[k]) * b[k];
                    }
                }
                const int m = 16 * o + r;
                const double expected = static_cast<double>(sum - static_cast<std::int64_t>(zero_point) * w.row_sums[m]) *
                                            w.scale[m] + w.bias[m];
                worst = std::max(worst, std::fabs(expected - y[static_cast<std::int64_t>(i) * w.out_features + m]));
            }
        }
    }
    return worst;
}

// Linux hands out AMX's tile state only on request.
bool amx_available() {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return __builtin_cpu_supports("avx512f") && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: %s K M N SPARSITY [CALLS=200]\n", argv[0]);
        return 2;
    }
    const int k = std::atoi(argv[1]), m = std::atoi(argv[2]), n = std::atoi(argv[3]);
    const double sparsity = std::atof(argv[4]);
    const int calls = argc > 5 ? std::atoi(argv[5]) : 200;
    if (k <= 0 || k % 16 != 0 || m <= 0 || m % 16 != 0 || n <= 0 || sparsity < 0.0 || sparsity > 1.0 || calls <= 0) {
        std::fprintf(stderr, "K and M must be positive multiples of 16, N positive, SPARSITY in [0, 1], "
                             "CALLS positive\n");
        return 2;
    }
    if (!amx_available()) {
        std::fprintf(stderr, "no AMX here: the CPU lacks it or the kernel refused the tile state\n");
        return 3;
    }
    configure_tiles();
    std::mt19937 rng(0);
    const Tiles16x4 w = random_weights(k, m, sparsity, rng);
    std::vector<float> x(static_cast<std::size_t>(n) * k), y(static_cast<std::size_t>(n) * m);
    std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
    for (float& value : x) value = uniform(rng);
    auto* packed = static_cast<std::uint8_t*>(std::aligned_alloc(64, static_cast<std::size_t>((n + 15) / 16) * k * 16));
    const float scale = 4.0f / 255.0f;
    const int zero_point = 128;

    sparse_linear(w, x.data(), n, scale, zero_point, packed, y.data());
    const double error = largest_error(w, packed, n, zero_point, y.data());
    if (error > 1e-3) {
        std::fprintf(stderr, "wrong result: largest error %.3g\n", error);
        return 1;
    }
    double best = 1e30;
    for (int call = 0; call < calls; ++call) {
        const auto start = std::chrono::steady_clock::now();
        sparse_linear(w, x.data(), n, scale, zero_point, packed, y.data());
        best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    _tile_release();
    std::free(packed);
    const double macs = static_cast<double>(w.blocks) * 64 * n;  // 16 channels × 4 per block and input row
    std::printf("K=%d M=%d N=%d sparsity=%.2f: %.3f ms (fastest of %d calls, one core), %ld blocks, "
                "%.1f G non-zero MAC/s, largest error %.2g\n",
                k, m, n, sparsity, best, calls, w.blocks, macs / best / 1e6, error);
    return 0;
}
