// SparseLinear: OpenVINO's operation for a pruned linear layer, y = x · Wᵀ + bias with W stored sparse
// as constants in the layout vitsparse's kernels read (see vitsparse_kernels.hpp). The CPU plugin runs
// it through `evaluate`; every other node stays in OpenVINO's own kernels.
#pragma once

#include <openvino/op/op.hpp>
#include <openvino/runtime/tensor.hpp>

#include <vector>

namespace vitsparse {

class SparseLinear : public ov::op::Op {
public:
    OPENVINO_OP("SparseLinear", "vitsparse");

    // format "int8_1x4" inputs: x, row_ptr, block_col, values, row_sums, scale, bias[, addend] (out_scale
    //   > 0: sum × scale fake-quantized to uint8 with out_scale and out_zero_point before the bias; the
    //   addend, of the output's shape, is added last). heads > 0: the node is attention's qkv over x
    //   [batch, tokens, in_features]; y keeps its shape but holds q, kᵀ and v head by head, as
    //   Int8Blocks::heads lays them out, for a Reshape to [3, batch, heads, tokens, head_dim] to read
    //   (no addend then). int8_output 1: y is int8, what QuantizeLinear to int8 writes of sum × scale +
    //   bias with out_scale (> 0) and zero point out_zero_point − 128 (no addend then), for a
    //   DequantizeLinear to read. norm_epsilon > 0: x is read through a LayerNorm (LayerNorm in
    //   vitsparse_kernels.hpp) whose gamma and beta come as two more inputs after bias, before the addend.
    //   x_heads > 0: x is attention's output head by head, [batch, x_heads, tokens, in_features / x_heads],
    //   and y is [batch, tokens, out_features] (Int8Blocks::x_heads; no norm_epsilon or heads with it)
    // format "f32_csr" inputs:  x, row_ptr, col, values, bias
    // format "bf16_1x2" inputs: x, row_ptr, block_col, values (a bfloat16 pair per int32), bias
    SparseLinear() = default;
    SparseLinear(const ov::OutputVector& inputs, std::string format, std::int64_t in_features, float act_scale,
                 std::int64_t act_zero_point, float out_scale = 0.0f, std::int64_t out_zero_point = 0,
                 std::int64_t heads = 0, std::int64_t int8_output = 0, float norm_epsilon = 0.0f,
                 std::int64_t x_heads = 0);

    void validate_and_infer_types() override;
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override;
    bool visit_attributes(ov::AttributeVisitor& visitor) override;
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;
    bool has_evaluate() const override;

private:
    // inputs: how many the node takes without an addend
    void check_heads(const std::vector<ov::Tensor>& weight, std::size_t inputs) const;
    void check_int8_output(std::size_t inputs) const;
    // y's shape where x is read head by head: [batch, tokens, rows]
    ov::PartialShape heads_input_output_shape(std::int64_t rows) const;

    std::string m_format;
    std::int64_t m_in_features = 0;
    float m_act_scale = 1.0f;
    std::int64_t m_act_zero_point = 0;
    float m_out_scale = 0.0f;
    std::int64_t m_out_zero_point = 0;
    std::int64_t m_heads = 0;
    std::int64_t m_int8_output = 0;
    float m_norm_epsilon = 0.0f;
    std::int64_t m_x_heads = 0;
};

}  // namespace vitsparse
