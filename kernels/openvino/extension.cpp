// The library OpenVINO loads with Core.add_extension: the SparseLinear and SparseMLP operations, and the
// ONNX frontend's mapping from com.vitsparse nodes to them.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>

#include "sparse_linear.hpp"
#include "sparse_mlp.hpp"

namespace {

ov::OutputVector inputs_of(const ov::frontend::NodeContext& node) {
    ov::OutputVector inputs;
    for (std::size_t i = 0; i < node.get_input_size(); ++i) inputs.push_back(node.get_input(static_cast<int>(i)));
    return inputs;
}

ov::OutputVector convert_linear(const ov::frontend::NodeContext& node) {
    return std::make_shared<vitsparse::SparseLinear>(
               inputs_of(node), node.get_attribute<std::string>("format"),
               node.get_attribute<std::int64_t>("in_features"), node.get_attribute<float>("act_scale", 1.0f),
               node.get_attribute<std::int64_t>("act_zero_point", 0), node.get_attribute<float>("out_scale", 0.0f),
               node.get_attribute<std::int64_t>("out_zero_point", 0), node.get_attribute<std::int64_t>("heads", 0),
               node.get_attribute<std::int64_t>("int8_output", 0), node.get_attribute<float>("norm_epsilon", 0.0f),
               node.get_attribute<std::int64_t>("x_heads", 0))
        ->outputs();
}

ov::OutputVector convert_mlp(const ov::frontend::NodeContext& node) {
    return std::make_shared<vitsparse::SparseMLP>(
               inputs_of(node), node.get_attribute<std::int64_t>("in_features"),
               node.get_attribute<float>("act_scale"), node.get_attribute<std::int64_t>("act_zero_point"),
               node.get_attribute<float>("fc1_out_scale"), node.get_attribute<std::int64_t>("fc1_out_zero_point"),
               node.get_attribute<std::int64_t>("hidden_zero_point"), node.get_attribute<float>("out_scale", 0.0f),
               node.get_attribute<std::int64_t>("out_zero_point", 0), node.get_attribute<float>("norm_epsilon", 0.0f))
        ->outputs();
}

}  // namespace

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<vitsparse::SparseLinear>>(),
     std::make_shared<ov::OpExtension<vitsparse::SparseMLP>>(),
     std::make_shared<ov::frontend::onnx::ConversionExtension>("SparseLinear", "com.vitsparse", convert_linear),
     std::make_shared<ov::frontend::onnx::ConversionExtension>("SparseMLP", "com.vitsparse", convert_mlp)}));
