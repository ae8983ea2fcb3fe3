"""Which layers to drop? SmolLM2-135M, 20% of layers removed (6 of 30), chosen by ShortGPT
block influence, by Gromov et al.'s angular distance (one contiguous block), by the loss
increase of skipping each layer (``perplexity_drop``, one-shot and SLEB-style iterative with
``layer_steps``), by what linear healing cannot repair (``heal_residual``: the contiguous block
with the smallest relative residual), and at
random (median of ``--seeds`` seeds, first and last layer protected as for the scorers).
Every selection is evaluated as removed (no recovery) and healed: ReplaceMe block
linearization (``prunekit.core.heal``), one least-squares map per removed run folded into the
preceding ``down_proj``, runs fitted sequentially on the already-healed model.

WikiText-2 test perplexity on the first ``--max-chars`` characters, non-overlapping
``--context-len`` windows; calibration on Brown (``--calib-samples`` x ``--seq-len``).

    python benchmarks/layer_selection.py [--max-chars 40000] [--calib-samples 64]
        [--seeds 0] [--heal-ridge 1e-4] [--heal-objective lstsq|cosine] [--skip-iterative]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

from prunekit import PrunePlan, apply_plan, load_model
from prunekit.core.calibration import load_calibration
from prunekit.core.data import wikitext2_test_path
from prunekit.core.evaluate import perplexity
from prunekit.core.heal import heal_and_remove
from prunekit.core.heal_select import select_block_by_heal_residual
from prunekit.core.models import default_model_dir
from prunekit.core.select import Targets, plan_for


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--max-chars", type=int, default=40_000)
    ap.add_argument("--context-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=0, help="random selections (0: none)")
    ap.add_argument("--heal-ridge", type=float, default=1e-4)
    ap.add_argument("--heal-objective", choices=("lstsq", "cosine"), default="lstsq")
    ap.add_argument("--skip-iterative", action="store_true", help="no SLEB-style row")
    return ap.parse_args()


def main() -> None:
    args = _args()
    dense, tok = load_model(default_model_dir())
    n_layers = dense.config.num_hidden_layers
    n_drop = round(args.fraction * n_layers)
    text = wikitext2_test_path()
    calib = load_calibration(None, tok, n_samples=args.calib_samples, seq_len=args.seq_len)

    def ppl(model) -> float:
        r = perplexity(
            model, tok, text, context_len=args.context_len, max_chars=args.max_chars, progress=False
        )
        return r["perplexity"]

    def by_scorer(scorer: str, **targets) -> Callable[[], list[int]]:
        def run() -> list[int]:
            t = Targets(layers=n_drop, layer_scorer=scorer, mode="uniform", **targets)
            return sorted(plan_for(copy.deepcopy(dense), calib, t, progress=False)[0].layers)

        return run

    def heal_block() -> list[int]:
        return select_block_by_heal_residual(dense, calib, n_drop, ridge=args.heal_ridge)[0]

    selectors: list[tuple[str, Callable[[], list[int]]]] = [
        ("angular_distance", by_scorer("angular_distance")),
        ("block_influence", by_scorer("block_influence")),
        ("heal_residual (block)", heal_block),
        ("perplexity_drop (one-shot)", by_scorer("perplexity_drop")),
    ]
    if not args.skip_iterative:
        steps = by_scorer("perplexity_drop", layer_steps=n_drop)
        selectors.append((f"perplexity_drop (SLEB, {n_drop} steps)", steps))
    for seed in range(args.seeds):
        layers = sorted(random.Random(seed).sample(range(1, n_layers - 1), n_drop))
        selectors.append((f"random seed {seed}", lambda layers=layers: layers))

    t0 = time.perf_counter()
    rows = [("dense", "-", "-", ppl(dense), None)]
    print(f"dense {rows[0][3]:.2f}", flush=True)
    for name, select in selectors:
        t = time.perf_counter()
        layers = select()
        seconds = time.perf_counter() - t
        removed = ppl(apply_plan(copy.deepcopy(dense), PrunePlan(layers=layers)))
        healed = heal_and_remove(
            copy.deepcopy(dense),
            calib,
            layers,
            ridge=args.heal_ridge,
            objective=args.heal_objective,
        )
        rows.append((name, str(layers), f"{seconds:.0f}", removed, ppl(healed)))
        print(
            f"{name}: {layers} {seconds:.0f}s removed {removed:.2f} healed {rows[-1][4]:.2f}",
            flush=True,
        )
    random_rows = [r for r in rows if r[0].startswith("random")]
    if random_rows:
        median = [statistics.median(r[i] for r in random_rows) for i in (3, 4)]
        rows.append(("random (median of seeds)", "-", "-", *median))

    print(
        f"\nSmolLM2-135M-Instruct, {n_drop}/{n_layers} layers removed; WikiText-2 test, first "
        f"{args.max_chars} chars, {args.context_len}-token windows; Brown calibration "
        f"{args.calib_samples}x{args.seq_len}; heal: {args.heal_objective}, ridge "
        f"{args.heal_ridge}, sequential\n"
    )
    print("| selection | layers removed | selection s | removed | + linear heal |")
    print("|---|---|---:|---:|---:|")
    for name, layers, seconds, removed, healed in rows:
        healed_s = "-" if healed is None else f"{healed:.2f}"
        print(f"| {name} | {layers} | {seconds} | {removed:.2f} | {healed_s} |")
    print(f"\n({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
