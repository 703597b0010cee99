#include "sparse_mlp.hpp"

#include "vitsparse_kernels.hpp"
#include "weights.hpp"

namespace vitsparse {

using namespace extension;

namespace {
constexpr std::size_t kFc1 = 1, kTable = 6, kFc2 = 7, kNorm = 13;  // first input of each part
}

SparseMLP::SparseMLP(const ov::OutputVector& inputs, std::int64_t in_features, float act_scale,
                     std::int64_t act_zero_point, float fc1_out_scale, std::int64_t fc1_out_zero_point,
                     std::int64_t hidden_zero_point, float out_scale, std::int64_t out_zero_point,
                     float norm_epsilon)
    : Op(inputs), m_in_features(in_features), m_act_scale(act_scale), m_act_zero_point(act_zero_point),
      m_fc1_out_scale(fc1_out_scale), m_fc1_out_zero_point(fc1_out_zero_point),
      m_hidden_zero_point(hidden_zero_point), m_out_scale(out_scale), m_out_zero_point(out_zero_point),
      m_norm_epsilon(norm_epsilon) {
    constructor_validate_and_infer_types();
}

void SparseMLP::validate_and_infer_types() {
    NODE_VALIDATION_CHECK(this, m_in_features > 0, "in_features must be positive, got ", m_in_features);
    const std::size_t inputs = kNorm + check_norm(this, kNorm, m_in_features, m_norm_epsilon);
    NODE_VALIDATION_CHECK(this, get_input_size() == inputs || get_input_size() == inputs + 1, "SparseMLP takes ",
                          inputs, " inputs (one more with an addend), got ", get_input_size());
    std::string problem = check_quantization("act", m_act_scale, m_act_zero_point, false);
    if (problem.empty()) problem = check_quantization("fc1_out", m_fc1_out_scale, m_fc1_out_zero_point, false);
    if (problem.empty()) problem = check_quantization("hidden", 1.0f, m_hidden_zero_point, false);
    if (problem.empty()) problem = check_quantization("out", m_out_scale, m_out_zero_point, true);
    NODE_VALIDATION_CHECK(this, problem.empty(), problem);

    const std::vector<ov::Tensor> fc1 = constant_inputs(this, kFc1, int8_types(false));
    problem = check_weight(kInt8, m_in_features, fc1);
    NODE_VALIDATION_CHECK(this, problem.empty(), "malformed fc1 weight: ", problem);
    const auto hidden = static_cast<std::int64_t>(fc1[0].get_size()) - 1;
    const std::vector<ov::Tensor> fc2 = constant_inputs(this, kFc2, int8_types(true));
    problem = check_weight(kInt8, hidden, fc2);
    NODE_VALIDATION_CHECK(this, problem.empty(), "malformed fc2 weight (", hidden, " inputs): ", problem);
    const std::vector<ov::Tensor> table = constant_inputs(this, kTable, {ov::element::u8});
    NODE_VALIDATION_CHECK(this, table[0].get_size() == static_cast<std::size_t>(hidden * 256), "the table holds ",
                          table[0].get_size(), " codes, 256 per hidden channel (", hidden * 256, ") expected");
    const auto rows = static_cast<std::int64_t>(fc2[0].get_size()) - 1;
    const ov::element::Type io = io_type(this, true);
    const ov::PartialShape output = linear_output_shape(this, m_in_features, rows);
    check_addend(this, inputs, output);
    set_output_type(0, io, output);
}

std::shared_ptr<ov::Node> SparseMLP::clone_with_new_inputs(const ov::OutputVector& inputs) const {
    return std::make_shared<SparseMLP>(inputs, m_in_features, m_act_scale, m_act_zero_point, m_fc1_out_scale,
                                       m_fc1_out_zero_point, m_hidden_zero_point, m_out_scale, m_out_zero_point,
                                       m_norm_epsilon);
}

bool SparseMLP::visit_attributes(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("in_features", m_in_features);
    visitor.on_attribute("act_scale", m_act_scale);
    visitor.on_attribute("act_zero_point", m_act_zero_point);
    visitor.on_attribute("fc1_out_scale", m_fc1_out_scale);
    visitor.on_attribute("fc1_out_zero_point", m_fc1_out_zero_point);
    visitor.on_attribute("hidden_zero_point", m_hidden_zero_point);
    visitor.on_attribute("out_scale", m_out_scale);
    visitor.on_attribute("out_zero_point", m_out_zero_point);
    visitor.on_attribute("norm_epsilon", m_norm_epsilon);
    return true;
}

bool SparseMLP::has_evaluate() const {
    return get_input_element_type(0) == ov::element::f32 || get_input_element_type(0) == ov::element::bf16;
}

bool SparseMLP::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const ov::Tensor& x = inputs[0];
    ov::Shape shape = x.get_shape();
    OPENVINO_ASSERT(!shape.empty() && static_cast<std::int64_t>(shape.back()) == m_in_features,
                    "SparseMLP: x has ", shape.empty() ? 0 : shape.back(), " features, fc1 ", m_in_features);
    Int8Mlp mlp;
    mlp.fc1 = int8_blocks(m_in_features, &inputs[kFc1], false);
    mlp.fc1_out_scale = m_fc1_out_scale;
    mlp.fc1_out_zero_point = static_cast<std::int32_t>(m_fc1_out_zero_point);
    mlp.table = data<std::uint8_t>(inputs[kTable]);
    mlp.hidden_zero_point = static_cast<std::int32_t>(m_hidden_zero_point);
    mlp.fc2 = int8_blocks(mlp.fc1.rows, &inputs[kFc2], true);
    mlp.fc2.out_scale = m_out_scale;
    mlp.fc2.out_zero_point = static_cast<std::int32_t>(m_out_zero_point);
    mlp.fc1.norm = layer_norm(&inputs[kNorm], m_norm_epsilon);
    if (inputs.size() > kNorm + (mlp.fc1.norm.active() ? 2 : 0)) mlp.fc2.addend = inputs.back().data();
    const auto n = static_cast<std::int64_t>(ov::shape_size(shape) / static_cast<std::size_t>(m_in_features));
    shape.back() = static_cast<std::size_t>(mlp.fc2.rows);
    outputs[0].set_shape(shape);
    const auto zero_point = static_cast<std::int32_t>(m_act_zero_point);
    if (x.get_element_type() == ov::element::bf16) {
        sparse_mlp_int8(mlp, data<Bf16>(x), n, m_in_features, m_act_scale, zero_point, mutable_data<Bf16>(outputs[0]),
                        selected_isa(), host_threads());
    } else {
        sparse_mlp_int8(mlp, data<float>(x), n, m_in_features, m_act_scale, zero_point,
                        mutable_data<float>(outputs[0]), selected_isa(), host_threads());
    }
    return true;
}

}  // namespace vitsparse
