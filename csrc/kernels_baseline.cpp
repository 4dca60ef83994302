// The kernels of kernels.h for the compiler's baseline instruction set.
#include "kernels.h"

namespace lora_fast {

int32_t run_baseline(const Job& job, Scratch& s) { return run_job<IsaBase>(job, s); }

}  // namespace lora_fast
