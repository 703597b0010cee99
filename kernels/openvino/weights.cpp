#include "weights.hpp"

#include <openvino/core/parallel.hpp>
#include <openvino/op/constant.hpp>

#include <algorithm>
#include <cmath>

namespace vitsparse::extension {

const std::vector<ov::element::Type>* weight_types(const std::string& format) {
    using ov::element::f32, ov::element::i32, ov::element::i8;
    static const std::vector<ov::element::Type> int8{i32, i32, i8, i32, f32, f32};
    static const std::vector<ov::element::Type> f32_csr{i32, i32, f32, f32};
    static const std::vector<ov::element::Type> bf16{i32, i32, i32, f32};  // a bfloat16 pair per int32
    if (format == kInt8) return &int8;
    if (format == kF32) return &f32_csr;
    if (format == kBf16) return &bf16;
    return nullptr;
}

const std::vector<ov::element::Type>& int8_types(bool with_bias) {
    static const std::vector<ov::element::Type> with(*weight_types(kInt8));
    static const std::vector<ov::element::Type> without(with.begin(), with.end() - 1);
    return with_bias ? with : without;
}

std::vector<ov::Tensor> constant_inputs(const ov::Node* node, std::size_t first,
                                        const std::vector<ov::element::Type>& types) {
    std::vector<ov::Tensor> tensors;
    for (std::size_t i = 0; i < types.size(); ++i) {
        const std::size_t input = first + i;
        NODE_VALIDATION_CHECK(node, node->get_input_element_type(input) == types[i], "input ", input + 1,
                              " must be ", types[i], ", got ", node->get_input_element_type(input));
        auto constant = ov::as_type_ptr<ov::op::v0::Constant>(node->get_input_node_shared_ptr(input));
        NODE_VALIDATION_CHECK(node, constant != nullptr, "input ", input + 1, " (the weight) must be a constant");
        tensors.emplace_back(constant->get_element_type(), constant->get_shape(),
                             const_cast<void*>(constant->get_data_ptr()));
    }
    return tensors;
}

Int8Blocks int8_blocks(std::int64_t in_features, const ov::Tensor* t, bool with_bias) {
    const auto rows = static_cast<std::int64_t>(t[0].get_size()) - 1;
    Int8Blocks w;
    w.rows = rows;
    w.cols = in_features;
    w.row_ptr = data<std::int32_t>(t[0]);
    w.block_col = data<std::int32_t>(t[1]);
    w.values = data<std::int8_t>(t[2]);
    w.row_sums = data<std::int32_t>(t[3]);
    w.scale = data<float>(t[4]);
    w.bias = with_bias ? data<float>(t[5]) : nullptr;
    return w;
}

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
    if (format == kInt8) return check_int8_blocks(int8_blocks(in_features, t.data(), t.size() > 5), entries);
    if (format == kBf16) {
        Bf16Pairs w{rows, in_features, data<std::int32_t>(t[0]), data<std::int32_t>(t[1]),
                    data<std::uint16_t>(t[2]), data<float>(t[3])};
        return check_bf16_pairs(w, entries);
    }
    F32Csr w{rows, in_features, data<std::int32_t>(t[0]), data<std::int32_t>(t[1]), data<float>(t[2]),
             data<float>(t[3])};
    return check_f32_csr(w, entries);
}

std::string check_quantization(const char* what, float scale, std::int64_t zero_point, bool optional) {
    if (!(std::isfinite(scale) && (scale > 0.0f || (optional && scale == 0.0f)))) {
        return std::string(what) + " scale must be a positive number" + (optional ? " (or 0: none)" : "") +
               ", got " + std::to_string(scale);
    }
    if (zero_point < 0 || zero_point > 255) {
        return std::string(what) + " zero point must be a uint8 value, got " + std::to_string(zero_point);
    }
    return "";
}

ov::element::Type io_type(const ov::Node* node, bool bf16_allowed) {
    const ov::element::Type x = node->get_input_element_type(0);
    if (x.is_dynamic()) return ov::element::f32;
    NODE_VALIDATION_CHECK(node, x == ov::element::f32 || (bf16_allowed && x == ov::element::bf16),
                          bf16_allowed ? "x must be f32 or bf16, got " : "x must be f32, got ", x);
    return x;
}

ov::PartialShape linear_output_shape(const ov::Node* node, std::int64_t in_features, std::int64_t out_features) {
    ov::PartialShape shape = node->get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(node, shape.rank().is_dynamic() || shape.rank().get_length() >= 1,
                          "x must have at least one dimension");
    if (shape.rank().is_static()) {
        auto& last = shape[shape.rank().get_length() - 1];
        NODE_VALIDATION_CHECK(node, last.compatible(in_features), "x has ", last, " features, the weight ",
                              in_features);
        last = out_features;
    }
    return shape;
}

bool check_addend(const ov::Node* node, std::size_t index, const ov::PartialShape& output) {
    if (node->get_input_size() <= index) return false;
    const ov::element::Type type = node->get_input_element_type(index), x = io_type(node, true);
    NODE_VALIDATION_CHECK(node, type == x || type.is_dynamic(), "the addend must be ", x, " as x is, got ", type);
    const ov::PartialShape& shape = node->get_input_partial_shape(index);
    NODE_VALIDATION_CHECK(node, shape.compatible(output), "the addend's shape ", shape,
                          " differs from the output's ", output);
    return true;
}

std::size_t check_norm(const ov::Node* node, std::size_t first, std::int64_t in_features, float epsilon) {
    NODE_VALIDATION_CHECK(node, epsilon >= 0.0f, "norm_epsilon must be positive (0: no LayerNorm), got ", epsilon);
    if (epsilon == 0.0f) return 0;
    NODE_VALIDATION_CHECK(node, node->get_input_size() >= first + 2, "a node with norm_epsilon takes its LayerNorm's ",
                          "gamma and beta as inputs ", first + 1, " and ", first + 2);
    for (const ov::Tensor& t : constant_inputs(node, first, {ov::element::f32, ov::element::f32})) {
        NODE_VALIDATION_CHECK(node, static_cast<std::int64_t>(t.get_size()) == in_features, "the LayerNorm's ",
                              "gamma and beta hold one value per input channel (", in_features, "), got ",
                              t.get_size());
    }
    return 2;
}

LayerNorm layer_norm(const ov::Tensor* t, float epsilon) {
    if (epsilon == 0.0f) return {};
    return {data<float>(t[0]), data<float>(t[1]), epsilon};
}

ParallelFor host_threads() {
    return {[](std::size_t count, const ParallelFor::Body& body) {
        ov::parallel_for(count, [&](std::size_t i) { body(i); });
    }, static_cast<std::size_t>(std::max(1, ::parallel_get_max_threads()))};
}

}  // namespace vitsparse::extension
