// SparseMLP: OpenVINO's operation for a pruned INT8 MLP, fc2(activation(fc1(x))), run by one fused
// kernel that keeps the hidden activations in cache (Int8Mlp in vitsparse_kernels.hpp). The activation
// (with fc1's bias and the quantization around it) comes as a table of 256 codes per hidden channel.
#pragma once

#include <openvino/op/op.hpp>

namespace vitsparse {

class SparseMLP : public ov::op::Op {
public:
    OPENVINO_OP("SparseMLP", "vitsparse");

    // inputs: x; fc1's row_ptr, block_col, values, row_sums, scale; table (uint8, [hidden, 256]);
    // fc2's row_ptr, block_col, values, row_sums, scale, bias; with norm_epsilon > 0, x's LayerNorm's
    // gamma and beta; then optionally an addend (added to the output)
    SparseMLP() = default;
    SparseMLP(const ov::OutputVector& inputs, std::int64_t in_features, float act_scale,
              std::int64_t act_zero_point, float fc1_out_scale, std::int64_t fc1_out_zero_point,
              std::int64_t hidden_zero_point, float out_scale, std::int64_t out_zero_point,
              float norm_epsilon = 0.0f);

    void validate_and_infer_types() override;
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& inputs) const override;
    bool visit_attributes(ov::AttributeVisitor& visitor) override;
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;
    bool has_evaluate() const override;

private:
    std::int64_t m_in_features = 0;
    float m_act_scale = 1.0f;             // x's quantization
    std::int64_t m_act_zero_point = 0;
    float m_fc1_out_scale = 1.0f;         // fc1 output quantization: the table index
    std::int64_t m_fc1_out_zero_point = 0;
    std::int64_t m_hidden_zero_point = 0; // the table's codes, fc2's input
    float m_out_scale = 0.0f;             // fc2's output quantization (0: none)
    std::int64_t m_out_zero_point = 0;
    float m_norm_epsilon = 0.0f;          // x's LayerNorm (0: none)
};

}  // namespace vitsparse
