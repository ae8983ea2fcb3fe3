"""Dense vs pruned latency of two real model directories, measured side by side in one run.

    python benchmarks/latency.py PRUNED_DIR [--dense DIR] [--rounds 5] [--prompt-len 128]
                                 [--new-tokens 32] [--repeats 3]

The pipeline's report times each stage once, minutes apart, in a process that has just scored
and trained; on a shared 2-core CPU that can swing a single figure by 30%. This loads both
models into one process and alternates them for ``--rounds`` rounds, each round one
:func:`prunekit.core.evaluate.latency` call per model (prefill of ``--prompt-len`` random
tokens, then ``--new-tokens`` greedy steps with the KV cache; median of ``--repeats`` after a
warm-up), so machine noise hits both alike. It prints every round and the median speedups
dense/pruned, next to the analytic FLOP ratio. ``--dense`` defaults to the embedded
SmolLM2-135M (the model ``make demo`` compresses), so after ``make demo``::

    python benchmarks/latency.py demo-out
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pruned", help="pruned model directory (a prunekit output)")
    parser.add_argument("--dense", default=None, help="dense model (default: embedded SmolLM2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from prunekit import load_model
    from prunekit.core.evaluate import flops_per_token, latency
    from prunekit.core.models import default_model_dir

    dense_dir = args.dense or str(default_model_dir())
    dense, _ = load_model(dense_dir)
    pruned, _ = load_model(args.pruned)
    models = {"dense": dense, "pruned": pruned}
    print(
        f"device cpu, {torch.get_num_threads()} threads, fp32, batch 1, prompt {args.prompt_len},"
        f" {args.new_tokens} new tokens, median of {args.repeats} per call\n"
        f"dense: {dense_dir}\npruned: {args.pruned}\n"
    )
    prefill: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, list[float]] = {k: [] for k in models}
    print("| round | model | prefill tok/s | decode tok/s |\n|---|---|---|---|")
    for r in range(args.rounds):
        for name, model in models.items():
            got = latency(
                model,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                warmup=1,
                memory=False,
            )
            prefill[name].append(got["prefill_tokens_per_s"])
            decode[name].append(got["decode_tokens_per_s"])
            print(
                f"| {r} | {name} | {got['prefill_tokens_per_s']:.0f} |"
                f" {got['decode_tokens_per_s']:.1f} |",
                flush=True,
            )

    def ratio(d: dict[str, list[float]]) -> float:
        return statistics.median(d["pruned"]) / statistics.median(d["dense"])

    flops = flops_per_token(dense, seq_len=args.prompt_len) / flops_per_token(
        pruned, seq_len=args.prompt_len
    )
    print(
        f"\nmedian prefill tok/s: dense {statistics.median(prefill['dense']):.0f}, pruned"
        f" {statistics.median(prefill['pruned']):.0f} -> speedup {ratio(prefill):.2f}x\n"
        f"median decode tok/s: dense {statistics.median(decode['dense']):.1f}, pruned"
        f" {statistics.median(decode['pruned']):.1f} -> speedup {ratio(decode):.2f}x\n"
        f"analytic FLOP ratio dense/pruned at {args.prompt_len} tokens: {flops:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
