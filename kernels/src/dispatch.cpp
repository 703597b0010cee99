// Run-time choice of the instruction set, the checks on a weight's index arrays, and the entry points.
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "internal.hpp"

namespace vitsparse {

namespace {

// Whether this CPU (and this build) runs `isa`'s path. The paths are ordered by speed, not by what a
// CPU has: AMD Zen 4 has AVX-512 VNNI but not AVX-VNNI, its 256-bit form.
bool cpu_runs(Isa isa) {
    __builtin_cpu_init();
    switch (isa) {
        case Isa::avx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#ifdef VITSPARSE_HAVE_AVXVNNI
        case Isa::avxvnni: return cpu_runs(Isa::avx2) && __builtin_cpu_supports("avxvnni");
#else
        case Isa::avxvnni: return false;
#endif
        case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        default: return true;
    }
}

// `isa`, or the fastest path below it that this CPU runs (scalar always runs).
Isa runnable_from(Isa isa) {
    while (!cpu_runs(isa)) isa = static_cast<Isa>(static_cast<int>(isa) - 1);
    return isa;
}

}  // namespace

Isa best_cpu_isa() { return runnable_from(Isa::avx512); }

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx512: return "avx512";
        case Isa::avxvnni: return "avxvnni";
        case Isa::avx2: return "avx2";
        default: return "scalar";
    }
}

Isa selected_isa() {
    const char* forced = std::getenv("VITSPARSE_KERNEL_ISA");
    if (forced == nullptr || *forced == '\0') return best_cpu_isa();
    std::string name(forced);
    Isa isa;
    if (name == "scalar") isa = Isa::scalar;
    else if (name == "avx2") isa = Isa::avx2;
    else if (name == "avxvnni") isa = Isa::avxvnni;
    else if (name == "avx512") isa = Isa::avx512;
    else throw std::invalid_argument("VITSPARSE_KERNEL_ISA must be scalar, avx2, avxvnni or avx512, not '" + name + "'");
    return runnable_from(isa);
}

ParallelFor serial_for() {
    return {[](std::size_t count, const ParallelFor::Body& body) {
        for (std::size_t i = 0; i < count; ++i) body(i);
    }, 1};
}

namespace {

std::string check_offsets(const std::int32_t* row_ptr, std::int64_t rows, std::int64_t entries) {
    if (rows < 1) return "the weight has no rows";
    if (row_ptr[0] != 0) return "row offsets must start at 0";
    for (std::int64_t m = 0; m < rows; ++m) {
        if (row_ptr[m + 1] < row_ptr[m]) return "row offsets decrease at row " + std::to_string(m);
    }
    if (row_ptr[rows] != entries) {
        return "row offsets end at " + std::to_string(row_ptr[rows]) + " but there are " +
               std::to_string(entries) + " entries";
    }
    return "";
}

std::string check_indices(const std::int32_t* index, std::int64_t count, std::int64_t limit, const char* what) {
    for (std::int64_t i = 0; i < count; ++i) {
        if (index[i] < 0 || index[i] >= limit) {
            return std::string(what) + " " + std::to_string(i) + " is " + std::to_string(index[i]) +
                   ", outside [0, " + std::to_string(limit) + ")";
        }
    }
    return "";
}

}  // namespace

std::string check_int8_blocks(const Int8Blocks& w, std::int64_t nonzero_blocks) {
    if (w.cols < 1) return "the weight has no input channels";
    std::string error = check_offsets(w.row_ptr, w.rows, nonzero_blocks);
    if (error.empty()) error = check_indices(w.block_col, nonzero_blocks, detail::ceil_div(w.cols, 4), "block");
    return error;
}

std::string check_heads(const Int8Blocks& w) {
    if (w.heads == 0) return "";
    const std::string heads = std::to_string(w.heads), rows = std::to_string(w.rows);
    if (w.heads < 0) return "heads must not be negative, got " + heads;
    if (w.rows % (3 * w.heads) != 0) {
        return "qkv's " + rows + " output channels are not 3 parts of " + heads + " heads";
    }
    if (w.rows / (3 * w.heads) % detail::kRowBlock != 0) {
        return "a head of " + std::to_string(w.rows / (3 * w.heads)) +
               " channels: the kernels write heads of a multiple of " + std::to_string(detail::kRowBlock);
    }
    if (w.addend != nullptr) return "a node split into heads takes no addend";
    return "";
}

std::string check_x_heads(const Int8Blocks& w) {
    if (w.x_heads == 0) return "";
    const std::string heads = std::to_string(w.x_heads);
    if (w.x_heads < 0) return "x_heads must not be negative, got " + heads;
    if (w.cols % w.x_heads != 0) {
        return "x's " + std::to_string(w.cols) + " input channels are not " + heads + " heads of equal width";
    }
    if (w.norm.active()) return "a node that reads x head by head does not normalize it";
    if (w.heads != 0) return "a node that reads x head by head does not split its output into heads";
    return "";
}

