// Batched singular values of LoRA updates s * B @ A without forming the product.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace lora_fast {

// sigma(|scaling[e]| * B[e][i] @ A[e][i]) for every entry e and batch index i; A[e] is (batch, r, n), B[e] is
// (batch, m, r), float32 or float64, with r < min(m, n). Returns (batch, min(r, m, n)) per entry, descending, in the input dtype.
std::vector<at::Tensor> lowrank_svdvals_cpu(at::TensorList a_list, at::TensorList b_list,
                                            at::ArrayRef<double> scaling);

}  // namespace lora_fast
