"""Images for the ViT studies: Debian ``openclipart-png`` clip art, and Fashion-MNIST as a control.

Clip art (public domain): 8,121 PNG paths under ``/usr/share/openclipart/png`` (6,900 files and 1,221 symbolic links
between categories) in a category tree ``top/sub/...``: 22 top folders, 69 sub-folders. A file's class is its
sub-category, its path's first two folders (``animals/mammals`` also holds ``animals/mammals/horses``); files lying
directly in a top folder (``food/x.png``) form the class ``food/`` and are left out by default, since they overlap
that folder's own sub-categories (``food/fruit`` ...).

Cleaning, in this order, each file counted once in ``ClipartImages.report``:

- ``broken``: Pillow cannot read its header or decode it;
- ``huge``: more than ``max_pixels`` pixels (default 4096 x 4096: the few larger ones take seconds each to decode and
  three of them trip Pillow's decompression-bomb guard);
- ``tiny``: shorter side under ``min_side`` pixels (default 32: 16-24 px icons carry little at any input size);
- ``duplicate`` or ``ambiguous``: files with the same rendered pixels form a group; copies lying loose in a top
  folder give way to copies filed in a sub-category (an icon in ``computer/`` and ``computer/icons`` belongs to the
  latter). If the remaining copies share one class, the first is kept and the others are ``duplicate``; if they
  span several classes (121 ``transportation/aiga-symbols`` are also ``signs_and_symbols/map_symbols``), the label
  is not defined and every copy is dropped as ``ambiguous``.

Rendering: composited on white through the alpha channel (palette and grey images included), resized so the longer
side is ``size`` (Lanczos), centred on a white square. The decoded images are cached per size as uint8 under
``cache_dir()`` (atomic write), keyed by the folder's listing and the cleaning parameters, so a study decodes the
~6,900 files once per machine rather than once per run; ``load_clipart`` normalises with ImageNet's mean and std.

Fashion-MNIST (``load_fashion_mnist_rgb``): the grey 28 x 28 images resized to ``size``, repeated to 3 channels and
normalised the same way, for the same ViT.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiments.data import MissingDataError
from experiments.models import cache_dir
from experiments.models.dinov2 import IMAGENET_MEAN
from experiments.models.dinov2 import IMAGENET_STD
from lora_fast.data import ClassificationData

__all__ = [
    "DEFAULT_ROOT",
    "ClipartImages",
    "category_of",
    "clipart_class_counts",
    "decode_clipart",
    "load_clipart",
    "load_fashion_mnist_rgb",
    "normalize",
    "render",
]

DEFAULT_ROOT = Path("/usr/share/openclipart/png")
# bump when rendering or cleaning changes, so stale caches are not reused
_FORMAT = 1
_DROPPED = ("broken", "huge", "tiny", "duplicate", "ambiguous")


@dataclass(frozen=True)
class ClipartImages:
    """The cleaned clip art rendered at one size (what the cache holds).

    Args:
        images: uint8 (N, 3, size, size), RGB on white.
        paths: N paths relative to the root, sorted.
        categories: N class names (``top/sub``, or ``top/`` for files directly in a top folder).
        report: number of PNG paths ``found``, ``kept`` and dropped per reason (see the module docstring).
    """

    images: torch.Tensor
    paths: tuple[str, ...]
    categories: tuple[str, ...]
    report: dict[str, int]


def category_of(relative_path: str | Path) -> str:
    """The class of a clip-art file: ``top/sub`` from its first two folders, ``top/`` for a file in a top folder.

    Args:
        relative_path: path below the clip-art root, e.g. ``animals/mammals/horses/x.png``.
    """
    parts = Path(relative_path).parts
    if len(parts) < 2:
        raise ValueError(f"{relative_path}: clip art lies in category folders; a file at the root has no class")
    return f"{parts[0]}/{parts[1]}" if len(parts) > 2 else f"{parts[0]}/"


def render(image: object, size: int) -> torch.Tensor:
    """A PIL image composited on white, resized to fit ``size`` x ``size`` (aspect kept) and centred: uint8 (3, S, S).

    Args:
        image: a ``PIL.Image.Image`` in any mode.
        size: side of the square output in pixels.
    """
    return _fit(_on_white(image), size)


def _fit(rgb: object, size: int) -> torch.Tensor:
    from PIL import Image

    scale = size / max(rgb.size)
    new = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(rgb.resize(new, Image.Resampling.LANCZOS), ((size - new[0]) // 2, (size - new[1]) // 2))
    return torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def _on_white(image: object) -> object:
    from PIL import Image

    with warnings.catch_warnings():
        # palette images with a transparency chunk warn on conversion; RGBA is exactly the conversion they ask for
        warnings.simplefilter("ignore", UserWarning)
        rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float RGB images (N, 3, H, W) -> float32 normalised with ImageNet's mean and std."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * scale
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * scale
    # in place on one float copy: 4,863 images at 112 px are 730 MB, and every temporary costs as much again
    return images.to(torch.float32, copy=True).sub_(mean).div_(std)


def _listing(root: Path) -> list[str]:
    paths = [
        str(Path(folder, name).relative_to(root))
        for folder, _, names in os.walk(root, followlinks=False)
        for name in names
        if name.lower().endswith(".png")
    ]
    return sorted(paths)


def _cache_key(root: Path, paths: list[str], size: int, min_side: int, max_pixels: int) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{_FORMAT}|{size}|{min_side}|{max_pixels}".encode())
    for rel in paths:
        stat = (root / rel).stat()  # follows links: a changed target changes the key
        digest.update(f"|{rel}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def decode_clipart(
    size: int = 56,
    root: str | Path | None = None,
    cache: str | Path | None = None,
    min_side: int = 32,
    max_pixels: int = 4096 * 4096,
    progress: bool = True,
) -> ClipartImages:
    """Clean and render every clip-art PNG at ``size`` px, through the per-size cache (see the module docstring).

    Args:
        size: side of the square images.
        root: the clip-art folder; default ``$OPENCLIPART_DIR`` or ``DEFAULT_ROOT``.
        cache: folder for the cache file; default ``cache_dir()``. The file name carries a key of the folder's listing
            (paths, sizes, modification times) and the parameters.
        min_side: files whose shorter side is below this many pixels are dropped as ``tiny``.
        max_pixels: files with more pixels are dropped as ``huge`` without being decoded.
        progress: show a progress bar while decoding.
    """
    if size < 1 or min_side < 1 or max_pixels < 1:
        raise ValueError(f"size, min_side and max_pixels must be positive, got {size}, {min_side}, {max_pixels}")
    root = Path(root or os.environ.get("OPENCLIPART_DIR") or DEFAULT_ROOT)
    paths = _listing(root) if root.is_dir() else []
    if not paths:
        raise MissingDataError("openclipart", root, "apt-get install openclipart-png")
    key = _cache_key(root, paths, size, min_side, max_pixels)
    cache_file = Path(cache or cache_dir()) / f"openclipart-{size}px-{key}.pt"
    if cache_file.is_file():
        stored = torch.load(cache_file, weights_only=True)
        return ClipartImages(stored["images"], tuple(stored["paths"]), tuple(stored["categories"]), stored["report"])

    result = _decode(root, paths, size, min_side, max_pixels, progress)
    from experiments.runner.store import atomic_write_bytes

    buffer = io.BytesIO()
    stored = {"images": result.images, "paths": list(result.paths), "categories": list(result.categories)}
    torch.save({**stored, "report": result.report}, buffer)
    atomic_write_bytes(cache_file, buffer.getvalue())
    return result


def _decode(root: Path, paths: list[str], size: int, min_side: int, max_pixels: int, progress: bool) -> ClipartImages:
    from PIL import Image

    report = Counter({"found": len(paths), **dict.fromkeys(_DROPPED, 0)})
    rendered: list[tuple[str, str, bytes, torch.Tensor]] = []  # (path, class, pixel hash, image)
    by_target: dict[str, tuple[bytes, torch.Tensor] | str] = {}  # a link's target is decoded once
    for rel in tqdm(paths, desc=f"clip art {size}px", disable=not progress, leave=False, dynamic_ncols=True):
        target = os.path.realpath(root / rel)
        if target not in by_target:
            by_target[target] = _decode_one(Image, target, size, min_side, max_pixels)
        outcome = by_target[target]
        if isinstance(outcome, str):
            report[outcome] += 1
        else:
            rendered.append((rel, category_of(rel), *outcome))

    classes_of: dict[bytes, set[str]] = {}
    for _, category, digest, _ in rendered:
        classes_of.setdefault(digest, set()).add(category)
    # a copy filed in a sub-category outranks one lying loose in a top folder (``food/`` vs ``food/fruit``)
    label_of = {d: {c for c in cats if not c.endswith("/")} or cats for d, cats in classes_of.items()}
    kept: list[tuple[str, str, torch.Tensor]] = []
    seen: set[bytes] = set()
    for rel, category, digest, image in rendered:
        if len(label_of[digest]) > 1:
            report["ambiguous"] += 1
        elif category not in label_of[digest] or digest in seen:
            report["duplicate"] += 1
        else:
            seen.add(digest)
            kept.append((rel, category, image))
    report["kept"] = len(kept)
    images = torch.stack([image for _, _, image in kept]) if kept else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return ClipartImages(images, tuple(r for r, _, _ in kept), tuple(c for _, c, _ in kept), dict(report))


def _decode_one(image_module: object, path: str, size: int, min_side: int, max_pixels: int) -> tuple | str:
    """(pixel hash, rendered image) or the reason the file is dropped."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 M pixels and refuses above 179 M at open(); the size test below decides
            warnings.simplefilter("ignore", image_module.DecompressionBombWarning)
            image = image_module.open(path)
        with image:
            width, height = image.size
            if width * height > max_pixels:
                return "huge"
            if min(width, height) < min_side:
                return "tiny"
            image.load()
            rgb = _on_white(image)
    except image_module.DecompressionBombError:
        return "huge"
    except (OSError, ValueError, SyntaxError):
        return "broken"
    # the hash is taken of the rendered full-size pixels: re-encoded copies of one picture count as duplicates
    digest = hashlib.blake2b(f"{width}x{height}".encode(), digest_size=16)
    digest.update(rgb.tobytes())
    return digest.digest(), _fit(rgb, size)