std::string check_bf16_pairs(const Bf16Pairs& w, std::int64_t nonzero_blocks) {
    if (w.cols < 1) return "the weight has no input channels";
    std::string error = check_offsets(w.row_ptr, w.rows, nonzero_blocks);
    if (error.empty()) error = check_indices(w.block_col, nonzero_blocks, detail::ceil_div(w.cols, 2), "block");
    return error;
}

std::string check_f32_csr(const F32Csr& w, std::int64_t nonzeros) {
    if (w.cols < 1) return "the weight has no input channels";
    std::string error = check_offsets(w.row_ptr, w.rows, nonzeros);
    if (error.empty()) error = check_indices(w.col, nonzeros, w.cols, "non-zero");
    return error;
}

namespace {

// x read head by head (Int8Blocks::x_heads) as n row-major rows of w.cols values, in this file's own
// workspace (internal linkage gives each file its own; the kernels pack into theirs), kept between calls
// as theirs are: a fresh copy per call would page-fault on every inference.
template <typename In>
const In* gather_heads(const Int8Blocks& w, const In* x, std::int64_t n) {
    const detail::XRows<In> rows = detail::x_rows(w, x, w.cols);
    auto* gathered = static_cast<In*>(detail::workspace(static_cast<std::size_t>(n * w.cols) * sizeof(In)));
    for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t k = 0; k < w.cols; k += rows.head_dim) {
            const In* run = rows.row(i) + rows.column(k);
            std::copy(run, run + rows.head_dim, gathered + i * w.cols + k);
        }
    }
    return gathered;
}

template <typename In, typename Out>
void linear_int8(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                 std::int32_t act_zero_point, Out* y, Isa isa, const ParallelFor& parallel_for) {
    if (n <= 0) return;
    if ((w.heads != 0 || w.x_heads != 0) && (w.tokens < 1 || n % w.tokens != 0)) {
        throw std::invalid_argument("a product split into heads needs whole batch items: " + std::to_string(n) +
                                    " input rows of " + std::to_string(w.tokens) + " tokens each");
    }
    if (const std::string problem = check_x_heads(w); !problem.empty()) throw std::invalid_argument(problem);
    // AVX-512 reads x head by head where 16 channels never cross a head; every other path reads a gathered copy
    if (w.x_heads != 0 && (isa != Isa::avx512 || w.cols / w.x_heads % 16 != 0)) {
        Int8Blocks row_major = w;
        row_major.x_heads = 0;
        return linear_int8(row_major, gather_heads(w, x, n), n, w.cols, act_scale, act_zero_point, y, isa,
                           parallel_for);
    }
    switch (isa) {
        case Isa::avx512: return detail::int8_avx512(w, x, n, x_stride, act_scale, act_zero_point, y, parallel_for);
#ifdef VITSPARSE_HAVE_AVXVNNI
        case Isa::avxvnni:
            return detail::int8_avx2_vnni(w, x, n, x_stride, act_scale, act_zero_point, y, parallel_for);
#else
        case Isa::avxvnni:
#endif
        case Isa::avx2: return detail::int8_avx2(w, x, n, x_stride, act_scale, act_zero_point, y, parallel_for);
        default: return detail::int8_scalar(w, x, n, x_stride, act_scale, act_zero_point, y, parallel_for);
    }
}

}  // namespace

void sparse_linear_int8(const Int8Blocks& w, const float* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, float* y, Isa isa,
                        const ParallelFor& parallel_for) {
    linear_int8(w, x, n, x_stride, act_scale, act_zero_point, y, isa, parallel_for);
}

void sparse_linear_int8(const Int8Blocks& w, const Bf16* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, Bf16* y, Isa isa,
                        const ParallelFor& parallel_for) {
    linear_int8(w, x, n, x_stride, act_scale, act_zero_point, y, isa, parallel_for);
}

namespace {

template <typename In>
void linear_int8_codes(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                       std::int32_t act_zero_point, std::int8_t* y, Isa isa, const ParallelFor& parallel_for) {
    if (!(w.out_scale > 0.0f)) throw std::invalid_argument("INT8 codes need an output scale above 0");
    if (w.addend != nullptr) throw std::invalid_argument("a product that writes INT8 codes takes no addend");
    Int8Blocks coded = w;
    coded.codes = true;
    linear_int8(coded, x, n, x_stride, act_scale, act_zero_point, y, isa, parallel_for);
}

}  // namespace

