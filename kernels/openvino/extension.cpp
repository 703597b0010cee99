// The library OpenVINO loads with Core.add_extension: the SparseLinear operation, and the ONNX frontend's
// mapping from a com.vitsparse::SparseLinear node to it.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>

#include "sparse_linear.hpp"

namespace {

ov::OutputVector convert_onnx_node(const ov::frontend::NodeContext& node) {
    ov::OutputVector inputs;
    for (std::size_t i = 0; i < node.get_input_size(); ++i) inputs.push_back(node.get_input(static_cast<int>(i)));
    auto op = std::make_shared<vitsparse::SparseLinear>(
        inputs, node.get_attribute<std::string>("format"), node.get_attribute<std::int64_t>("in_features"),
        node.get_attribute<float>("act_scale", 1.0f), node.get_attribute<std::int64_t>("act_zero_point", 0));
    return op->outputs();
}

}  // namespace

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<vitsparse::SparseLinear>>(),
     std::make_shared<ov::frontend::onnx::ConversionExtension>("SparseLinear", "com.vitsparse", convert_onnx_node)}));
