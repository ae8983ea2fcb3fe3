"""Benchmark a Llama-7B-shaped layer, dense against pruned, Triton against torch.

Dense:  hidden 4096, 32 query heads over 8 KV groups, head_dim 128, MLP 11008.
Pruned: 25% of the heads (24 heads over 6 KV groups, whole groups removed) and 30% of the
        MLP neurons (11008 -> 7706), plus the same MLP rounded to the GPU-friendly widths
        7680 (down to a multiple of 128) and 7744 (up to a multiple of 64).

    python benchmarks/kernel_layers.py                      # on a GPU: Triton and torch
    python benchmarks/kernel_layers.py --small              # on a CPU: ~1 minute, torch only

Writes kernels.csv and kernels.png into --out-dir and prints the table.
"""

from __future__ import annotations

import argparse
import sys

import torch

from prunekit.commands.bench_kernels import add_timing_arguments

# (hidden, n_heads, n_kv_heads, head_dim, intermediate, pruned n_heads, pruned n_kv_heads)
LLAMA_7B = (4096, 32, 8, 128, 11008, 24, 6)
# the same proportions at 1/4 of the width, for CPUs
SMALL = (1024, 16, 4, 64, 2752, 12, 3)
MLP_KEEP = 0.7  # prune 30% of the MLP neurons


def layer_shapes(small: bool) -> list[dict]:
    hidden, heads, kv, head_dim, inter, p_heads, p_kv = SMALL if small else LLAMA_7B
    pruned_inter = round(inter * MLP_KEEP)  # 7706 for Llama-7B
    down128 = pruned_inter // 128 * 128  # 7680
    up64 = -(-pruned_inter // 64) * 64  # 7744
    dense = {
        "label": "dense",
        "hidden": hidden,
        "n_heads": heads,
        "n_kv_heads": kv,
        "head_dim": head_dim,
        "intermediate": inter,
        "gated": True,
    }
    pruned = [
        {**dense, "label": "pruned", "n_heads": p_heads, "n_kv_heads": p_kv, "intermediate": i}
        for i in dict.fromkeys((pruned_inter, down128, up64))
    ]
    return [dense, *pruned]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action="store_true",
        help="1/4-width layer and 512 tokens, so a CPU finishes in about a minute",
    )
    parser.add_argument("--out-dir", default="bench-kernels", help="where kernels.csv/png go")
    add_timing_arguments(
        parser,
        seq_len_help="attention sequence length (default 2048, 512 with --small)",
        repeats_default=None,
        repeats_help="timed runs on CPU (default 10, 5 with --small; GPU: do_bench)",
    )
    args = parser.parse_args(argv)

    try:
        from prunekit.kernels.bench import main_bench
    except ImportError as exc:
        print(exc, file=sys.stderr)
        return 1

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not on_gpu and not args.small:
        print(
            "note: full Llama-7B shapes on a CPU take several minutes; try --small", file=sys.stderr
        )
    seq_len = args.seq_len or (512 if args.small else 2048)
    repeats = args.repeats or (5 if args.small else 10)
    main_bench(
        layer_shapes(args.small),
        args.out_dir,
        tokens=args.tokens,
        seq_len=seq_len,
        batch=args.batch,
        device=args.device,
        repeats=repeats,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
