"""Command-line interface: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from prunekit.errors import PrunekitError

#: Modules that add subcommands: each defines ``add_parser(subparsers)``, which calls
#: ``set_defaults(func=...)``. Keep their top-level imports light (no torch, no triton).
COMMAND_MODULES: tuple[str, ...] = (
    "prunekit.commands.compress",
    "prunekit.commands.bench_kernels",
    "prunekit.commands.eval",
    "prunekit.commands.score",
    "prunekit.commands.export",
)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from prunekit.plugins import HOOKS, get_plugins

    plugins = get_plugins()
    for plugin_name, provided in plugins.provided.items():
        parts = []
        for hook in HOOKS:
            names = provided.get(hook)
            if names:
                parts.append(f"{hook.removeprefix('register_')}: {', '.join(names)}")
        print(f"{plugin_name}\n    {'; '.join(parts) or '(registers nothing)'}")
    print(f"\nmodel types: {', '.join(plugins.model_types())}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from prunekit import get_adapter, load_model

    model, _ = load_model(args.model, gguf_file=args.gguf_file, allow_pickle=args.allow_pickle)
    adapter = get_adapter(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{model.config.model_type} (adapter {adapter.name}), {n_params / 1e6:.2f}M parameters")
    print("layer  heads  kv_heads  head_dim  intermediate")
    for i, s in enumerate(adapter.shapes(model)):
        print(f"{i:5d}  {s.n_heads:5d}  {s.n_kv_heads:8d}  {s.head_dim:8d}  {s.intermediate:12d}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from prunekit import PrunePlan, apply_plan, load_model, save_pretrained
    from prunekit.core.io import check_output_dir

    check_output_dir(args.output, args.overwrite)  # before the (slow) load
    plan = PrunePlan.from_json(args.plan)
    _validate_plan_early(args, plan)
    model, tokenizer = load_model(
        args.model, gguf_file=args.gguf_file, allow_pickle=args.allow_pickle
    )
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan)
    after = sum(p.numel() for p in model.parameters())
    out = save_pretrained(model, args.output, tokenizer, overwrite=args.overwrite)
    layout = "per-layer" if model.config.is_heterogeneous else "uniform (stock transformers)"
    print(f"removed {plan.summary()}")
    print(f"parameters {before / 1e6:.2f}M -> {after / 1e6:.2f}M ({after / before:.1%})")
    print(f"saved {layout} model to {out}")
    return 0


def _validate_plan_early(args: argparse.Namespace, plan) -> None:
    """Check the plan against the model's config before its weights are loaded."""
    from pathlib import Path

    from prunekit.core.io import read_config

    if args.gguf_file or not Path(args.model).is_dir():
        return  # GGUF and hub models: validated by apply_plan after loading
    from prunekit import get_adapter

    config = read_config(args.model)
    plan.validate(get_adapter(config).config_shapes(config))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL")
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pickled .bin weights (trusted only)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins and what each registers")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("info", help="show a model's per-layer shapes")
    _add_model_args(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("apply", help="apply a plan.json to a model and save the result")
    _add_model_args(p)
    p.add_argument("--plan", required=True, help="plan JSON file")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.set_defaults(func=_cmd_apply)

    for modname in COMMAND_MODULES:
        importlib.import_module(modname).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PrunekitError, FileNotFoundError, ValueError) as e:
        print(f"prunekit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
