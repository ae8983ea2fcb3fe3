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
    "prunekit.commands.apply",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins and what each registers")
    p.set_defaults(func=_cmd_plugins)

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
