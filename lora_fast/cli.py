"""The ``lora-fast`` command: ``analyze`` and ``shrink`` saved LoRA adapters.

Bad input (missing or damaged files, a folder without LoRA, mismatched shapes, out-of-range options) prints one line
on stderr and exits with status 2, writing nothing; an unexpected failure prints one line and exits with 1
(``LORA_FAST_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

PROG = "lora-fast"

DESCRIPTION = """\
Measure and shrink LoRA adapters exactly, without forming B·A.

  analyze  how much rank each module's update ΔW = s·B·A really uses: per module the energy rank (smallest j whose
           top-j singular values hold the threshold share of ‖ΔW‖²), with summaries per matrix kind and per layer.
  shrink   a smaller adapter whose every ΔW is the best rank-j approximation of the original's, j chosen per
           module (--threshold, --rank) or for a budget (--params, --size); PEFT loads the result.

ADAPTER is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin), a named adapter in it
(--adapter NAME), a weights file with --config or --alpha, or a kohya-ss file (lora_down/lora_up/alpha).
"""

ANALYZE_HELP = """\
Print a Markdown table on stdout: one row per module (layer, kind, r, scaling, energy rank, share of ‖ΔW‖² kept at
that rank), then summaries per kind and per layer. Singular values come from QR of both factors and an r×r core
(O((m+n)·r²) per module). For DoRA adapters the figures are those of the low-rank part s·B·A (DoRA's magnitude
vector, a per-column rescaling, is not part of ΔW here).
"""

SHRINK_HELP = """\
Write a smaller adapter to --out. Each module's ΔW = s·B·A is replaced by its best rank-j approximation
(Eckart–Young), computed from QR-type factors of A and B and an r×r SVD, never the m×n product. Choose j with
exactly one of:
  --threshold T  per module, the energy rank at share T of its energy (T in (0, 1]);
  --rank N       per module, at most N;
  --params N     at most N LoRA parameters in all (Σ j·(m+n)), spent greedily where σ² per parameter is largest;
  --size MB      a weights file of at most MB megabytes (10^6 bytes), same greedy rule.
Every module keeps its scaling s: the config gets rank_pattern/alpha_pattern (alpha' = s·j, or s·√j with rsLoRA)
keyed by full module names; modules given rank 0 are left out; modules_to_save weights are copied. Kohya files are
written back as kohya files (same name, in --out). DoRA adapters are refused. Prints the energy kept per module and
the relative Frobenius error ‖ΔW − ΔW'‖/‖ΔW‖ of all modules together. --out must not exist unless --force; the
adapter is written to a temporary folder beside it, then renamed into place.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit status 2), pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"threshold must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = float(text)  # accepts 1e6
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return int(value)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number, got {text!r}") from None
    if not math.isfinite(value) or value == 0:
        raise argparse.ArgumentTypeError(f"alpha must be finite and non-zero, got {text}")
    return value


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder, weights file or kohya file")
    parser.add_argument("--adapter", dest="adapter_name", metavar="NAME", help="named adapter inside ADAPTER")
    parser.add_argument("--config", metavar="FILE", help="adapter_config.json to use (for a bare weights file)")
    parser.add_argument("--alpha", type=_alpha, help="lora_alpha of a bare weights file without config (s = alpha/r)")


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-fast`` argument parser."""
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from lora_fast import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    analyze = commands.add_parser(
        "analyze",
        help="energy rank of every module, with summaries per kind and per layer",
        description=ANALYZE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_arguments(analyze)
    analyze.add_argument(
        "--threshold", type=_threshold, default=0.95, help="share of ‖ΔW‖² the energy rank holds (default 0.95)"
    )
    analyze.add_argument("--json", metavar="FILE", help="write every record (σ included) and the summaries as JSON")
    analyze.add_argument("--csv", metavar="FILE", help="write one row per module as CSV")
    analyze.add_argument("--plot", metavar="FILE.png", help="layer × kind heat map of energy rank / r (matplotlib)")

    shrink = commands.add_parser(
        "shrink",
        help="write a smaller adapter: exact truncation per module, ranks by threshold, rank or budget",
        description=SHRINK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_arguments(shrink)
    shrink.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist, unless --force)")
    rule = shrink.add_mutually_exclusive_group(required=True)
    rule.add_argument("--threshold", type=_threshold, help="keep the energy rank at this share, per module")
    rule.add_argument("--rank", type=_positive_int, help="keep at most this rank per module")
    rule.add_argument("--params", type=_positive_int, help="keep at most this many LoRA parameters in all")
    rule.add_argument("--size", type=_positive_float, metavar="MB", help="weights file of at most MB (10^6 bytes)")
    shrink.add_argument("--force", action="store_true", help="replace --out if it exists")
    shrink.add_argument("--json", metavar="FILE", help="write the per-module result as JSON")
    shrink.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# ---- output helpers --------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _write_text(path: str, text: str) -> None:
    """Write a file through a temporary file and a rename, so a failure leaves no half file."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        temp.write_text(text)
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _summaries(rows: list[dict[str, Any]], by: str) -> list[list[Any]]:
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row[by]].append(row)
    out = []
    for key in sorted(groups, key=lambda k: (k is None, k if k is not None else 0)):
        members = groups[key]
        ratios = [m["energy_rank"] / m["r"] for m in members]
        out.append(
            [
                "—" if key is None else key,
                len(members),
                _fmt(sum(m["r"] for m in members) / len(members)),
                _fmt(sum(m["energy_rank"] for m in members) / len(members)),
                _fmt(sum(ratios) / len(ratios)),
                f"{min(ratios):.3f}–{max(ratios):.3f}",
            ]
        )
    return out