void sparse_linear_int8(const Int8Blocks& w, const float* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, std::int8_t* y, Isa isa,
                        const ParallelFor& parallel_for) {
    linear_int8_codes(w, x, n, x_stride, act_scale, act_zero_point, y, isa, parallel_for);
}

void sparse_linear_int8(const Int8Blocks& w, const Bf16* x, std::int64_t n, std::int64_t x_stride,
                        float act_scale, std::int32_t act_zero_point, std::int8_t* y, Isa isa,
                        const ParallelFor& parallel_for) {
    linear_int8_codes(w, x, n, x_stride, act_scale, act_zero_point, y, isa, parallel_for);
}

bool cpu_has_avx512_vbmi() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi");
}

namespace {

// fc1, the table and fc2 one after another through the per-layer kernels of `isa`: the MLP on CPUs
// without the fused kernel, and the reference the fused kernel is tested against. The hidden values
// are floats whatever x and y hold, in a buffer per calling thread kept between calls (19 MB for
// DeiT-S at batch 16: a fresh one would page-fault on every call).
template <typename T>
void mlp_composed(const Int8Mlp& mlp, const T* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                  std::int32_t act_zero_point, T* y, Isa isa, const ParallelFor& parallel_for) {
    Int8Blocks fc1 = mlp.fc1;
    fc1.bias = nullptr;
    fc1.out_scale = 0.0f;
    thread_local std::vector<float> buffer;
    buffer.resize(static_cast<std::size_t>(n * fc1.rows));
    float* const hidden = buffer.data();  // the lambda runs on other threads, which see their own `buffer`
    linear_int8(fc1, x, n, x_stride, act_scale, act_zero_point, hidden, isa, parallel_for);
    const float inverse = 1.0f / mlp.fc1_out_scale;
    parallel_for(static_cast<std::size_t>(n), [&](std::size_t i) {
        float* row = hidden + static_cast<std::int64_t>(i) * fc1.rows;
        for (std::int64_t m = 0; m < fc1.rows; ++m) {
            const std::int32_t code = detail::quantize_u8(row[m], inverse, mlp.fc1_out_zero_point);
            row[m] = static_cast<float>(mlp.table[m * 256 + code] - mlp.hidden_zero_point);
        }
    });
    // fc2 quantizes (code - zero point) with scale 1 and the hidden zero point back to the code itself
    linear_int8(mlp.fc2, hidden, n, fc1.rows, 1.0f, mlp.hidden_zero_point, y, isa, parallel_for);
}

template <typename T>
void mlp_int8(const Int8Mlp& mlp, const T* x, std::int64_t n, std::int64_t x_stride, float act_scale,
              std::int32_t act_zero_point, T* y, Isa isa, const ParallelFor& parallel_for) {
    if (n <= 0) return;
    if (isa == Isa::avx512 && cpu_has_avx512_vbmi()) {
        return detail::mlp_avx512_vbmi(mlp, x, n, x_stride, act_scale, act_zero_point, y, parallel_for);
    }
    mlp_composed(mlp, x, n, x_stride, act_scale, act_zero_point, y, isa, parallel_for);
}

}  // namespace

void sparse_mlp_int8(const Int8Mlp& mlp, const float* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                     std::int32_t act_zero_point, float* y, Isa isa, const ParallelFor& parallel_for) {
    mlp_int8(mlp, x, n, x_stride, act_scale, act_zero_point, y, isa, parallel_for);
}

void sparse_mlp_int8(const Int8Mlp& mlp, const Bf16* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                     std::int32_t act_zero_point, Bf16* y, Isa isa, const ParallelFor& parallel_for) {
    mlp_int8(mlp, x, n, x_stride, act_scale, act_zero_point, y, isa, parallel_for);
}

bool cpu_has_avx512_bf16() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
}

void sparse_linear_bf16(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                        Isa isa, const ParallelFor& parallel_for) {
    if (n <= 0) return;
    if (isa == Isa::avx512 && cpu_has_avx512_bf16()) return detail::bf16_avx512(w, x, n, x_stride, y, parallel_for);
    if (isa != Isa::scalar) return detail::bf16_avx2(w, x, n, x_stride, y, parallel_for);
    detail::bf16_scalar(w, x, n, x_stride, y, parallel_for);
}

void sparse_linear_f32(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                       Isa isa, const ParallelFor& parallel_for) {
    if (n <= 0) return;
    switch (isa) {
        case Isa::avx512: return detail::f32_avx512(w, x, n, x_stride, y, parallel_for);
        case Isa::avxvnni:
        case Isa::avx2: return detail::f32_avx2(w, x, n, x_stride, y, parallel_for);
        default: return detail::f32_scalar(w, x, n, x_stride, y, parallel_for);
    }
}

}  // namespace vitsparse
