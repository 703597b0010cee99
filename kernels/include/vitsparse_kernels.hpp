// Sparse weight products for pruned linear layers: y[N][M] = x[N][K] · Wᵀ + bias, W sparse, x dense.
//
// Two weight formats, both rows of W (output channels) in CSR order:
//   * Int8Blocks: INT8 codes in 1×4 blocks along the input channel (the pruners' `1x4` pattern), the
//     activations quantized per tensor to uint8 inside the call;
//   * Bf16Pairs: bfloat16 in 1×2 blocks along the input channel (what vdpbf16ps multiplies), the
//     activations rounded to bfloat16 inside the call, sums in float32;
//   * F32Csr: float32, unstructured.
// Every format has a kernel per instruction set (AVX-512, AVX2, scalar) chosen at run time; the scalar
// kernels are the reference the others are tested against. No OpenVINO or Python here: the host engine
// passes its thread pool in as a ParallelFor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace vitsparse {

// avxvnni: AVX2 with AVX-VNNI (256-bit vpdpbusd), for the INT8 kernel; the other kernels run their AVX2 path
enum class Isa { scalar = 0, avx2 = 1, avxvnni = 2, avx512 = 3 };

// The best instruction set this CPU runs, lowered by VITSPARSE_KERNEL_ISA=scalar|avx2|avxvnni|avx512 if set
// (a path the CPU lacks is never used: the next one down runs; an unknown value throws
// std::invalid_argument).
Isa selected_isa();
Isa best_cpu_isa();
const char* isa_name(Isa isa);

// The host's thread pool: run(count, body) runs body(i) for i in [0, count), possibly on several threads,
// and returns when all are done. `threads` is how many run at once, which the kernels size tasks by.
struct ParallelFor {
    using Body = std::function<void(std::size_t)>;
    std::function<void(std::size_t count, const Body& body)> run;
    std::size_t threads = 1;
    void operator()(std::size_t count, const Body& body) const { run(count, body); }
};
ParallelFor serial_for();  // one thread, in order

// A bfloat16 value: the top 16 bits of a float32. The INT8 kernels read x and write y (and read the
// addend) as bfloat16 where the host computes its float parts in bfloat16 (OpenVINO's bf16 precision
// hint), so that no conversion runs between them and the nodes around them; inside, they compute as
// for float32 x and round each result to bfloat16 once, to nearest even.
struct Bf16 {
    std::uint16_t bits;
};

// A LayerNorm over each row of x, computed where the INT8 kernels quantize x, so that no normalized copy
// of x is written and read again: (x − mean) / sqrt(variance + epsilon) × gamma + beta per input channel,
// the mean and the (biased) variance over the row, as torch's LayerNorm over the last axis.
struct LayerNorm {
    const float* gamma = nullptr;       // per input channel; nullptr: x is read as it is
    const float* beta = nullptr;        // per input channel
    float epsilon = 0.0f;
    bool active() const { return gamma != nullptr; }
};

struct Int8Blocks {
    std::int64_t rows = 0;              // M, output channels
    std::int64_t cols = 0;              // K, input channels
    const std::int32_t* row_ptr;        // M + 1 offsets into blocks, row_ptr[0] = 0
    const std::int32_t* block_col;      // per block: its first input channel / 4
    const std::int8_t* values;          // 4 codes per block, input channel order
    const std::int32_t* row_sums;       // per row: the sum of its codes (for the activation zero point)
    const float* scale;                 // per row: activation scale × weight scale
    const float* bias;                  // per row, or nullptr
    // out_scale > 0: each result (sum × scale) is fake-quantized to uint8 before the bias is added,
    // QuantizeLinear then DequantizeLinear with this scale and zero point, as a QDQ model's layer output
    float out_scale = 0.0f;
    std::int32_t out_zero_point = 0;
    // added to y after the bias (n rows of `rows` values of y's element type, float or Bf16, laid out
    // as y), or nullptr: the residual a transformer block adds to the layer's output, read where the
    // result is written
    const void* addend = nullptr;
    // heads > 0: the product is attention's qkv and writes q, kᵀ and v where the attention products read
    // them, with no transposes between. Its rows are 3 parts (q, k, v) × heads × head_dim channels, its n
    // input rows batch items of `tokens` rows, and y holds, for part p, batch item b and head h, at
    // ((p × batch + b) × heads + h) × tokens × head_dim, a tokens × head_dim matrix (q, v) or a
    // head_dim × tokens one (kᵀ), row-major. head_dim must be a multiple of 16; no addend with it.
    std::int64_t heads = 0;
    std::int64_t tokens = 0;
    // x_heads > 0: x is attention's output head by head, [batch, x_heads, tokens, cols / x_heads] (n input
    // rows: batch items of `tokens` rows; x_stride unused), what the product before proj writes, so that
    // no transpose runs between. No LayerNorm and no heads with it.
    std::int64_t x_heads = 0;
    // Set by the std::int8_t overloads of sparse_linear_int8, which write codes instead of values (leave
    // it false): each result (sum × scale + bias) quantized as out_scale and out_zero_point say, minus 128
    bool codes = false;
    // x's LayerNorm, applied before x is quantized (an MLP: fc1's), or none
    LayerNorm norm;
};

