#include "sparse_linear.hpp"

#include <openvino/core/parallel.hpp>
#include <openvino/op/constant.hpp>

#include "vitsparse_kernels.hpp"

namespace vitsparse {

namespace {

constexpr const char* kInt8 = "int8_1x4";
constexpr const char* kF32 = "f32_csr";
constexpr const char* kBf16 = "bf16_1x2";

struct Layout {
    std::size_t inputs;
    std::vector<ov::element::Type> types;  // of inputs 1.. (x is f32)
};

const Layout* layout_of(const std::string& format) {
    static const Layout int8{7, {ov::element::i32, ov::element::i32, ov::element::i8, ov::element::i32,
                                 ov::element::f32, ov::element::f32}};
    static const Layout f32{5, {ov::element::i32, ov::element::i32, ov::element::f32, ov::element::f32}};
    static const Layout bf16{5, {ov::element::i32, ov::element::i32, ov::element::i32, ov::element::f32}};
    if (format == kInt8) return &int8;
    if (format == kF32) return &f32;
    if (format == kBf16) return &bf16;
    return nullptr;
}

template <typename T>
const T* data(const ov::Tensor& tensor) {
    return static_cast<const T*>(tensor.data());
}

// What is wrong with the weight tensors (indices out of range, sizes that disagree), or "".
std::string check_weight(const std::string& format, std::int64_t in_features, const std::vector<ov::Tensor>& t) {
    const auto rows = static_cast<std::int64_t>(t[0].get_size()) - 1;  // t: row_ptr, index, values, ...
    const auto entries = static_cast<std::int64_t>(t[1].get_size());
    const std::int64_t per_entry = format == kInt8 ? 4 : 1;  // bf16: a pair in one int32
    if (rows < 1) return "row_ptr needs at least 2 entries";
    if (static_cast<std::int64_t>(t[2].get_size()) != entries * per_entry) {
        return "values hold " + std::to_string(t[2].get_size()) + " codes for " + std::to_string(entries) +
               " entries (" + std::to_string(per_entry) + " each)";
    }
    for (std::size_t i = 3; i < t.size(); ++i) {
        if (static_cast<std::int64_t>(t[i].get_size()) != rows) {
            return "input " + std::to_string(i + 1) + " holds " + std::to_string(t[i].get_size()) +
                   " values, one per output channel (" + std::to_string(rows) + ") expected";
        }
    }
    if (format == kInt8) {
        Int8Blocks w{rows, in_features, data<std::int32_t>(t[0]), data<std::int32_t>(t[1]),
                     data<std::int8_t>(t[2]), data<std::int32_t>(t[3]), data<float>(t[4]), data<float>(t[5])};
        return check_int8_blocks(w, entries);
    }
    if (format == kBf16) {
        Bf16Pairs w{rows, in_features, data<std::int32_t>(t[0]), data<std::int32_t>(t[1]),
                    data<std::uint16_t>(t[2]), data<float>(t[3])};
        return check_bf16_pairs(w, entries);
    }
    F32Csr w{rows, in_features, data<std::int32_t>(t[0]), data<std::int32_t>(t[1]), data<float>(t[2]),
             data<float>(t[3])};
    return check_f32_csr(w, entries);
}

void host_parallel_for(std::size_t count, const std::function<void(std::size_t)>& body) {
    ov::parallel_for(count, [&](std::size_t i) { body(i); });
}

}  // namespace

SparseLinear::SparseLinear(const ov::OutputVector& inputs, std::string format, std::int64_t in_features,
                           float act_scale, std::int64_t act_zero_point)
    : Op(inputs), m_format(std::move(format)), m_in_features(in_features), m_act_scale(act_scale),
      m_act_zero_point(act_zero_point) {
    constructor_validate_and_infer_types();
}

void SparseLinear::validate_and_infer_types() {
    const Layout* layout = layout_of(m_format);
    NODE_VALIDATION_CHECK(this, layout != nullptr, "format must be '", kInt8, "', '", kBf16, "' or '", kF32,
                          "', not '", m_format, "'");
    NODE_VALIDATION_CHECK(this, get_input_size() == layout->inputs, "format ", m_format, " takes ",
                          layout->inputs, " inputs, got ", get_input_size());
    NODE_VALIDATION_CHECK(this, m_in_features > 0, "in_features must be positive, got ", m_in_features);
    if (m_format == kInt8) {
        NODE_VALIDATION_CHECK(this, m_act_scale > 0.0f && std::isfinite(m_act_scale),
                              "act_scale must be a positive number, got ", m_act_scale);
        NODE_VALIDATION_CHECK(this, m_act_zero_point >= 0 && m_act_zero_point <= 255,
                              "act_zero_point must be a uint8 value, got ", m_act_zero_point);
    }
    NODE_VALIDATION_CHECK(this, get_input_element_type(0) == ov::element::f32 ||
                                    get_input_element_type(0).is_dynamic(),
                          "x must be f32, got ", get_input_element_type(0));
    std::vector<ov::Tensor> weight;
    for (std::size_t i = 1; i < layout->inputs; ++i) {
        NODE_VALIDATION_CHECK(this, get_input_element_type(i) == layout->types[i - 1], "input ", i + 1,
                              " must be ", layout->types[i - 1], ", got ", get_input_element_type(i));
        auto constant = ov::as_type_ptr<ov::op::v0::Constant>(get_input_node_shared_ptr(i));
        NODE_VALIDATION_CHECK(this, constant != nullptr, "input ", i + 1, " (the weight) must be a constant");
        weight.emplace_back(constant->get_element_type(), constant->get_shape(),
                            const_cast<void*>(constant->get_data_ptr()));
    }
    const std::string problem = check_weight(m_format, m_in_features, weight);
    NODE_VALIDATION_CHECK(this, problem.empty(), "malformed sparse weight: ", problem);
    const auto rows = static_cast<std::int64_t>(weight[0].get_size()) - 1;

    ov::PartialShape shape = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, shape.rank().is_dynamic() || shape.rank().get_length() >= 1,
                          "x must have at least one dimension");
    if (shape.rank().is_static()) {
        auto& last = shape[shape.rank().get_length() - 1];
        NODE_VALIDATION_CHECK(this, last.compatible(m_in_features), "x has ", last, " features, the weight ",
                              m_in_features);
        last = rows;
    }
    set_output_type(0, ov::element::f32, shape);
}

