"""The lora-fast command: output, files, and one line on stderr with exit status 2 for every kind of bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _adapter_cases import peft_adapter
from safetensors.torch import load_file
from safetensors.torch import save_file

from lora_fast.cli import main

W, C = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "adapter"
    peft_adapter(
        folder,
        target_modules=["query", "value"],
        r=8,
        lora_alpha=16,
        rank_pattern={"value": 4},
        use_rslora=True,
        modules_to_save=["classifier"],
    )
    return folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_each_subcommand(capsys) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "analyze" in text and "shrink" in text and "kohya" in text
    assert main(["shrink", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--threshold", "--rank", "--params", "--size", "--force", "--out", "DoRA", "rank_pattern"):
        assert option in text
    assert main(["analyze", "--help"]) == 0
    assert "--plot" in capsys.readouterr().out


def test_analyze_prints_tables_and_writes_files(adapter: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run(
        capsys, "analyze", adapter, "--threshold", "0.9", "--json", tmp_path / "a.json", "--csv", tmp_path / "a.csv"
    )
    assert code == 0, err
    assert "| module | layer | kind | r | scaling | energy rank | kept |" in out
    assert "## Per kind" in out and "## Per layer" in out and "rsLoRA" in out
    assert "| bert.encoder.layer.2.attention.self.value | 2 | value | 4 | 8 |" in out  # 16/√4
    data = json.loads((tmp_path / "a.json").read_text())
    assert len(data["modules"]) == 6 and all(0.9 <= m["kept"] <= 1 for m in data["modules"])
    assert {row["kind"] for row in data["summary"]["by_kind"]} == {"query", "value"}
    rows = list(csv.DictReader((tmp_path / "a.csv").open()))
    assert [r["name"] for r in rows] == [m["name"] for m in data["modules"]]


def test_analyze_plot(adapter: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    code, _, err = run(capsys, "analyze", adapter, "--plot", tmp_path / "heat.png")
    assert code == 0, err
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shrink_writes_a_peft_adapter_and_reports(adapter: Path, tmp_path: Path, capsys) -> None:
    peft = pytest.importorskip("peft")
    code, out, err = run(
        capsys, "shrink", adapter, "--out", tmp_path / "small", "--threshold", "0.8", "--json", tmp_path / "s.json"
    )
    assert code == 0, err
    assert "| module | r | kept rank | kept energy |" in out and "Relative Frobenius error of all ΔW together" in out
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["params_after"] < report["params_before"]
    from _adapter_cases import tiny_bert

    peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "small")
    for rule in (["--rank", "2"], ["--params", "1e3"], ["--size", "0.02"]):
        code, out, err = run(capsys, "shrink", adapter, "--out", tmp_path / "again", "--force", *rule)
        assert code == 0, (rule, err)


def assert_bad_input(capsys, argv, match: str, written: Path | None = None) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    if written is not None:
        assert not written.exists()


def test_bad_input_gives_one_line_and_status_2(adapter: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert_bad_input(capsys, ["analyze", tmp_path / "missing"], "no such file or folder")
    assert_bad_input(capsys, ["shrink", tmp_path / "missing", "--out", out, "--rank", "2"], "no such file", out)
    (tmp_path / "empty").mkdir()
    assert_bad_input(capsys, ["analyze", tmp_path / "empty"], "no adapter weights")
    for threshold in ("0", "1.5", "nan", "-1", "x"):
        assert_bad_input(capsys, ["analyze", adapter, "--threshold", threshold], "threshold")
        assert_bad_input(capsys, ["shrink", adapter, "--out", out, "--threshold", threshold], "threshold", out)
    assert_bad_input(capsys, ["shrink", adapter, "--out", out, "--rank", "0"], "positive integer", out)
    assert_bad_input(capsys, ["shrink", adapter, "--out", out], "one of the arguments", out)
    assert_bad_input(capsys, ["shrink", adapter, "--out", out, "--rank", "2", "--params", "9"], "not allowed", out)
    assert_bad_input(capsys, ["analyze", adapter, "--alpha", "0"], "alpha must be finite and non-zero")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter, corrupt)
    (corrupt / W).write_bytes(b"\0" * 64)
    assert_bad_input(capsys, ["analyze", corrupt], "not a readable safetensors file")
    assert_bad_input(capsys, ["shrink", corrupt, "--out", out, "--rank", "2"], str(corrupt / W), out)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(adapter, mismatched)
    state = load_file(mismatched / W)
    key = next(k for k in state if k.endswith("query.lora_B.weight"))
    state[key] = torch.randn(32, 5)
    save_file(state, mismatched / W)
    assert_bad_input(capsys, ["analyze", mismatched], "inner ranks differ")
    assert_bad_input(capsys, ["shrink", mismatched, "--out", out, "--rank", "2"], "inner ranks differ", out)

    bad_json = tmp_path / "bad_json"
    shutil.copytree(adapter, bad_json)
    (bad_json / C).write_text('{"r": 4,')
    assert_bad_input(capsys, ["analyze", bad_json], f"{bad_json / C}: invalid JSON at line 1")

    (tmp_path / "exists").mkdir()
    assert_bad_input(capsys, ["shrink", adapter, "--out", tmp_path / "exists", "--rank", "2"], "exists")
    assert list((tmp_path / "exists").iterdir()) == []
    assert_bad_input(capsys, ["analyze", adapter, "--json", tmp_path / "no" / "such" / "dir.json"], "No such folder")
    argv = ["shrink", adapter, "--out", out, "--rank", "2", "--json", tmp_path / "no" / "r.json"]
    assert_bad_input(capsys, argv, f"{tmp_path / 'no'}: No such folder", out)  # refused before any work


def test_dora_is_analysed_with_a_note_and_refused_by_shrink(tmp_path: Path, capsys) -> None:
    peft_adapter(tmp_path / "dora", target_modules=["query"], r=4, lora_alpha=8, use_dora=True)
    code, out, _ = run(capsys, "analyze", tmp_path / "dora")
    assert code == 0 and "DoRA adapter: the figures are those of the low-rank part s·B·A" in out
    assert_bad_input(
        capsys, ["shrink", tmp_path / "dora", "--out", tmp_path / "o", "--rank", "2"], "DoRA", tmp_path / "o"
    )


def test_console_script(adapter: Path, tmp_path: Path) -> None:
    script = shutil.which("lora-fast", path=os.path.dirname(sys.executable)) or shutil.which("lora-fast")
    if script is None:
        pytest.skip("the lora-fast console script is not installed in this environment")
    done = subprocess.run([script, "analyze", str(adapter)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "## Per layer" in done.stdout
    done = subprocess.run([script, "analyze", str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