def _plot(rows: list[dict[str, Any]], path: str, threshold: float, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    import numpy as np

    layers = sorted({r["layer"] for r in rows}, key=lambda k: (k is None, k if k is not None else 0))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    grid = np.full((len(layers), len(kinds)), np.nan)
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in rows:
        cells[layers.index(r["layer"]), kinds.index(r["kind"])].append(r["energy_rank"] / r["r"])
    for (i, j), values in cells.items():
        grid[i, j] = sum(values) / len(values)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.4 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), ["—" if k is None else str(k) for k in layers])
    ax.set_xlabel("kind")
    ax.set_ylabel("layer")
    ax.set_title(f"energy rank / r at {threshold:g} of ‖ΔW‖²\n{title}", fontsize=9)
    if grid.size <= 400:  # small enough to read the values themselves
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
    fig.colorbar(image, ax=ax, label="energy rank / r")
    fig.tight_layout()
    target = Path(path)
    temp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        fig.savefig(temp, dpi=120)
        temp.replace(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


# ---- commands --------------------------------------------------------------------------------------------------


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from lora_fast.adapters import read_adapter
    from lora_fast.energy_rank import analyze

    adapter = read_adapter(args.adapter, adapter_name=args.adapter_name, config=args.config, alpha=args.alpha)
    rows = []
    for record in analyze(adapter, args.threshold, progress=True):
        energy = record.sigma.to(torch.float64).square()
        total = float(energy.sum())
        rows.append(
            {
                **{k: v for k, v in record.as_dict().items() if k != "sigma"},
                "kept": float(energy[: record.energy_rank].sum()) / total if total > 0 else 1.0,
                "sigma": record.sigma.tolist(),
            }
        )
    settings = adapter.settings
    notes = [f"{len(rows)} LoRA modules, {adapter.format} format, energy threshold {args.threshold:g}"]
    if settings is not None and settings.use_rslora:
        notes.append("rsLoRA scaling (alpha/√r)")
    if settings is None and args.alpha is None and adapter.format == "peft":
        notes.append("no config or --alpha: scaling taken as 1 (energy ranks do not depend on it)")
    if adapter.dora:
        notes.append(
            "DoRA adapter: the figures are those of the low-rank part s·B·A of each update; DoRA's magnitude vector "
            "(a per-column rescaling of W + s·B·A) is not included"
        )
    multi = len({row["adapter"] for row in rows}) > 1
    header = ["module", *(["adapter"] if multi else []), "layer", "kind", "r", "scaling", "energy rank", "kept"]
    table = [
        [
            row["name"],
            *([row["adapter"]] if multi else []),
            "—" if row["layer"] is None else row["layer"],
            row["kind"],
            row["r"],
            _fmt(row["scaling"]),
            row["energy_rank"],
            f"{100 * row['kept']:.1f}%",
        ]
        for row in rows
    ]
    summary_header = ["modules", "mean r", "mean energy rank", "mean energy rank / r", "range of energy rank / r"]
    by_kind, by_layer = _summaries(rows, "kind"), _summaries(rows, "layer")
    params = sum(row["r"] * sum(row["shape"]) for row in rows)
    kept_params = sum(row["energy_rank"] * sum(row["shape"]) for row in rows)
    out = io.StringIO()
    out.write(f"# lora-fast analyze: {adapter.path}\n\n" + "; ".join(notes) + ".\n\n")
    out.write(_table(header, table) + "\n\n## Per kind\n\n" + _table(["kind", *summary_header], by_kind) + "\n\n")
    out.write("## Per layer\n\n" + _table(["layer", *summary_header], by_layer) + "\n\n")
    out.write(
        f"LoRA parameters: {params:,}; at the energy ranks: {kept_params:,} "
        f"({100 * kept_params / params:.1f}%), e.g. `lora-fast shrink ... --threshold {args.threshold:g}`.\n"
    )
    summary = {
        "adapter": str(adapter.path),
        "threshold": args.threshold,
        "format": adapter.format,
        "dora": adapter.dora,
        "params": params,
        "params_at_energy_rank": kept_params,
        "by_kind": [dict(zip(["kind", *summary_header], row, strict=True)) for row in by_kind],
        "by_layer": [dict(zip(["layer", *summary_header], row, strict=True)) for row in by_layer],
    }
    if args.json:
        _write_text(args.json, json.dumps({"summary": summary, "modules": rows}, indent=1) + "\n")
    if args.csv:
        buffer = io.StringIO()
        fields = ["name", "adapter", "layer", "kind", "r", "shape", "scaling", "energy_rank", "kept", "dora"]
        writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, "shape": "x".join(map(str, row["shape"]))} for row in rows)
        _write_text(args.csv, buffer.getvalue())
    if args.plot:
        _plot(rows, args.plot, args.threshold, str(adapter.path))
    sys.stdout.write(out.getvalue())
    return 0


