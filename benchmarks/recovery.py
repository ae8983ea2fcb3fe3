"""Recovery per CPU-minute on SmolLM2-135M (issue 17): remove 6 of 30 layers by angular
distance, heal them with block linearization (``prunekit.core.heal``, ReplaceMe-style), then
recover with ``lora`` and with ``distill`` from a teacher cache under several wall-clock
budgets, and print WikiText-2 perplexity, steps/s, tokens/s and the gap closed per minute.

    python benchmarks/recovery.py                          # 2, 5, 10 minutes, lora + distill
    python benchmarks/recovery.py --minutes 2 --methods lora --lora-layers near_removed
    python benchmarks/recovery.py --out /tmp/rec           # + loss/LR curves, results.json
    python benchmarks/recovery.py --methods distill,distill+hidden   # + Minitron hidden loss

Selection: angular distance (Gromov et al. 2024), the contiguous block of 6 layers whose input
and output are closest, on ``--calib-samples`` x ``--calib-len`` Brown windows (the same
windows fit the healing maps). Training text: other Brown windows (``--train-samples`` x
``--seq-len``, packed: documents joined by EOS and cut into windows, no padding), the last
``--eval-samples`` held out for keep-best; never WikiText-2. Distillation trains against the
dense model's top-``--topk`` log-probabilities cached once before pruning
(:class:`prunekit.core.teacher_cache.TeacherCache`, built in ``cache s``); no teacher runs
during training; ``distill+hidden`` adds the intermediate-state loss
(:mod:`prunekit.core.hidden_distill`, ``--alpha-hidden`` x relative error of the
``--hidden-layers`` outputs, stored in the same cache). Evaluation: WikiText-2 test, first
``--max-chars`` characters, ``--context-len``-token windows, as
``benchmarks/layer_selection.py``.

Gap closed per CPU-minute = (ppl_healed − ppl_recovered) / (ppl_healed − ppl_dense) / minutes
of recovery budget (the cache's one-off cost is printed beside it). ``--clock cpu`` (default)
counts the budget in this process's CPU time divided by ``--threads``: the minutes an
unshared machine with that many cores would take, so other processes on a shared machine do
not eat the budget (they still slow each step a little through caches and memory
bandwidth); ``--clock wall`` counts wall-clock time. Steps/s and tokens/s are per minute of
that clock.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: run
# without this script's folder on the path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", default="2,5,10", help="recovery budgets, comma-separated")
    p.add_argument("--methods", default="lora,distill")
    p.add_argument("--remove", type=int, default=6, help="layers to remove (6 of 30 = 20%%)")
    p.add_argument(
        "--layers",
        default=None,
        help="remove these layers (e.g. 13,14,15,16,17,18) instead of "
        "scoring angular distance (the block it picks with 64x256 calibration windows)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-layers", default="all", choices=("all", "near_removed"))
    p.add_argument("--temperature", type=float, default=1.0, help="distillation T")
    p.add_argument("--topk", type=int, default=64, help="teacher log-probs cached per token")
    p.add_argument(
        "--alpha-hidden",
        type=float,
        default=1.0,
        help="weight of the intermediate-state loss of the 'distill+hidden' rows",
    )
    p.add_argument("--hidden-layers", default="all", help="'last', 'all' or original indices")
    p.add_argument("--seq-len", type=int, default=128, help="training tokens per row")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-samples", type=int, default=1024, help="Brown training windows")
    p.add_argument("--eval-samples", type=int, default=8, help="held-out Brown windows")
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--max-chars", type=int, default=40_000, help="WikiText-2 prefix (chars)")
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the budgets count: 'cpu' = this process's CPU time / --threads (the wall "
        "time of an unshared machine with that many cores; fair on a shared machine), 'wall'",
    )
    p.add_argument("--out", type=Path, default=None, help="write curves + results.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    from prunekit.core import recovery_loop

    if args.clock == "cpu":  # budgets in CPU time: other processes on the machine don't count
        recovery_loop.clock = lambda: time.process_time() / args.threads
    from prunekit import load_model
    from prunekit.core.calibration import load_calibration
    from prunekit.core.data import wikitext2_test_path
    from prunekit.core.evaluate import perplexity
    from prunekit.core.heal import heal_and_remove
    from prunekit.core.models import default_model_dir
    from prunekit.core.recovery import RecoveryConfig, recover
    from prunekit.core.select import Targets, plan_for
    from prunekit.core.teacher_cache import TeacherCache

    t_start = time.perf_counter()
    dense, tok = load_model(default_model_dir())
    dense.eval()
    text = wikitext2_test_path()

    def ppl(model) -> float:
        r = perplexity(
            model, tok, text, context_len=args.context_len, max_chars=args.max_chars, progress=False
        )
        return r["perplexity"]

    calib = load_calibration(None, tok, n_samples=args.calib_samples, seq_len=args.calib_len)
    if args.layers:
        layers = sorted(int(i) for i in args.layers.split(","))
    else:
        targets = Targets(layers=args.remove, layer_scorer="angular_distance", mode="uniform")
        layers = sorted(plan_for(copy.deepcopy(dense), calib, targets, progress=False)[0].layers)
    ppl_dense = ppl(dense)
    train_ids = load_calibration(
        None, tok, n_samples=args.train_samples + args.eval_samples, seq_len=args.seq_len, seed=1
    )
    base = dict(
        steps=None,
        lr=args.lr,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_layers=args.lora_layers,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        n_samples=args.train_samples,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        patience=None,
        temperature=args.temperature,
        distill_topk=args.topk,
    )
    t = recovery_loop.clock()
    cache = None
    methods = args.methods.split(",")
    hidden = dict(alpha_hidden=args.alpha_hidden, hidden_layers=args.hidden_layers)
    if any(m.startswith("distill") for m in methods):
        stored = hidden if "distill+hidden" in methods else {}
        cache = TeacherCache.build(
            dense, train_ids, RecoveryConfig(method="distill", minutes=1.0, **base, **stored)
        )
    cache_s = recovery_loop.clock() - t
    healed = heal_and_remove(dense, calib, layers)  # the dense model itself; no copy kept
    ppl_healed = ppl(healed)
    cached = f"; teacher cache {cache_s:.0f} s, {cache.nbytes / 2**20:.1f} MiB" if cache else ""
    print(
        f"SmolLM2-135M fp32, {args.threads} threads; removed {layers} (angular distance) + "
        f"linear heal; WikiText-2 first {args.max_chars:,} chars, {args.context_len}-token "
        f"windows: dense {ppl_dense:.2f}, healed {ppl_healed:.2f}{cached}",
        flush=True,
    )
    rows = []
    for minutes in [float(m) for m in args.minutes.split(",")]:
        for method in methods:
            student = copy.deepcopy(healed)
            extra = hidden if method == "distill+hidden" else {}
            name = method.removesuffix("+hidden")
            config = RecoveryConfig(method=name, minutes=minutes, **base, **extra)
            teacher = cache if name == "distill" else None
            result = recover(student, train_ids, config, teacher=teacher, progress=False)
            after = ppl(student)
            gap = (ppl_healed - after) / (ppl_healed - ppl_dense)
            row = dict(
                method=method,
                minutes=minutes,
                steps=result.steps,
                tokens=result.tokens,
                steps_per_s=round(result.steps_per_s, 3),
                tokens_per_s=round(result.tokens_per_s, 1),
                held_out=[round(result.initial_eval_loss, 4), round(result.best_eval_loss, 4)],
                best_step=result.best_step,
                ppl=round(after, 2),
                gap_closed=round(gap, 4),
                gap_per_minute=round(gap / minutes, 4),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                result.plot(args.out / f"recovery_{method}_{minutes:g}min.png")
            del student

    print()
    print(
        "| recovery | budget | steps | tokens | steps/s | tokens/s | WikiText-2 ppl | "
        "gap closed | per minute |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| dense (30 layers) | | | | | | {ppl_dense:.2f} | | |")
    print(f"| angular 6 removed + linear heal | | | | | | {ppl_healed:.2f} | 0% | |")
    for r in rows:
        print(
            f"| + {r['method']} | {r['minutes']:g} min | {r['steps']} | {r['tokens']:,} | "
            f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['ppl']:.2f} | "
            f"{r['gap_closed']:.1%} | {r['gap_per_minute']:.1%} |"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = dict(
            args={k: str(v) for k, v in vars(args).items()},
            removed=layers,
            ppl_dense=ppl_dense,
            ppl_healed=ppl_healed,
            cache_seconds=cache_s,
            rows=rows,
        )
        (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