std::shared_ptr<ov::Node> SparseLinear::clone_with_new_inputs(const ov::OutputVector& inputs) const {
    return std::make_shared<SparseLinear>(inputs, m_format, m_in_features, m_act_scale, m_act_zero_point);
}

bool SparseLinear::visit_attributes(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("format", m_format);
    visitor.on_attribute("in_features", m_in_features);
    visitor.on_attribute("act_scale", m_act_scale);
    visitor.on_attribute("act_zero_point", m_act_zero_point);
    return true;
}

bool SparseLinear::has_evaluate() const {
    return get_input_element_type(0) == ov::element::f32;
}

bool SparseLinear::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const ov::Tensor& x = inputs[0];
    ov::Shape shape = x.get_shape();
    OPENVINO_ASSERT(!shape.empty() && static_cast<std::int64_t>(shape.back()) == m_in_features,
                    "SparseLinear: x has ", shape.empty() ? 0 : shape.back(), " features, the weight ", m_in_features);
    const auto rows = static_cast<std::int64_t>(inputs[1].get_size()) - 1;
    const auto n = static_cast<std::int64_t>(ov::shape_size(shape) / static_cast<std::size_t>(m_in_features));
    shape.back() = static_cast<std::size_t>(rows);
    outputs[0].set_shape(shape);
    float* y = outputs[0].data<float>();
    const Isa isa = selected_isa();
    if (m_format == kInt8) {
        Int8Blocks w{rows, m_in_features, data<std::int32_t>(inputs[1]), data<std::int32_t>(inputs[2]),
                     data<std::int8_t>(inputs[3]), data<std::int32_t>(inputs[4]), data<float>(inputs[5]),
                     data<float>(inputs[6])};
        sparse_linear_int8(w, data<float>(x), n, m_in_features, m_act_scale,
                           static_cast<std::int32_t>(m_act_zero_point), y, isa, host_parallel_for);
    } else if (m_format == kBf16) {
        Bf16Pairs w{rows, m_in_features, data<std::int32_t>(inputs[1]), data<std::int32_t>(inputs[2]),
                    data<std::uint16_t>(inputs[3]), data<float>(inputs[4])};
        sparse_linear_bf16(w, data<float>(x), n, m_in_features, y, isa, host_parallel_for);
    } else {
        F32Csr w{rows, m_in_features, data<std::int32_t>(inputs[1]), data<std::int32_t>(inputs[2]),
                 data<float>(inputs[3]), data<float>(inputs[4])};
        sparse_linear_f32(w, data<float>(x), n, m_in_features, y, isa, host_parallel_for);
    }
    return true;
}

}  // namespace vitsparse
