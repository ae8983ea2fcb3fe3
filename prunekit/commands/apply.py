"""``prunekit info`` (shapes from the config and the safetensors headers, no weight loaded) and
``prunekit apply`` (a plan applied to a model directory by streaming tensors, or in memory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.commands.placement import add_device_args, device_kwargs


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL")
    add_allow_pickle(p)


def add_allow_pickle(p: argparse.ArgumentParser) -> None:
    """``--allow-pickle`` for every command that loads a model."""
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pickled .bin weights (trusted only)"
    )


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show a model's per-layer shapes (no weights loaded)")
    add_model_args(p)
    p.set_defaults(func=run_info)

    p = sub.add_parser(
        "apply",
        help="apply a plan.json to a model and save the result (a model directory is streamed "
        "tensor by tensor, never built in memory)",
    )
    add_model_args(p)
    p.add_argument("--plan", required=True, help="plan JSON file")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole model, apply, save (default for a directory: stream tensors)",
    )
    add_device_args(p, device_map=False)
    p.set_defaults(func=run_apply)


def _streamable(args: argparse.Namespace) -> bool:
    """A local directory of safetensors files (what streaming reads)."""
    path = Path(args.model)
    return args.gguf_file is None and path.is_dir() and any(path.glob("*.safetensors"))


def run_info(args: argparse.Namespace) -> int:
    from prunekit import get_adapter

    if _streamable(args):
        from prunekit.core.checkpoint import checkpoint_tensors, main_dtype
        from prunekit.core.io import read_config

        config = read_config(args.model)
        adapter = get_adapter(config)
        tensors = checkpoint_tensors(args.model)
        n_params = sum(t.nbytes // t.itemsize for t in tensors.values())
        dtype = str(main_dtype(tensors)).removeprefix("torch.")
        shapes = adapter.config_shapes(config)
    else:
        from prunekit import load_model

        model, _ = load_model(args.model, gguf_file=args.gguf_file, allow_pickle=args.allow_pickle)
        config, adapter = model.config, get_adapter(model)
        n_params = sum(p.numel() for p in model.parameters())
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        shapes = adapter.shapes(model)
    print(
        f"{config.model_type} (adapter {adapter.name}), {n_params / 1e6:.2f}M parameters, {dtype}"
    )
    print("layer  heads  kv_heads  head_dim  intermediate")
    for i, s in enumerate(shapes):
        print(f"{i:5d}  {s.n_heads:5d}  {s.n_kv_heads:8d}  {s.head_dim:8d}  {s.intermediate:12d}")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from prunekit import PrunePlan
    from prunekit.core.io import check_output_dir

    check_output_dir(args.output, args.overwrite, inputs=(args.model,))  # before the load
    plan = PrunePlan.from_json(args.plan)
    _validate_plan_early(args, plan)
    placement = device_kwargs(args)
    if _streamable(args) and not args.in_memory:
        return _apply_streaming(args, plan)
    return _apply_in_memory(args, plan, placement)


def _apply_streaming(args: argparse.Namespace, plan) -> int:
    from prunekit.core.checkpoint import checkpoint_tensors
    from prunekit.core.devices import resolve_dtype
    from prunekit.core.streaming import stream_apply

    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype)
    out = stream_apply(args.model, plan, args.output, overwrite=args.overwrite, dtype=dtype)
    before = sum(t.nbytes // t.itemsize for t in checkpoint_tensors(args.model).values())
    after = sum(t.nbytes // t.itemsize for t in checkpoint_tensors(out).values())
    per_layer = "per_layer_config" in (out / "config.json").read_text()
    _print_applied(plan, before, after, per_layer, out, "streamed")
    return 0


def _apply_in_memory(args: argparse.Namespace, plan, placement) -> int:
    from prunekit import apply_plan, load_model, save_pretrained

    model, tokenizer = load_model(
        args.model, gguf_file=args.gguf_file, allow_pickle=args.allow_pickle, **placement
    )
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan)
    after = sum(p.numel() for p in model.parameters())
    out = save_pretrained(model, args.output, tokenizer, overwrite=args.overwrite)
    _print_applied(plan, before, after, model.config.is_heterogeneous, out, "in memory")
    return 0


def _print_applied(plan, before: int, after: int, per_layer: bool, out: Path, how: str) -> None:
    layout = "per-layer" if per_layer else "uniform (stock transformers)"
    print(f"removed {plan.summary()}")
    print(f"parameters {before / 1e6:.2f}M -> {after / 1e6:.2f}M ({after / before:.1%})")
    print(f"saved {layout} model to {out} ({how})")


def _validate_plan_early(args: argparse.Namespace, plan) -> None:
    """Check the plan against the model's config before its weights are loaded."""
    if args.gguf_file or not Path(args.model).is_dir():
        return  # GGUF and hub models: validated by apply_plan after loading
    from prunekit import get_adapter
    from prunekit.core.io import read_config

    config = read_config(args.model)
    plan.validate(get_adapter(config).config_shapes(config))
