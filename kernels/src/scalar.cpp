// The reference kernels: plain loops, exact integer sums; the vector kernels are tested against these.
#include <vector>

#include "internal.hpp"

namespace vitsparse::detail {

namespace {
constexpr std::int64_t kRowsPerTask = 8;  // input rows per task

// The LayerNorm of a row of x (RowScale, internal.hpp), summed in order.
template <typename In>
RowScale row_scale(const In* row, std::int64_t cols, float epsilon) {
    float sum = 0.0f;
    for (std::int64_t k = 0; k < cols; ++k) sum += to_float(row[k]);
    const float mean = sum / static_cast<float>(cols);
    float squares = 0.0f;
    for (std::int64_t k = 0; k < cols; ++k) squares += (to_float(row[k]) - mean) * (to_float(row[k]) - mean);
    return row_scale_of(mean, squares, cols, epsilon);
}
}  // namespace

template <typename In, typename Out>
void int8_scalar(const Int8Blocks& w, const In* x, std::int64_t n, std::int64_t x_stride, float act_scale,
                 std::int32_t act_zero_point, Out* y, const ParallelFor& parallel_for) {
    const std::int64_t padded_cols = round_up(w.cols, 4);
    const OutputLayout layout = output_of(w);
    const auto* addend = static_cast<const Out*>(w.addend);
    const HeadsLayout heads(layout, w.rows, n);
    parallel_for(static_cast<std::size_t>(ceil_div(n, kRowsPerTask)), [&](std::size_t task) {
        std::vector<std::int32_t> centered(static_cast<std::size_t>(padded_cols), 0);  // code - zero point
        const std::int64_t end = std::min(n, static_cast<std::int64_t>(task + 1) * kRowsPerTask);
        for (std::int64_t i = static_cast<std::int64_t>(task) * kRowsPerTask; i < end; ++i) {
            const In* row = x + i * x_stride;
            const RowScale norm = w.norm.active() ? row_scale(row, w.cols, w.norm.epsilon) : RowScale{};
            for (std::int64_t k = 0; k < w.cols; ++k) {
                float value = to_float(row[k]);
                if (w.norm.active()) value = (value * norm.rstd + norm.shift) * w.norm.gamma[k] + w.norm.beta[k];
                centered[k] = quantize_u8(value, 1.0f / act_scale, act_zero_point) - act_zero_point;
            }
            for (std::int64_t m = 0; m < w.rows; ++m) {
                std::int32_t sum = 0;
                for (std::int32_t b = w.row_ptr[m]; b < w.row_ptr[m + 1]; ++b) {
                    const std::int32_t* a = centered.data() + 4 * static_cast<std::int64_t>(w.block_col[b]);
                    for (int j = 0; j < 4; ++j) sum += a[j] * w.values[4 * static_cast<std::int64_t>(b) + j];
                }
                const std::int64_t at = layout.row_major() ? i * w.rows + m : heads.offset(i, m);
                store_value(y + at, int8_result(w, m, sum) + (addend ? to_float(addend[at]) : 0.0f));
            }
        }
    });
}

VITSPARSE_INT8_IO_PAIRS(int8_scalar, VITSPARSE_INT8_ARGS);
VITSPARSE_INT8_CODE_PAIRS(int8_scalar, VITSPARSE_INT8_ARGS);

void bf16_scalar(const Bf16Pairs& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                 const ParallelFor& parallel_for) {
    const std::int64_t padded_cols = round_up(w.cols, 2);
    parallel_for(static_cast<std::size_t>(ceil_div(n, kRowsPerTask)), [&](std::size_t task) {
        std::vector<float> rounded(static_cast<std::size_t>(padded_cols), 0.0f);  // x as bfloat16
        const std::int64_t end = std::min(n, static_cast<std::int64_t>(task + 1) * kRowsPerTask);
        for (std::int64_t i = static_cast<std::int64_t>(task) * kRowsPerTask; i < end; ++i) {
            for (std::int64_t k = 0; k < w.cols; ++k) rounded[k] = from_bf16(to_bf16(x[i * x_stride + k]));
            for (std::int64_t m = 0; m < w.rows; ++m) {
                float sum = 0.0f;
                for (std::int32_t b = w.row_ptr[m]; b < w.row_ptr[m + 1]; ++b) {
                    const float* a = rounded.data() + 2 * static_cast<std::int64_t>(w.block_col[b]);
                    const std::uint16_t* v = w.values + 2 * static_cast<std::int64_t>(b);
                    sum += a[0] * from_bf16(v[0]) + a[1] * from_bf16(v[1]);
                }
                y[i * w.rows + m] = sum + (w.bias ? w.bias[m] : 0.0f);
            }
        }
    });
}

void f32_scalar(const F32Csr& w, const float* x, std::int64_t n, std::int64_t x_stride, float* y,
                const ParallelFor& parallel_for) {
    parallel_for(static_cast<std::size_t>(ceil_div(n, kRowsPerTask)), [&](std::size_t task) {
        const std::int64_t end = std::min(n, static_cast<std::int64_t>(task + 1) * kRowsPerTask);
        for (std::int64_t i = static_cast<std::int64_t>(task) * kRowsPerTask; i < end; ++i) {
            const float* row = x + i * x_stride;
            for (std::int64_t m = 0; m < w.rows; ++m) {
                float sum = 0.0f;
                for (std::int32_t j = w.row_ptr[m]; j < w.row_ptr[m + 1]; ++j) sum += w.values[j] * row[w.col[j]];
                y[i * w.rows + m] = sum + (w.bias ? w.bias[m] : 0.0f);
            }
        }
    });
}

}  // namespace vitsparse::detail
