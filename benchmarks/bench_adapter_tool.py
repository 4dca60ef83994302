"""``lora-fast analyze`` and ``shrink`` on saved adapters, beside PEFT's dense route on the same files.

Adapters: random factors written as PEFT folders (A ~ N(0, 1/n), B's columns scaled over two decades, as a trained
adapter's are): a 7B LLaMA-size adapter (32 layers × q, k, v, o 4096×4096, gate, up 4096→11008, down 11008→4096:
224 modules) at r=16 (160 MB) and r=64 (640 MB), and BERT-base (12 layers × q, k, v 768×768, r=16).

Providers, each timed from the folder on disk (warm page cache) to its result:

- ``lora_fast``: ``lora_fast.energy_rank.analyze(folder)`` (σ and energy ranks of every module);
  ``lora_fast.shrink.shrink(folder, out, threshold=0.95)`` (exact truncation, PEFT folder written).
- ``dense_svd``: what PEFT's ``convert_to_lora``/``save_as_lora`` does per module, on the same file: form
  ΔW = s·B·A densely, full SVD (``torch.linalg.svd``; ``svdvals`` for analyze), keep the energy rank at 0.95,
  ``B' = U_j S_j``, ``A' = V_jᵀ``, save. At 7B size this takes hours on 2 cores, so it times **one module of each of
  the three shapes** and extrapolates to 224 (labelled "extrapolated" in the summary).
- ``peft_convert`` (BERT-base only): PEFT's own ``save_as_lora`` on a PeftModel holding the adapter.

Run: ``pytest benchmarks/bench_adapter_tool.py --benchmark-only`` (a summary table with the ratios is printed at the
end; ~5 min on 2 cores). ``LORA_FAST_BENCH_7B_DENSE_ALL=1`` times the dense route on all 224 modules instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file

from lora_fast.energy_rank import analyze
from lora_fast.energy_rank import energy_rank
from lora_fast.shrink import shrink

THRESHOLD = 0.95
LLAMA_SHAPES = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}
BERT_SHAPES = {f"attention.self.{k}": (768, 768) for k in ("query", "key", "value")}
CASES = {
    "llama7b-r16": ("model.layers", 32, LLAMA_SHAPES, 16),
    "llama7b-r64": ("model.layers", 32, LLAMA_SHAPES, 64),
    "bert-base-r16": ("encoder.layer", 12, BERT_SHAPES, 16),  # BertModel's names, so PEFT can load it
}
_RESULTS: dict[tuple[str, str, str], dict] = {}


def write_adapter(folder: Path, prefix: str, layers: int, shapes: dict, r: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for kind, (m, n) in shapes.items():
            key = f"base_model.model.{prefix}.{layer}.{kind}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, n, generator=g) / math.sqrt(n)
            tensors[f"{key}.lora_B.weight"] = torch.randn(m, r, generator=g) * torch.logspace(0, -2, r)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    targets = sorted({kind.rsplit(".", 1)[-1] for kind in shapes})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets, "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for case, (prefix, layers, shapes, r) in CASES.items():
        write_adapter(root / case, prefix, layers, shapes, r)
        out[case] = root / case
    return out


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """Prints the ratio table once this module's benchmarks ran (the dense 7B rows are extrapolated, so conftest's
    table of measured medians cannot show them)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _RESULTS:
        return
    lines = ["", f"adapter tool: lora_fast vs PEFT's route (load average now {os.getloadavg()[0]:.1f})"]
    lines.append(f"  {'case':<15}{'op':<9}{'lora_fast':>11}{'other':>13}  {'ratio':>8}  other is")
    for case in CASES:
        for op in ("analyze", "shrink"):
            ours = _RESULTS.get((case, op, "lora_fast"))
            accuracy = _RESULTS.get((case, op, "lora_fast (accuracy)"))
            if accuracy is not None:
                lines.append(f"  {case:<15}{op:<9}lora_fast's own {accuracy['note']}")
            for provider, label in (("dense_svd", "PEFT's dense route"), ("peft_convert", "PEFT save_as_lora itself")):
                other = _RESULTS.get((case, op, provider))
                if ours is not None and other is not None:
                    ratio = other["seconds"] / ours["seconds"]
                    lines.append(
                        f"  {case:<15}{op:<9}{ours['seconds']:>9.3f} s{other['seconds']:>11.2f} s  {ratio:>7.0f}x  "
                        f"{label}{'; ' + other['note'] if other['note'] else ''}"
                    )
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def dense_modules(folder: Path, indices: list[int] | None):
    """(ΔW, scaling) of the chosen modules, formed as PEFT's get_delta_weight does (float32)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors")
    names = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
    for i in indices if indices is not None else range(len(names)):
        a, b = state[f"{names[i]}.lora_A.weight"], state[f"{names[i]}.lora_B.weight"]
        yield names[i], (b @ a) * (config["lora_alpha"] / a.shape[0])


def dense_analyze(folder: Path, indices: list[int] | None) -> list[int]:
    return [int(energy_rank(torch.linalg.svdvals(delta), THRESHOLD)) for _, delta in dense_modules(folder, indices)]


def dense_shrink(folder: Path, out: Path, indices: list[int] | None) -> None:
    tensors = {}
    for name, delta in dense_modules(folder, indices):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # PEFT's _convert_module_to_lora
        j = int(energy_rank(s, THRESHOLD))
        tensors[f"{name}.lora_B.weight"] = (u[:, :j] * s[:j]).contiguous()
        tensors[f"{name}.lora_A.weight"] = vh[:j].contiguous()
    out.mkdir(exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")


def one_per_shape(case: str) -> list[tuple[int, int]]:
    """(index of the first module of each shape, in ``write_adapter``'s order; how many modules have that shape)."""
    _, layers, shapes, _ = CASES[case]
    first: dict[tuple[int, int], int] = {}
    for i, shape in enumerate(shapes.values()):
        first.setdefault(shape, i)
    return [(i, layers * list(shapes.values()).count(shape)) for shape, i in first.items()]


@pytest.mark.parametrize("provider", ["lora_fast", "dense_svd", "peft_convert"])
@pytest.mark.parametrize("op", ["analyze", "shrink"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_tool(benchmark, machine, folders, tmp_path, case, op, provider):
    folder = folders[case]
    is_7b = case.startswith("llama")
    if provider == "peft_convert" and is_7b:
        pytest.skip("PEFT's save_as_lora needs the base model in memory: BERT-base only")
    if provider == "peft_convert" and op == "analyze":
        pytest.skip("PEFT has no analyze; its conversion is timed under shrink")
    # the group is read when the timing starts: set after pedantic() it would leave each provider in a group alone
    benchmark.group = f"{case}-{op}"
    out = tmp_path / "out"
    note = ""
    if provider == "lora_fast":

        def run():
            if op == "analyze":
                return analyze(folder, THRESHOLD)
            shutil.rmtree(out, ignore_errors=True)
            return shrink(folder, out, threshold=THRESHOLD)

        result = benchmark.pedantic(run, rounds=5 if not is_7b else 3, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.median
    elif provider == "dense_svd":
        subset = one_per_shape(case) if is_7b and not os.environ.get("LORA_FAST_BENCH_7B_DENSE_ALL") else None
        times: list[float] = []

        def run():
            for index, _ in subset or [(None, 1)]:
                started = time.perf_counter()
                indices = None if index is None else [index]
                dense_analyze(folder, indices) if op == "analyze" else dense_shrink(folder, out, indices)
                times.append(time.perf_counter() - started)

        benchmark.pedantic(run, rounds=1, iterations=1)
        if subset:  # weigh each shape's module by how many modules have that shape
            seconds = sum(t * count for t, (_, count) in zip(times, subset, strict=True))
            counts = "/".join(str(count) for _, count in subset)
            note = f"extrapolated: 1 module of each of the 3 shapes timed, weighted by their counts ({counts})"
        else:
            seconds = benchmark.stats.stats.median
        result = None
    else:
        seconds = peft_convert(folder, out, benchmark)
        result = None
    benchmark.extra_info.update(
        provider=provider,
        baseline="dense_svd",
        ours="lora_fast",
        modules=224 if is_7b else 36,
        rank=CASES[case][3],
        threshold=THRESHOLD,
        dtype="float32",
        device="cpu",
        load_average=os.getloadavg()[0],
        seconds=seconds,
        note=note,
        **machine,
    )
    if op == "shrink" and not is_7b and provider != "peft_convert":
        error = truncation_error(folder, out, scaled=provider == "lora_fast")
        benchmark.extra_info["max_delta_error"] = error
        note = f"{note}; " if note else ""
        note += f"max ‖ΔW' − float64 truncation‖/‖·‖ {error:.1e}"
    _RESULTS[case, op, provider] = {"seconds": seconds, "note": note}
    if provider == "lora_fast" and op == "shrink":
        benchmark.extra_info["relative_error"] = result.relative_error
        if note:
            _RESULTS[case, op, "lora_fast (accuracy)"] = {"seconds": seconds, "note": note}


def truncation_error(source: Path, out: Path, scaled: bool) -> float:
    """Largest relative Frobenius distance of a written ΔW' from the float64 Eckart–Young truncation of the source."""
    from lora_fast.adapters import read_adapter

    original = {p.name: p for p in read_adapter(source).pairs}
    written = read_adapter(out).pairs if scaled else None
    state = load_file(out / "adapter_model.safetensors")
    worst = 0.0
    for name, pair in original.items():
        if scaled:
            new = next(p for p in written if p.name == name)
            delta = new.scaling * (new.B.double() @ new.A.double())
        else:
            key = f"base_model.model.{name}"
            delta = state[f"{key}.lora_B.weight"].double() @ state[f"{key}.lora_A.weight"].double()
        u, s, vh = torch.linalg.svd(pair.scaling * (pair.B.double() @ pair.A.double()), full_matrices=False)
        j = int(torch.linalg.matrix_rank(delta, rtol=1e-5))
        ref = (u[:, :j] * s[:j]) @ vh[:j]
        worst = max(worst, float((delta - ref).norm() / ref.norm()))
    return worst


def peft_convert(folder: Path, out: Path, benchmark) -> float:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft.tuners.lora.conversion import save_as_lora

    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    model = peft.PeftModel.from_pretrained(transformers.BertModel(config), folder)

    def run():
        shutil.rmtree(out, ignore_errors=True)
        save_as_lora(out, model, rank=THRESHOLD)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converting a LoRA adapter to LoRA": that is the point here
        benchmark.pedantic(run, rounds=1, iterations=1)
    return benchmark.stats.stats.median
