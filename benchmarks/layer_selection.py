"""Which layers to drop? SmolLM2-135M, 20% of layers removed (6 of 30), chosen by ShortGPT
block influence, by Gromov et al.'s angular distance (one contiguous block), and at random
(median of 5 seeds, first and last layer protected as for the scorers). No recovery.
Training-free healing rows (ReplaceMe block linearization, ``prunekit.core.heal``): the
angular block healed by a least-squares map folded into the preceding ``down_proj``, block
influence's (non-contiguous) layers healed run by run, and the block chosen by the
healed residual (``select_block_by_heal_residual``) healed.

WikiText-2 test perplexity on the first ``--max-chars`` characters (default 100,000), with
non-overlapping ``--context-len`` windows; calibration on Brown.

    python benchmarks/layer_selection.py [--max-chars 100000] [--calib-samples 32]
        [--seeds 5] [--heal-ridge 1e-4] [--heal-objective lstsq|cosine]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

from prunekit import PrunePlan, apply_plan, load_model
from prunekit.core.calibration import load_calibration
from prunekit.core.data import wikitext2_test_path
from prunekit.core.evaluate import perplexity
from prunekit.core.heal import heal_and_remove
from prunekit.core.heal_select import select_block_by_heal_residual, select_layers_by_heal_residual
from prunekit.core.models import default_model_dir
from prunekit.core.select import Targets, plan_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--max-chars", type=int, default=100_000)
    ap.add_argument("--context-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5, help="random selections (0: none)")
    ap.add_argument("--heal-ridge", type=float, default=1e-4)
    ap.add_argument("--heal-objective", choices=("lstsq", "cosine"), default="lstsq")
    args = ap.parse_args()

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

    def healed(layers: list[int]):
        return heal_and_remove(
            copy.deepcopy(dense),
            calib,
            layers,
            ridge=args.heal_ridge,
            objective=args.heal_objective,
        )

    rows = []
    t0 = time.perf_counter()
    rows.append(("dense", "-", ppl(dense)))
    for scorer in ("block_influence", "angular_distance"):
        model = copy.deepcopy(dense)
        targets = Targets(layers=n_drop, layer_scorer=scorer, mode="uniform")
        plan, _ = plan_for(model, calib, targets, progress=False)
        apply_plan(model, plan)
        rows.append((scorer, str(sorted(plan.layers)), ppl(model)))
        rows.append((f"{scorer} + linear heal", str(sorted(plan.layers)), ppl(healed(plan.layers))))
    t1 = time.perf_counter()
    layers, _ = select_block_by_heal_residual(dense, calib, n_drop, ridge=args.heal_ridge)
    name = f"heal-residual ({time.perf_counter() - t1:.0f} s) + heal"
    rows.append((name, str(layers), ppl(healed(layers))))
    random_ppl = []
    for seed in range(args.seeds):
        rng = random.Random(seed)
        layers = sorted(rng.sample(range(1, n_layers - 1), n_drop))
        model = apply_plan(copy.deepcopy(dense), PrunePlan(layers=layers))
        random_ppl.append(ppl(model))
        rows.append((f"random seed {seed}", str(layers), random_ppl[-1]))
    if random_ppl:
        rows.append(("random (median of seeds)", "-", statistics.median(random_ppl)))

    print(
        f"SmolLM2-135M-Instruct, {n_drop}/{n_layers} layers removed; WikiText-2 test, first "
        f"{args.max_chars} chars, {args.context_len}-token windows; Brown calibration "
        f"{args.calib_samples}x{args.seq_len}; heal: {args.heal_objective}, ridge {args.heal_ridge}"
    )
    print(f"{'selection':36s} {'layers removed':32s} {'perplexity':>10s}")
    for name, layers, value in rows:
        print(f"{name:36s} {layers:32s} {value:10.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
