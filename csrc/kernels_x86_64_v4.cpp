// The kernels of kernels.h for x86-64-v4, on CPUs that have it (lowrank_svd.cpp checks).
#define LF_TARGET __attribute__((target("arch=x86-64-v4")))
#define LF_FUSED_V4 1  // the fused r = 8 and r = 16 Gram kernels (AVX-512 intrinsics)
#include "kernels.h"

namespace lora_fast {

LF_TARGET int32_t run_x86_64_v4(const Job& job, Scratch& s) { return run_job<IsaV4>(job, s); }

}  // namespace lora_fast