def _shrink(args: argparse.Namespace) -> int:
    from lora_fast.shrink import shrink

    result = shrink(
        args.adapter,
        args.out,
        threshold=args.threshold,
        rank=args.rank,
        params=args.params,
        size_mb=args.size,
        adapter_name=args.adapter_name,
        config=args.config,
        alpha=args.alpha,
        force=args.force,
        progress=not args.no_progress,
    )
    if args.threshold is not None:
        rule = f"energy threshold {args.threshold:g} per module"
    elif args.rank is not None:
        rule = f"rank ≤ {args.rank} per module"
    elif args.params is not None:
        rule = f"budget of {args.params:,} LoRA parameters"
    else:
        rule = f"weights file ≤ {args.size:g} MB"
    rows = [[m.name, m.r, m.rank if m.rank else "0 (dropped)", f"{100 * m.kept:.2f}%"] for m in result.modules]
    before, after = result.params_before, result.params_after
    text = (
        f"# lora-fast shrink: {result.source} -> {result.out}\n\n{rule}; {result.format} format.\n\n"
        + _table(["module", "r", "kept rank", "kept energy"], rows)
        + f"\n\nLoRA parameters: {before:,} -> {after:,} ({100 * after / before:.1f}%); "
        f"weights file {result.file_bytes / 1e6:.3f} MB.\n"
        f"Relative Frobenius error of all ΔW together: {result.relative_error:.4g} "
        f"(kept {100 * (1 - result.relative_error**2):.2f}% of the total energy).\n"
    )
    if args.json:
        _write_text(args.json, json.dumps(result.as_dict(), indent=1) + "\n")
    sys.stdout.write(text)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _check_output_files(args: argparse.Namespace) -> None:
    """Fail before any work when a --json/--csv/--plot file cannot be written (its folder is missing)."""
    for option in ("json", "csv", "plot"):
        path = getattr(args, option, None)
        if path is not None and not Path(path).absolute().parent.is_dir():
            raise FileNotFoundError(2, "No such folder", str(Path(path).absolute().parent))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lora-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed, in one line)
        return exc.code if isinstance(exc.code, int) else 2
    warnings.showwarning = _show_warning
    try:
        _check_output_files(args)
        return _analyze(args) if args.command == "analyze" else _shrink(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # bad input: AdapterError, ConfigError, FileExistsError, PermissionError…
        message = str(exc) if not isinstance(exc, OSError) or not exc.filename else _os_message(exc)
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("LORA_FAST_DEBUG"):
            raise
        print(
            f"{PROG} {args.command}: unexpected {type(exc).__name__}: {exc} (LORA_FAST_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


def _os_message(exc: OSError) -> str:
    return f"{exc.filename}: {exc.strerror or exc}"


if __name__ == "__main__":
    sys.exit(main())