def clipart_class_counts(size: int = 56, include_loose: bool = False, **decode_kwargs: object) -> dict[str, int]:
    """Images per class after cleaning, largest first (reads the cache of ``size``; decodes if missing).

    Args:
        size: which rendered cache to read (cleaning does not depend on it).
        include_loose: count the ``top/`` classes of files lying directly in a top folder.
        decode_kwargs: passed to ``decode_clipart``.
    """
    clip = decode_clipart(size, **decode_kwargs)
    counts = Counter(c for c in clip.categories if include_loose or not c.endswith("/"))
    return dict(counts.most_common())


def load_clipart(
    size: int = 56,
    min_images: int = 30,
    classes: tuple[str, ...] | list[str] | None = None,
    include_loose: bool = False,
    root: str | Path | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> ClassificationData:
    """Clip-art classification data: normalised float32 images (N, 3, size, size), one class per sub-category.

    Args:
        size: side of the square images in pixels (a multiple of 14 suits ViT-S/14: 56 -> 4 x 4 patches).
        min_images: keep the classes with at least this many cleaned images (ignored when ``classes`` is given).
        classes: exactly these classes (``top/sub`` names), in this label order.
        include_loose: also consider the ``top/`` classes of files lying directly in a top folder.
        root: the clip-art folder (see ``decode_clipart``).
        cache: the cache folder (see ``decode_clipart``).
        progress: show a progress bar while decoding.
    """
    clip = decode_clipart(size, root=root, cache=cache, progress=progress)
    counts = Counter(clip.categories)
    if classes is None:
        if min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {min_images}")
        names = sorted(c for c, n in counts.items() if n >= min_images and (include_loose or not c.endswith("/")))
        if not names:
            raise ValueError(f"no clip-art class has >= {min_images} images (largest: {max(counts.values())})")
    else:
        names = list(classes)
        unknown = [c for c in names if c not in counts]
        if unknown:
            raise ValueError(f"unknown clip-art classes {unknown}; known: {sorted(counts)}")
        if len(set(names)) != len(names):
            raise ValueError(f"classes repeat a name: {names}")
    label_of = {name: i for i, name in enumerate(names)}
    index = [i for i, c in enumerate(clip.categories) if c in label_of]
    labels = torch.tensor([label_of[clip.categories[i]] for i in index], dtype=torch.long)
    return ClassificationData("clipart", labels, tuple(names), inputs=normalize(clip.images[index]))


def load_fashion_mnist_rgb(
    size: int = 56,
    split: str = "train",
    per_class: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
) -> ClassificationData:
    """Fashion-MNIST for the ViT: grey 28 x 28 images resized to ``size`` (bilinear), 3 channels, ImageNet-normalised.

    Args:
        size: side of the square images in pixels.
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        per_class: keep this many images per class, drawn at random with ``seed`` (60,000 images at 56 px would take
            2.3 GB as float32); None keeps all.
        seed: seed of the per-class draw.
        root: folder of the IDX files (see ``experiments.data.fashion_mnist``).
    """
    from experiments.data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist(split, root=root)
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        gen = torch.Generator().manual_seed(seed)
        picks = []
        for label in range(data.num_classes):
            members = torch.nonzero(data.labels == label).flatten()
            picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
        data = data.select(torch.cat(picks).sort().values)
    images = data.inputs.unsqueeze(1)
    chunks = [
        normalize(
            F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1).expand(-1, 3, -1, -1)
        )
        for chunk in images.split(4096)
    ]
    return ClassificationData("fashion_mnist_rgb", data.labels, data.class_names, inputs=torch.cat(chunks))
