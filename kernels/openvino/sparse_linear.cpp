#include "sparse_linear.hpp"

#include "vitsparse_kernels.hpp"
#include "weights.hpp"

namespace vitsparse {

using namespace extension;

SparseLinear::SparseLinear(const ov::OutputVector& inputs, std::string format, std::int64_t in_features,
                           float act_scale, std::int64_t act_zero_point, float out_scale,
                           std::int64_t out_zero_point, std::int64_t heads, std::int64_t int8_output,
                           float norm_epsilon, std::int64_t x_heads)
    : Op(inputs), m_format(std::move(format)), m_in_features(in_features), m_act_scale(act_scale),
      m_act_zero_point(act_zero_point), m_out_scale(out_scale), m_out_zero_point(out_zero_point), m_heads(heads),
      m_int8_output(int8_output), m_norm_epsilon(norm_epsilon), m_x_heads(x_heads) {
    constructor_validate_and_infer_types();
}

void SparseLinear::validate_and_infer_types() {
    const auto* types = weight_types(m_format);
    NODE_VALIDATION_CHECK(this, types != nullptr, "format must be '", kInt8, "', '", kBf16, "' or '", kF32,
                          "', not '", m_format, "'");
    const bool int8 = m_format == kInt8;
    NODE_VALIDATION_CHECK(this, m_in_features > 0, "in_features must be positive, got ", m_in_features);
    NODE_VALIDATION_CHECK(this, int8 || m_norm_epsilon == 0.0f, "only an int8_1x4 node normalizes x");
    // x, the weight and the LayerNorm's gamma and beta; INT8 may add an addend
    const std::size_t inputs = types->size() + 1 + check_norm(this, types->size() + 1, m_in_features, m_norm_epsilon);
    NODE_VALIDATION_CHECK(this, get_input_size() == inputs || (int8 && get_input_size() == inputs + 1), "format ",
                          m_format, " takes ", inputs, " inputs", int8 ? " (one more with an addend)" : "", ", got ",
                          get_input_size());
    if (int8) {
        std::string problem = check_quantization("act", m_act_scale, m_act_zero_point, false);
        if (problem.empty()) problem = check_quantization("out", m_out_scale, m_out_zero_point, true);
        NODE_VALIDATION_CHECK(this, problem.empty(), problem);
    }
    const std::vector<ov::Tensor> weight = constant_inputs(this, 1, *types);
    const std::string problem = check_weight(m_format, m_in_features, weight);
    NODE_VALIDATION_CHECK(this, problem.empty(), "malformed sparse weight: ", problem);
    const auto rows = static_cast<std::int64_t>(weight[0].get_size()) - 1;
    const ov::element::Type io = io_type(this, int8);
    const ov::PartialShape output =
        m_x_heads != 0 ? heads_input_output_shape(rows) : linear_output_shape(this, m_in_features, rows);
    check_addend(this, inputs, output);
    if (m_heads != 0) check_heads(weight, inputs);
    if (m_int8_output != 0) check_int8_output(inputs);
    set_output_type(0, m_int8_output != 0 ? ov::element::i8 : io, output);
}

ov::PartialShape SparseLinear::heads_input_output_shape(std::int64_t rows) const {
    NODE_VALIDATION_CHECK(this, m_format == kInt8, "only an int8_1x4 node reads x head by head");
    Int8Blocks w{};
    w.cols = m_in_features;
    w.x_heads = m_x_heads;
    w.heads = m_heads;
    const float gamma = 1.0f;
    if (m_norm_epsilon != 0.0f) w.norm.gamma = &gamma;  // (only whether it normalizes is checked)
    const std::string problem = vitsparse::check_x_heads(w);
    NODE_VALIDATION_CHECK(this, problem.empty(), problem);
    const ov::PartialShape& x = get_input_partial_shape(0);
    const ov::PartialShape expected{ov::Dimension::dynamic(), m_x_heads, ov::Dimension::dynamic(),
                                    m_in_features / m_x_heads};
    NODE_VALIDATION_CHECK(this, x.compatible(expected), "a node that reads x head by head reads it as [batch, ",
                          m_x_heads, ", tokens, ", m_in_features / m_x_heads, "], got ", x);
    if (x.rank().is_dynamic()) return {ov::Dimension::dynamic(), ov::Dimension::dynamic(), rows};
    return {x[0], x[2], rows};
}

void SparseLinear::check_int8_output(std::size_t inputs) const {
    NODE_VALIDATION_CHECK(this, m_int8_output == 1, "int8_output must be 0 or 1, got ", m_int8_output);
    NODE_VALIDATION_CHECK(this, m_format == kInt8, "only an int8_1x4 node writes int8");
    NODE_VALIDATION_CHECK(this, m_out_scale > 0.0f, "a node that writes int8 needs out_scale above 0");
    NODE_VALIDATION_CHECK(this, get_input_size() == inputs, "a node that writes int8 takes no addend");
}

void SparseLinear::check_heads(const std::vector<ov::Tensor>& weight, std::size_t inputs) const {
    NODE_VALIDATION_CHECK(this, m_format == kInt8, "only an int8_1x4 node splits its output into heads");
    NODE_VALIDATION_CHECK(this, get_input_size() == inputs, "a node split into heads takes no addend");
    Int8Blocks w = int8_blocks(m_in_features, weight.data(), true);
    w.heads = m_heads;
    const std::string problem = vitsparse::check_heads(w);
    NODE_VALIDATION_CHECK(this, problem.empty(), problem);
    NODE_VALIDATION_CHECK(this, get_input_partial_shape(0).rank().compatible(3),
                          "a node split into heads reads x as [batch, tokens, ", m_in_features, "], got ",
                          get_input_partial_shape(0));
}

std::shared_ptr<ov::Node> SparseLinear::clone_with_new_inputs(const ov::OutputVector& inputs) const {
    return std::make_shared<SparseLinear>(inputs, m_format, m_in_features, m_act_scale, m_act_zero_point,
                                          m_out_scale, m_out_zero_point, m_heads, m_int8_output, m_norm_epsilon,
                                          m_x_heads);
}

bool SparseLinear::visit_attributes(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("format", m_format);
    visitor.on_attribute("in_features", m_in_features);
    visitor.on_attribute("act_scale", m_act_scale);
    visitor.on_attribute("act_zero_point", m_act_zero_point);
    visitor.on_attribute("out_scale", m_out_scale);
    visitor.on_attribute("out_zero_point", m_out_zero_point);
    visitor.on_attribute("heads", m_heads);
    visitor.on_attribute("int8_output", m_int8_output);
    visitor.on_attribute("norm_epsilon", m_norm_epsilon);
    visitor.on_attribute("x_heads", m_x_heads);
    return true;
}

bool SparseLinear::has_evaluate() const {
    const ov::element::Type x = get_input_element_type(0);
    return x == ov::element::f32 || (m_format == kInt8 && x == ov::element::bf16);
}

bool SparseLinear::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const ov::Tensor& x = inputs[0];
    ov::Shape shape = x.get_shape();
    OPENVINO_ASSERT(m_x_heads == 0 || (shape.size() == 4 && static_cast<std::int64_t>(shape[1]) == m_x_heads),
                    "SparseLinear: a node that reads x head by head reads it as [batch, ", m_x_heads,
                    ", tokens, head_dim], got ", shape);
    const std::int64_t features = m_x_heads != 0 ? m_x_heads * static_cast<std::int64_t>(shape.back())
                                  : shape.empty()  ? 0
                                                   : static_cast<std::int64_t>(shape.back());
    OPENVINO_ASSERT(features == m_in_features, "SparseLinear: x has ", features, " features, the weight ",
                    m_in_features);
    const auto rows = static_cast<std::int64_t>(inputs[1].get_size()) - 1;
    const auto n = static_cast<std::int64_t>(ov::shape_size(shape) / static_cast<std::size_t>(m_in_features));
    OPENVINO_ASSERT(m_heads == 0 || shape.size() == 3, "SparseLinear: a node split into heads reads x as [batch, ",
                    "tokens, features], got ", shape);
    const std::size_t tokens = m_x_heads != 0 ? shape[2] : shape.size() > 1 ? shape[1] : 1;
    if (m_x_heads != 0) shape = {shape[0], shape[2], 0};
    shape.back() = static_cast<std::size_t>(rows);
    outputs[0].set_shape(shape);
    const Isa isa = selected_isa();
    if (m_format == kInt8) {
        const std::size_t norm = weight_types(m_format)->size() + 1;  // gamma and beta, where it normalizes
        Int8Blocks w = int8_blocks(m_in_features, &inputs[1], true);
        w.out_scale = m_out_scale;
        w.out_zero_point = static_cast<std::int32_t>(m_out_zero_point);
        w.norm = layer_norm(&inputs[norm], m_norm_epsilon);
        if (inputs.size() > norm + (w.norm.active() ? 2 : 0)) w.addend = inputs.back().data();
        w.heads = m_heads;
        w.x_heads = m_x_heads;
        w.tokens = static_cast<std::int64_t>(tokens);
        const auto zero_point = static_cast<std::int32_t>(m_act_zero_point);
        if (m_int8_output != 0) {
            auto* y = mutable_data<std::int8_t>(outputs[0]);
            if (x.get_element_type() == ov::element::bf16) {
                sparse_linear_int8(w, data<Bf16>(x), n, m_in_features, m_act_scale, zero_point, y, isa, host_threads());
            } else {
                sparse_linear_int8(w, data<float>(x), n, m_in_features, m_act_scale, zero_point, y, isa, host_threads());
            }
        } else if (x.get_element_type() == ov::element::bf16) {
            sparse_linear_int8(w, data<Bf16>(x), n, m_in_features, m_act_scale, zero_point,
                               mutable_data<Bf16>(outputs[0]), isa, host_threads());
        } else {
            sparse_linear_int8(w, data<float>(x), n, m_in_features, m_act_scale, zero_point,
                               mutable_data<float>(outputs[0]), isa, host_threads());
        }
    } else if (m_format == kBf16) {
        Bf16Pairs w{rows, m_in_features, data<std::int32_t>(inputs[1]), data<std::int32_t>(inputs[2]),
                    data<std::uint16_t>(inputs[3]), data<float>(inputs[4])};
        sparse_linear_bf16(w, data<float>(x), n, m_in_features, mutable_data<float>(outputs[0]), isa, host_threads());
    } else {
        F32Csr w{rows, m_in_features, data<std::int32_t>(inputs[1]), data<std::int32_t>(inputs[2]),
                 data<float>(inputs[3]), data<float>(inputs[4])};
        sparse_linear_f32(w, data<float>(x), n, m_in_features, mutable_data<float>(outputs[0]), isa, host_threads());
    }
    return true;
}

}  // namespace vitsparse
