"""Command-line interface: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
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
    from prunekit.plugins import get_plugins

    print("\n".join(get_plugins().describe(options=args.options)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (or set PRUNEKIT_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list plugins and what each registers")
    p.add_argument("--options", action="store_true", help="list each plugin's options too")
    p.set_defaults(func=_cmd_plugins)

    for modname in COMMAND_MODULES:
        importlib.import_module(modname).add_parser(sub)
    return parser


#: input errors (exit 2) among foreign exceptions: the file or name the user gave is wrong
_BAD_INPUT_OS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
_FIXES = {
    "SafetensorError": "the weight file is damaged or not safetensors; re-download or re-save it",
    "OutOfMemoryError": "out of memory; use fewer --calib-samples, a shorter --seq-len, "
    "--device cpu or --device-map auto",
}


def explain(exc: BaseException, args: argparse.Namespace | None = None) -> tuple[int, str]:
    """The exit code (2: bad input, 1: failure while working, 130: interrupted) and the one
    line ``prunekit: error: ...`` the CLI prints for ``exc``."""
    name = type(exc).__name__
    text = " ".join(str(exc).split()) or name
    model = getattr(args, "model", None)
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted; nothing was written (temporary files removed)"
    if isinstance(exc, PrunekitError):
        return getattr(exc, "exit_code", 2), text
    if name in _FIXES or "safetensors" in type(exc).__module__:
        where = f"{model}: " if model and str(model) not in text else ""
        return (1 if name == "OutOfMemoryError" else 2), f"{where}{text} ({_FIXES.get(name, '')})"
    if isinstance(exc, ImportError):  # a missing backend, here or inside transformers
        missing = getattr(exc, "name", None) or text
        return 2, f"{text}; install the missing package ({missing}) or choose another backend"
    if isinstance(exc, json.JSONDecodeError):
        return 2, f"invalid JSON in an input file: {text}"
    if type(exc).__module__.split(".")[0] == "datasets":
        return 2, f"dataset: {text}; check the --calib / --eval-text source"
    if isinstance(exc, (*_BAD_INPUT_OS, PermissionError, ValueError)):
        return 2, text
    if isinstance(exc, OSError):
        return 1, f"{text} (while reading or writing files)"
    return 1, f"unexpected {name}: {text} (rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; every error ends as one line ``prunekit: error: ...`` and exit code 2
    (bad input) or 1 (failure while working); ``--debug`` or ``PRUNEKIT_DEBUG=1`` prints
    the traceback before it."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("PRUNEKIT_DEBUG", "") not in ("", "0")
    from prunekit.core.outdir import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            traceback.print_exc()
        code, message = explain(e, args)
        print(f"prunekit: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
