// Python module lora_fast._C. Loading it registers the dispatcher ops (torch.ops.lora_fast_C.*, see
// lowrank_svd.cpp); the module itself only reports how it was built, so Python can refuse a mismatched build.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "lora_fast compiled ops; the ops are registered as torch.ops.lora_fast_C.*";
  m.attr("torch_version") = LORA_FAST_TORCH_VERSION;
#ifdef LORA_FAST_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
