// Batched singular values of LoRA updates s * B @ A without forming the product.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace lora_fast {

// sigma(|scaling[e]| * B[e][i] @ A[e][i]) for every entry e and batch index i; A[e] is (batch, r, n) and B[e]
// (batch, m, r), or both 2-D (one adapter), float32 or float64, with r < min(m, n). Returns (batch, r) per entry
// ((r) for 2-D entries), descending, in the input dtype.
std::vector<at::Tensor> lowrank_svdvals_cpu(at::TensorList a_list, at::TensorList b_list,
                                            at::ArrayRef<double> scaling);

}  // namespace lora_fast
