"""``prunekit export``: write a pruned model in a serving format (``decilm``: DeciLM /
Nemotron-NAS ``block_configs``, which vLLM serves natively)."""

from __future__ import annotations

import argparse

FORMATS = ("decilm",)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a pruned model in a serving format (decilm)", description=__doc__
    )
    p.add_argument("model", help="model directory written by prunekit (uniform or per-layer)")
    p.add_argument("--format", choices=FORMATS, default="decilm", help="serving format")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument(
        "--require-ffn-mult",
        action="store_true",
        help="fail unless every MLP width is expressible as ffn_mult (older DeciLM readers)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prunekit.core.io import check_output_dir

    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"{args.model} is not a model directory (no config.json)")
    check_output_dir(args.output, args.overwrite, inputs=(args.model,))
    write_export(
        args.model,
        args.output,
        args.format,
        overwrite=args.overwrite,
        require_ffn_mult=args.require_ffn_mult,
    )
    return 0


def write_export(
    model_dir, out, fmt: str, *, overwrite: bool = False, require_ffn_mult: bool = False
):
    """Export ``model_dir`` to ``out`` in the serving format ``fmt`` and print where and which
    runtimes load it (``prunekit export`` and ``compress --export``)."""
    from prunekit.core.export import export_decilm
    from prunekit.core.serving import loadable_by

    out = export_decilm(model_dir, out, overwrite=overwrite, require_ffn_mult=require_ffn_mult)
    print(f"wrote {fmt} export to {out}")
    print(f"loadable by: {', '.join(loadable_by(out))}")
    return out