struct Bf16Pairs {
    std::int64_t rows = 0;              // M
    std::int64_t cols = 0;              // K
    const std::int32_t* row_ptr;        // M + 1
    const std::int32_t* block_col;      // per block: its first input channel / 2
    const std::uint16_t* values;        // 2 bfloat16 per block, input channel order
    const float* bias;                  // per row, or nullptr
};

struct F32Csr {
    std::int64_t rows = 0;              // M
    std::int64_t cols = 0;              // K
    const std::int32_t* row_ptr;        // M + 1
    const std::int32_t* col;            // per non-zero: its input channel
    const float* values;                // per non-zero
    const float* bias;                  // per row, or nullptr
};

// Checks the index arrays (monotone offsets, indices in range); returns "" or what is wrong.
std::string check_int8_blocks(const Int8Blocks& w, std::int64_t nonzero_blocks);
std::string check_f32_csr(const F32Csr& w, std::int64_t nonzeros);
std::string check_bf16_pairs(const Bf16Pairs& w, std::int64_t nonzero_blocks);
// Checks Int8Blocks::heads against the rows (3 parts × heads × a head_dim that is a multiple of 16) and
// the addend (none with heads); returns "" or what is wrong.
std::string check_heads(const Int8Blocks& w);
// Checks Int8Blocks::x_heads against the input channels (a whole number per head), the LayerNorm and
// heads (neither with it); returns "" or what is wrong.
std::string check_x_heads(const Int8Blocks& w);

// x: n rows of w.cols floats, row stride x_stride; y: n rows of w.rows floats (contiguous), or with
// w.heads, the same floats laid out head by head (n then a multiple of w.tokens, else invalid_argument);
// with w.x_heads, x is read head by head (n a multiple of w.tokens too).
// The Bf16 overloads read x and the addend and write y as bfloat16 (Bf16).
void sparse_linear_int8(const Int8Blocks& w, const float* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, float* y, Isa isa,
                        const ParallelFor& parallel_for);
void sparse_linear_int8(const Int8Blocks& w, const Bf16* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, Bf16* y, Isa isa,
                        const ParallelFor& parallel_for);
// y as INT8 codes, laid out as the float y: what QuantizeLinear to int8 writes of each result (sum × scale
// + bias) with scale w.out_scale (> 0) and zero point w.out_zero_point − 128, that is the uint8 code minus
// 128. Where a quantized tensor feeds OpenVINO's INT8 attention, the node writes it in one pass instead of
// a float tensor a QuantizeLinear then reads again. No addend (invalid_argument).
void sparse_linear_int8(const Int8Blocks& w, const float* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, std::int8_t* y, Isa isa,
                        const ParallelFor& parallel_for);
void sparse_linear_int8(const Int8Blocks& w, const Bf16* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, std::int8_t* y, Isa isa,
                        const ParallelFor& parallel_for);
// A pruned INT8 MLP, y = fc2(table(fc1(x))), its hidden activations kept in cache, never written out:
// fc1's results are quantized to uint8 codes (fc1_out_scale, fc1_out_zero_point); table[m][code] (256
// bytes per hidden channel m: fc1's bias, the activation, and fc2's input quantization, all folded) gives
// the hidden code that fc2 reads with hidden_zero_point (fc2.scale holds the hidden scale). fc1.bias and
// fc1.out_scale are not used. AVX-512 with VBMI runs it fused; every other path composes the kernels.
struct Int8Mlp {
    Int8Blocks fc1;
    float fc1_out_scale = 1.0f;
    std::int32_t fc1_out_zero_point = 0;
    const std::uint8_t* table;          // [fc1.rows][256]
    std::int32_t hidden_zero_point = 0;
    Int8Blocks fc2;                     // fc2.cols == fc1.rows
};
void sparse_mlp_int8(const Int8Mlp& mlp, const float* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                     std::int32_t act_zero_point, float* y, Isa isa, const ParallelFor& parallel_for);
void sparse_mlp_int8(const Int8Mlp& mlp, const Bf16* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                     std::int32_t act_zero_point, Bf16* y, Isa isa, const ParallelFor& parallel_for);
bool cpu_has_avx512_vbmi();

// bfloat16 runs on AVX-512 BF16 where the CPU has it (isa avx512), on the scalar kernel otherwise.
void sparse_linear_bf16(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                        Isa isa, const ParallelFor& parallel_for);
bool cpu_has_avx512_bf16();
void sparse_linear_f32(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                       Isa isa, const ParallelFor& parallel_for);

}  // namespace vitsparse
