"""Dense vs pruned latency of two real model directories, measured side by side in one run.

    python -P benchmarks/latency.py PRUNED_DIR [--dense DIR] [--rounds 5] [--prompt-len 128]
                                    [--new-tokens 32] [--best-of 1] [--threads N] [--clock wall]

The same routine as the report's speed rows (:func:`prunekit.core.speed_compare.
compare_latency`, settings defaulting to the recipe's): both models loaded into one process,
the CPU thread count fixed, a warm-up run each, then ``--rounds`` interleaved rounds (dense,
pruned / pruned, dense / ...), each a prefill of ``--prompt-len`` random tokens and
``--new-tokens`` greedy steps with the KV cache. It prints every round, then the report's rows:
median tokens/s with min-max over the rounds, and the speedup (median of per-round ratios, its
min-max; "not significant" unless every round agrees on which model is faster and the median
is 5% or more from 1) beside the analytic FLOP ratio. ``--clock cpu`` times this process's CPU
time, which other work on a shared machine does not inflate. ``--dense`` defaults to the
embedded SmolLM2-135M (the model ``make demo`` compresses), so after ``make demo``::

    python -P benchmarks/latency.py demo-out

(``-P``: without it ``benchmarks/`` comes first on ``sys.path`` and ``benchmarks/kernels.py``
shadows the ``kernels`` package that transformers imports.)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pruned", help="pruned model directory (a prunekit output)")
    parser.add_argument("--dense", default=None, help="dense model (default: embedded SmolLM2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--best-of", type=int, default=1, help="runs per model per round")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's count")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time"
    )
    args = parser.parse_args(argv)

    from prunekit import load_model
    from prunekit.core.models import default_model_dir
    from prunekit.core.report import result_table
    from prunekit.core.speed_compare import LatencySettings, compare_latency
    from prunekit.core.speed_report import speed_notes
    from prunekit.core.speed_stage import flop_ratio_of, record_speed

    settings = LatencySettings(
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        best_of=args.best_of,
        threads=args.threads,
        clock=args.clock,
    )
    dense_dir = args.dense or str(default_model_dir())
    dense, _ = load_model(dense_dir)
    pruned, _ = load_model(args.pruned)
    print(f"dense: {dense_dir}\npruned: {args.pruned}\n")
    print("| round | model | prefill tok/s | decode tok/s |\n|---|---|---|---|")

    def show(r: int, name: str, got: dict) -> None:
        decode = got["decode_tokens_per_s"]
        decode = "–" if decode is None else f"{decode:.1f}"
        print(f"| {r} | {name} | {got['prefill_tokens_per_s']:.0f} | {decode} |", flush=True)

    got = compare_latency({"dense": dense, "pruned": pruned}, settings, on_round=show)
    metrics: dict[str, dict] = {"dense": {}, "pruned": {}}
    record_speed(metrics, got, flop_ratio_of(dense, pruned, args.prompt_len))
    dtype = got["models"]["dense"]["dtype"]
    device = got["models"]["dense"]["device"]
    print(f"\n{device}, {dtype}, FLOP ratio at {args.prompt_len} tokens\n")
    print(result_table(metrics))
    print("\n".join(speed_notes(metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
