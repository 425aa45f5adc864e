// Per-element math of fastdiff::diff_norm (per-row L2 norm of a - b), shared by the CPU
// (csrc/cpu/reduce.cpp) and CUDA (csrc/cuda/reduce_kernel.cu) kernels.
//
// Accuracy scheme, the same on both backends: squares are summed in the accumulation
// type (float for float/half/bfloat16, double for double) over blocks of at most kBlock
// elements, each block with many independent partial sums (vector lanes / threads); the
// block sums are then added in double. The rounding error therefore grows with the block
// length, not with the row length, so rows of 1e8 elements stay accurate.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastdiff {
namespace reduce {

constexpr int64_t kBlock = 4096;

// (a - b)^2 in the accumulation type.
template <typename acc>
FASTDIFF_HOST_DEVICE acc sq_diff(acc a, acc b) {
  const acc d = a - b;
  return d * d;
}

}  // namespace reduce
}  // namespace fastdiff
