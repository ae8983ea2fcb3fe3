"""Recovery benchmark on SmolLM2-135M-Instruct: remove 20% of the layers (6 of 30) by block
influence, then recover with ``lora`` and with ``distill`` under the same wall-clock budget,
and print WikiText-2 perplexity dense / pruned / recovered and the fraction of the gap closed.

    python benchmarks/recovery.py                  # 10 minutes per method (issue default)
    python benchmarks/recovery.py --minutes 5 --out /tmp/recovery-bench   # + loss-curve PNGs

Block influence (ShortGPT, Men et al. 2024, arXiv 2403.03853) of layer i is
``BI_i = 1 − E_t cos(x_i,t, x_{i+1},t)`` with ``x_i`` the input of layer i, averaged over the
tokens of ``--score-samples`` 256-token Brown windows (streamed through forward hooks; no
hidden state is kept; ``prunekit.score``). The lowest-BI layers are removed.

Training text: Brown (``prunekit.core.calibration.load_calibration``), never WikiText-2.
Evaluation: WikiText-2 test, first ``--eval-chars`` characters (100,000 by default), no BOS,
non-overlapping ``--window``-token windows (512 by default), every token but a window's first
scored: ``PPL = exp(−1/N Σ log p(x_t | x_<t))`` (``prunekit.core.evaluate.perplexity``).
``--save-dir DIR`` keeps each recovered model (``DIR/<method>``) for later steps, e.g.
``benchmarks/quantize.py --recovered DIR/lora``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="time budget per method")
    p.add_argument("--remove", type=int, default=6, help="layers to remove (6 of 30 = 20%%)")
    p.add_argument("--methods", default="lora,distill")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=128, help="training tokens/row")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps")
    p.add_argument("--n-samples", type=int, default=512, help="Brown training windows")
    p.add_argument("--eval-samples", type=int, default=4, help="held-out Brown windows")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--score-samples", type=int, default=8, help="Brown windows for BI")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--eval-chars", type=int, default=100_000, help="WikiText-2 prefix (chars)")
    p.add_argument("--out", type=Path, default=None, help="write loss curves + results.json")
    p.add_argument("--save-dir", type=Path, default=None, help="save recovered models here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from prunekit import PrunePlan, apply_plan, load_pretrained, save_pretrained, score
    from prunekit.core.calibration import load_calibration
    from prunekit.core.data import brown_path, wikitext2_test_path
    from prunekit.core.evaluate import perplexity as ppl_eval
    from prunekit.core.models import default_model_dir
    from prunekit.core.recovery import RecoveryConfig, recover

    t_start = time.perf_counter()
    dense, tokenizer = load_pretrained(default_model_dir())
    dense.eval()
    n_layers = len(dense.model.layers)
    text = wikitext2_test_path().read_text(encoding="utf-8")[: args.eval_chars]
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def perplexity(model) -> float:
        r = ppl_eval(model, tokenizer, text, context_len=args.window, progress=False)
        return r["perplexity"]

    print(
        f"SmolLM2-135M-Instruct fp32, {n_layers} layers; torch threads {torch.get_num_threads()}; "
        f"WikiText-2 test first {args.eval_chars:,} chars = {n_tokens:,} tokens, "
        f"{args.window}-token windows, no BOS",
        flush=True,
    )

    score_ids = load_calibration(
        brown_path(), tokenizer, n_samples=args.score_samples, seq_len=256, seed=1
    )
    bi = score(dense, score_ids, ["block_influence"], progress=False)["block_influence"]
    removed = sorted(torch.argsort(bi)[: args.remove].tolist())
    print("block influence:", " ".join(f"{i}:{v:.3f}" for i, v in enumerate(bi.tolist())))
    print(f"removing layers {removed} (lowest BI)", flush=True)

    ppl_dense = perplexity(dense)
    pruned = apply_plan(copy.deepcopy(dense), PrunePlan(layers=removed))
    ppl_pruned = perplexity(pruned)
    print(f"perplexity dense {ppl_dense:.2f}  pruned {ppl_pruned:.2f}", flush=True)

    train_ids = load_calibration(
        brown_path(),
        tokenizer,
        n_samples=args.n_samples + args.eval_samples,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    rows = []
    for method in args.methods.split(","):
        student = copy.deepcopy(pruned)
        config = RecoveryConfig(
            method=method,
            steps=None,
            minutes=args.minutes,
            lr=args.lr,
            warmup_steps=args.warmup,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            n_samples=args.n_samples,
            eval_every=args.eval_every,
            eval_samples=args.eval_samples,
            patience=None,
            seed=args.seed,
        )
        result = recover(student, train_ids, config, teacher=dense)
        ppl = perplexity(student)
        gap = (ppl_pruned - ppl) / (ppl_pruned - ppl_dense)
        rows.append(
            dict(
                method=method,
                steps=result.steps,
                seconds=round(result.seconds, 1),
                held_out_before=round(result.initial_eval_loss, 4),
                held_out_best=round(result.best_eval_loss, 4),
                best_step=result.best_step,
                ppl=round(ppl, 2),
                gap_closed=round(gap, 3),
            )
        )
        print(
            f"{method}: {result.steps} steps in {result.seconds:.0f} s "
            f"(held-out {result.initial_eval_loss:.3f} -> {result.best_eval_loss:.3f}, kept "
            f"step {result.best_step}); perplexity {ppl:.2f}; gap closed {gap:.1%}",
            flush=True,
        )
        if args.out:
            result.plot(args.out / f"recovery_{method}.png")
        if args.save_dir:
            save_pretrained(student, args.save_dir / method, tokenizer, overwrite=True)
        del student

    print()
    print(f"| model | steps | WikiText-2 ppl ({args.window}-tok windows) | gap closed |")
    print("|---|---|---|---|")
    print(f"| dense (30 layers) | | {ppl_dense:.2f} | |")
    print(f"| pruned ({n_layers - args.remove} layers, BI) | | {ppl_pruned:.2f} | 0% |")
    for r in rows:
        print(
            f"| + {r['method']} ({args.minutes:g} min) | {r['steps']} | {r['ppl']:.2f} "
            f"| {r['gap_closed']:.1%} |"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = dict(
            args={k: str(v) for k, v in vars(args).items()},
            block_influence=bi.tolist(),
            removed=removed,
            ppl_dense=ppl_dense,
            ppl_pruned=ppl_pruned,
            methods=rows,
        )
        (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
