// The kernels of kernels.h for x86-64-v3, on CPUs that have it (lowrank_svd.cpp checks).
#define LF_TARGET __attribute__((target("arch=x86-64-v3")))
#include "kernels.h"

namespace lora_fast {

LF_TARGET int32_t run_x86_64_v3(const Job& job, Scratch& s) { return run_job<IsaV3>(job, s); }

}  // namespace lora_fast
