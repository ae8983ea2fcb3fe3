"""``prunekit bench-kernels``: what a pruning plan buys per layer shape on this hardware.

    prunekit bench-kernels DENSE_MODEL --plan plan.json       # shapes the plan would leave
    prunekit bench-kernels DENSE_MODEL PRUNED_DIR             # shapes of a saved pruned model
    prunekit bench-kernels MODEL                              # one model's own shapes

Only configs are read (no weights are loaded). For each distinct layer shape of the dense and
the pruned model it times the MLP and the attention core with the Triton kernels (GPU only)
and with torch (cuBLAS / SDPA on a GPU, torch's CPU kernels otherwise), prints a table and
writes ``kernels.csv`` and ``kernels.png`` (ms, TFLOP/s, measured speedup vs the ideal FLOP
ratio, and a note where a pruned width is off the 64/128 grid).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: Default token counts: a prefill of 2048 tokens on a GPU; 512 keeps a CPU run short.
GPU_SEQ_LEN = 2048
CPU_SEQ_LEN = 512


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench-kernels",
        help="time dense vs pruned layer shapes (Triton on a GPU, torch everywhere)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help="dense model directory, hub id or .gguf")
    p.add_argument(
        "pruned",
        nargs="?",
        metavar="PRUNED_DIR",
        help="a pruned model directory (prunekit output) to compare with MODEL_OR_DIR",
    )
    p.add_argument("--plan", help="plan JSON: compare MODEL_OR_DIR with the shapes it leaves")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL_OR_DIR")
    p.add_argument(
        "-o",
        "--output",
        default="bench-kernels",
        help="directory for kernels.csv and kernels.png (files of those names are replaced)",
    )
    add_timing_arguments(
        p,
        seq_len_help=f"attention tokens per sequence (default {GPU_SEQ_LEN} on a GPU, "
        f"{CPU_SEQ_LEN} on a CPU)",
        repeats_default=10,
        repeats_help="timed runs per case on a CPU (median reported); a GPU uses do_bench",
    )
    p.set_defaults(func=run)


def add_timing_arguments(
    p: argparse.ArgumentParser, *, seq_len_help: str, repeats_default: int | None, repeats_help: str
) -> None:
    """--seq-len, --batch, --tokens, --repeats, --dtype, --device: the arguments of
    :func:`prunekit.kernels.bench.bench_layer_shapes`, shared with
    ``benchmarks/kernel_layers.py``."""
    p.add_argument("--seq-len", type=int, default=None, help=seq_len_help)
    p.add_argument("--batch", type=int, default=1, help="attention batch size (default 1)")
    p.add_argument("--tokens", type=int, default=None, help="MLP rows (default batch*seq-len)")
    p.add_argument("--repeats", type=int, default=repeats_default, help=repeats_help)
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="default float16 on a GPU, float32 on a CPU",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if any)")


def _config(model: str, gguf_file: str | None) -> Any:
    """A model's config without its weights: local dir (per-layer overrides kept), GGUF, hub."""
    from prunekit.core.io import read_config
    from prunekit.errors import ModelLoadError

    path = Path(model)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if gguf_file is None and path.is_dir():
        return read_config(path)
    from transformers import AutoConfig

    if gguf_file is not None:
        gguf = Path(gguf_file) if Path(gguf_file).is_absolute() else path / gguf_file
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist")
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if path.is_absolute() or model.startswith(".") or model.count("/") > 1:
        raise ModelLoadError(f"model directory {path} does not exist")
    try:
        return AutoConfig.from_pretrained(model)
    except OSError as e:
        raise ModelLoadError(
            f"{model!r} is neither a local directory nor a reachable hub model ({e}); "
            "pass a local model directory or a .gguf file"
        ) from None


def _labelled_shapes(args: argparse.Namespace, config: Any, adapter: Any) -> list[tuple]:
    """[(label, per-layer core LayerShapes)]: dense and pruned, or one model alone."""
    from prunekit import PrunePlan, get_adapter
    from prunekit.core.io import SIDECAR
    from prunekit.kernels.shapes import planned_shapes

    dense = adapter.config_shapes(config)
    if args.plan:
        plan = PrunePlan.from_json(args.plan)
        return [("dense", dense), ("pruned", planned_shapes(dense, plan))]
    if args.pruned:
        p_config = _config(args.pruned, None)
        p_adapter = get_adapter(p_config)
        if p_adapter.name != adapter.name or p_config.hidden_size != config.hidden_size:
            raise ValueError(
                f"{args.pruned} ({p_adapter.name}, hidden {p_config.hidden_size}) is not a "
                f"pruned version of {args.model} ({adapter.name}, hidden {config.hidden_size})"
            )
        return [("dense", dense), ("pruned", p_adapter.config_shapes(p_config))]
    # a lone prunekit output is labelled "pruned", so its off-grid widths get a note
    is_output = Path(args.model).is_dir() and (Path(args.model) / SIDECAR).is_file()
    return [("pruned" if is_output else "dense", dense)]


def _print_stack(totals: list[tuple[str, str, float, int]]) -> None:
    print("whole stack (MLP + attention core summed over all layers):")
    dense = {p: (ms, fl) for label, p, ms, fl in totals if label == "dense"}
    for label, provider, ms, fl in totals:
        speed = ""
        if label != "dense" and provider in dense:
            d_ms, d_fl = dense[provider]
            speed = f"  speedup {d_ms / ms:.2f}x (ideal {d_fl / fl:.2f}x)"
        print(f"  {label:7s} {provider:7s} {ms:10.3f} ms{speed}")


def run(args: argparse.Namespace) -> int:
    import torch

    from prunekit import get_adapter
    from prunekit.core.shapes import config_global
    from prunekit.kernels.bench import main_bench, stack_times
    from prunekit.kernels.shapes import KernelShape, describe_shapes

    if args.plan and args.pruned:
        raise ValueError("give either --plan or PRUNED_DIR, not both")
    for name in ("batch", "repeats", "seq_len", "tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    config = _config(args.model, args.gguf_file)
    adapter = get_adapter(config)
    labelled = _labelled_shapes(args, config, adapter)
    for label, shapes in labelled:
        print("\n".join(describe_shapes(label, shapes)))
    hidden = config_global(config, "hidden_size")
    kinds = {"hidden": hidden, "gated": adapter.gated, "causal": adapter.causal}
    bench_shapes = [
        KernelShape.from_layer(s, label=label, **kinds)
        for label, shapes in labelled
        for s in dict.fromkeys(shapes)
    ]

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seq_len = args.seq_len or (GPU_SEQ_LEN if device.startswith("cuda") else CPU_SEQ_LEN)
    rows = main_bench(
        bench_shapes,
        args.output,
        tokens=args.tokens,
        seq_len=seq_len,
        batch=args.batch,
        device=device,
        repeats=args.repeats,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
    )
    totals = stack_times(rows, labelled)
    if totals:
        _print_stack(totals)
    return 0
