#!/usr/bin/env bash
# One command on a CUDA machine (H100 for the issue's figures):
#   bash benchmarks/gpu_lora_linear.sh [results.json]
# 1. runs the lora_linear tests with the Triton kernels compiled for the device (not the interpreter),
# 2. benchmarks fwd+bwd of base / peft / ref / compile_ref / ours at k=n=4096, r=16, 8192 tokens, bf16,
#    dropout 0 and 0.1, and at BERT-base size,
# 3. prints, per shape, ours vs PEFT (target >= 1.3x faster), ours vs the frozen base linear (target <= 1.15x)
#    and peak memory (target <= PEFT's),
# 4. times a MiniLM LoRA training step (floor / PEFT / ours, fp32 and bf16 autocast), interleaved, medians.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/lora_linear_gpu.json}"
mkdir -p "$(dirname "$out")"
# tests/conftest.py defaults TRITON_INTERPRET to 1 for CPU-only machines; a GPU run must compile the kernels
export TRITON_INTERPRET=0
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"

pytest tests/test_op_lora_linear.py -q
pytest benchmarks/bench_lora_linear.py --benchmark-only --benchmark-json="$out" -q

python - "$out" <<'EOF'
import collections
import json
import sys

groups = collections.defaultdict(dict)
for bench in json.load(open(sys.argv[1]))["benchmarks"]:
    groups[bench["group"]][bench["extra_info"]["provider"]] = bench
print(f"{'shape':58s} {'ours ms':>8s} {'peft/ours':>9s} {'ours/base':>9s} {'mem ours':>9s} {'mem peft':>9s}")
for group, by_provider in groups.items():
    ours, peft, base = (by_provider.get(p) for p in ("ours", "peft", "base"))
    if not (ours and peft and base):
        continue
    t_ours, t_peft, t_base = (b["stats"]["median"] for b in (ours, peft, base))
    print(
        f"{group:58s} {t_ours * 1e3:8.3f} {t_peft / t_ours:9.2f} {t_ours / t_base:9.2f} "
        f"{ours['extra_info']['peak_mem_mb']:8.0f}M {peft['extra_info']['peak_mem_mb']:8.0f}M"
    )
EOF

python benchmarks/bench_train_step.py --rounds 30
