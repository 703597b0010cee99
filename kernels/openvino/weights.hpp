// What SparseLinear and SparseMLP share: their weight formats, reading and checking the constant inputs
// that hold a packed weight, the quantization attributes, the output shape, and OpenVINO's thread pool.
#pragma once

#include <openvino/core/node.hpp>
#include <openvino/runtime/tensor.hpp>

#include <string>
#include <vector>

#include "vitsparse_kernels.hpp"

namespace vitsparse::extension {

constexpr const char* kInt8 = "int8_1x4";
constexpr const char* kF32 = "f32_csr";
constexpr const char* kBf16 = "bf16_1x2";

// Element types of a format's weight inputs, in order: row_ptr, index, values, then per-row arrays.
const std::vector<ov::element::Type>* weight_types(const std::string& format);
// The INT8 per-row arrays after row_ptr, block_col, values: row_sums, scale, bias.
const std::vector<ov::element::Type>& int8_types(bool with_bias);

template <typename T>
const T* data(const ov::Tensor& tensor) {
    return static_cast<const T*>(tensor.data());
}

// Inputs [first, first + types.size()) of `node` as tensors over their constants' data, checked to be
// constants of these types (a failed check names the node and the input).
std::vector<ov::Tensor> constant_inputs(const ov::Node* node, std::size_t first,
                                        const std::vector<ov::element::Type>& types);

// What is wrong with a packed weight's tensors (row_ptr, index, values, per-row arrays), or "".
std::string check_weight(const std::string& format, std::int64_t in_features, const std::vector<ov::Tensor>& t);

// An INT8 weight over tensors t[first..]: row_ptr, block_col, values, row_sums, scale[, bias].
Int8Blocks int8_blocks(std::int64_t in_features, const ov::Tensor* t, bool with_bias);

// "" when scale and zero point are a usable uint8 quantization (what = the attributes' name), else why not.
std::string check_quantization(const char* what, float scale, std::int64_t zero_point, bool optional);

// x's element type, which y takes: f32, or bf16 where `bf16_allowed` (the INT8 kernels read and write
// bfloat16 too); f32 while x's is not known yet.
ov::element::Type io_type(const ov::Node* node, bool bf16_allowed);

// x's shape with its last dimension (in_features) replaced by out_features; checks the feature count.
ov::PartialShape linear_output_shape(const ov::Node* node, std::int64_t in_features, std::int64_t out_features);

// Checks the optional addend input `index` (the residual an INT8 node adds to its output): of x's element
// type and the output's shape. Returns whether the node has one.
bool check_addend(const ov::Node* node, std::size_t index, const ov::PartialShape& output);

// An INT8 node that normalizes x (attribute norm_epsilon > 0) reads its LayerNorm's gamma and beta, f32
// constants of in_features values, as inputs [first, first + 2). Checks them (and epsilon: 0 for none,
// else positive); returns how many inputs they take, 0 or 2.
std::size_t check_norm(const ov::Node* node, std::size_t first, std::int64_t in_features, float epsilon);
// The kernels' LayerNorm over gamma and beta at t[0], t[1]; none where epsilon is 0.
LayerNorm layer_norm(const ov::Tensor* t, float epsilon);

// OpenVINO's pool, as the compiled model set it up (INFERENCE_NUM_THREADS, streams).
ParallelFor host_threads();

// A tensor's data as T, for T = Bf16 where its element type is bf16.
template <typename T>
T* mutable_data(ov::Tensor& tensor) {
    return static_cast<T*>(tensor.data());
}

}  // namespace vitsparse::extension
