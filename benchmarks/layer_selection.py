"""Which layers to drop, and how to heal them without training? SmolLM2-135M, 20% of layers
removed (6 of 30), chosen by ShortGPT block influence, by Gromov et al.'s angular distance
(one contiguous block), by what linear healing cannot repair (``heal_residual``: the block with
the smallest relative residual), by the healed model's held-out calibration loss
(``heal_loss``: the few blocks with the smallest residual, each fitted on 3/4 of the
calibration samples and measured on the other 1/4), by the loss increase of skipping each
layer (``perplexity_drop``, one-shot and SLEB-style iterative with ``layer_steps``), and at
random (``--seeds``). Each layer selection is evaluated as removed (no recovery) and, for the
selectors meant to be healed, healed two ways: ReplaceMe's map (``fit=map``: one least-squares
``[hidden, hidden]`` map per removed run folded into the preceding ``down_proj``) and
``fit=down_proj`` (that ``down_proj``'s whole weight refitted on its input activations). One
width row removes heads and MLP neurons instead of layers, at about the same parameter count.

WikiText-2 test perplexity on the first ``--max-chars`` characters, non-overlapping
``--context-len`` windows; calibration on Brown (``--calib-samples`` x ``--seq-len``). Rows
are printed as they complete; ``--rows`` picks a subset (e.g. to run the slow perplexity_drop
rows in a second process).

    python benchmarks/layer_selection.py [--max-chars 40000] [--calib-samples 64]
        [--seeds 0] [--heal-ridge 1e-4] [--skip-iterative] [--rows angular,heal_loss,...]
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers probes
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from prunekit import PrunePlan, apply_plan, load_model  # noqa: E402
from prunekit.core.calibration import load_calibration  # noqa: E402
from prunekit.core.data import wikitext2_test_path  # noqa: E402
from prunekit.core.evaluate import perplexity  # noqa: E402
from prunekit.core.heal import heal_and_remove  # noqa: E402
from prunekit.core.heal_select import select_block_by_heal_residual  # noqa: E402
from prunekit.core.models import default_model_dir  # noqa: E402
from prunekit.core.select import Targets, plan_for  # noqa: E402

ROWS = (
    "angular",
    "heal_loss",
    "width",
    "block_influence",
    "heal_residual",
    "perplexity_drop",
    "sleb",
)
HEALED = {  # the healing fits measured after each selection (a shared CPU is slow)
    "angular": ("map", "down_proj"),
    "heal_residual": ("map", "down_proj"),
    "heal_loss": ("map", "down_proj"),
    "block_influence": ("down_proj",),
}


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--max-chars", type=int, default=40_000)
    ap.add_argument("--context-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=0, help="random selections (0: none)")
    ap.add_argument("--heal-ridge", type=float, default=1e-4)
    ap.add_argument("--skip-iterative", action="store_true", help="no SLEB-style row")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row")
    return ap.parse_args()


def _width_targets(dense, n_drop: int) -> Targets:
    """Heads (one query head of each 3-head KV group) and MLP neurons, uniform, removing about
    the parameters of ``n_drop`` whole layers."""
    c = dense.config
    hd = c.head_dim if getattr(c, "head_dim", None) else c.hidden_size // c.num_attention_heads
    per_layer = sum(p.numel() for p in dense.model.layers[0].parameters())
    goal = n_drop * per_layer / c.num_hidden_layers  # parameters to remove per layer
    heads = c.num_attention_heads // 3
    per_neuron = 3 * c.hidden_size
    neurons = max(0.0, goal - heads * 2 * c.hidden_size * hd) / per_neuron
    neurons = round(neurons / 64) * 64  # kept widths round to 64
    return Targets(
        heads=heads / c.num_attention_heads,
        neurons=neurons / c.intermediate_size,
        head_scorer="output_norm",
        neuron_scorer="wanda",
        head_removal="per_group",
        mode="uniform",
    )


def main() -> None:  # noqa: C901 - a benchmark script, read top to bottom
    args = _args()
    wanted = set(args.rows.split(","))
    dense, tok = load_model(default_model_dir())
    n_layers = dense.config.num_hidden_layers
    n_drop = round(args.fraction * n_layers)
    text = wikitext2_test_path()
    calib = load_calibration(None, tok, n_samples=args.calib_samples, seq_len=args.seq_len)
    n_params = sum(p.numel() for p in dense.parameters())
    memo: dict[tuple, float] = {}

    def ppl(model) -> float:
        r = perplexity(
            model, tok, text, context_len=args.context_len, max_chars=args.max_chars, progress=False
        )
        return r["perplexity"]

    def ppl_of(layers: list[int], fit: str | None) -> float:
        key = (tuple(layers), fit)
        if key not in memo:
            if fit is None:
                model = apply_plan(copy.deepcopy(dense), PrunePlan(layers=layers))
            else:
                model = heal_and_remove(
                    copy.deepcopy(dense), calib, layers, ridge=args.heal_ridge, fit=fit
                )
            memo[key] = ppl(model)
        return memo[key]

    def by_scorer(scorer: str, opts: dict | None = None, **targets) -> Callable[[], list[int]]:
        def run() -> list[int]:
            t = Targets(layers=n_drop, layer_scorer=scorer, mode="uniform", **targets)
            configs = {scorer: opts} if opts else None
            plan = plan_for(copy.deepcopy(dense), calib, t, progress=False, configs=configs)[0]
            return sorted(plan.layers)

        return run

    def heal_block() -> list[int]:
        return select_block_by_heal_residual(dense, calib, n_drop, ridge=args.heal_ridge)[0]

    selectors: list[tuple[str, str, Callable[[], list[int]]]] = [
        ("angular", "angular_distance", by_scorer("angular_distance")),
        ("heal_loss", "heal_loss (block)", by_scorer("heal_loss", {"block_size": n_drop})),
        ("block_influence", "block_influence", by_scorer("block_influence")),
        ("heal_residual", "heal_residual (block)", heal_block),
        ("perplexity_drop", "perplexity_drop (one-shot)", by_scorer("perplexity_drop")),
    ]
    if not args.skip_iterative:
        sleb = by_scorer("perplexity_drop", layer_steps=n_drop)
        selectors.append(("sleb", f"perplexity_drop (SLEB, {n_drop} steps)", sleb))
    for seed in range(args.seeds):
        layers = sorted(random.Random(seed).sample(range(1, n_layers - 1), n_drop))
        selectors.append(("random", f"random seed {seed}", lambda layers=layers: layers))
        wanted.add("random")

    header = (
        f"\nSmolLM2-135M-Instruct ({n_params / 1e6:.1f}M parameters), {n_drop}/{n_layers} "
        f"layers removed; WikiText-2 test, first {args.max_chars} chars, {args.context_len}-"
        f"token windows; Brown calibration {args.calib_samples}x{args.seq_len}; heal ridge "
        f"{args.heal_ridge}, runs fitted sequentially\n\n"
        "| selection | layers removed | params | selection s | removed | + ReplaceMe map "
        "| + down_proj refit |\n|---|---|---:|---:|---:|---:|---:|"
    )
    print(header, flush=True)
    t0 = time.perf_counter()
    lines = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    if not args.no_dense:
        emit(f"| dense | – | {n_params / 1e6:.1f}M | – | {ppl(dense):.2f} | – | – |")
    for key, name, select in selectors:
        if key not in wanted:
            continue
        t = time.perf_counter()
        layers = select()
        seconds = time.perf_counter() - t
        kept = apply_plan(copy.deepcopy(dense), PrunePlan(layers=layers))
        params = sum(p.numel() for p in kept.parameters()) / 1e6
        removed = ppl_of(layers, None)
        fits = HEALED.get(key, ())
        healed = [ppl_of(layers, f) if f in fits else None for f in ("map", "down_proj")]
        cells = ["–" if h is None else f"{h:.2f}" for h in healed]
        emit(
            f"| {name} | {', '.join(map(str, layers))} | {params:.1f}M | {seconds:.0f} | "
            f"{removed:.2f} | {cells[0]} | {cells[1]} |"
        )
    if "width" in wanted:
        t = time.perf_counter()
        targets = _width_targets(dense, n_drop)
        plan = plan_for(copy.deepcopy(dense), calib, targets, progress=False)[0]
        seconds = time.perf_counter() - t
        model = apply_plan(copy.deepcopy(dense), plan)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        shape = (
            f"{model.config.num_attention_heads} heads, {model.config.intermediate_size} MLP "
            "every layer"
        )
        emit(
            f"| width: heads (output_norm) + neurons (wanda), uniform | {shape} | "
            f"{params:.1f}M | {seconds:.0f} | {ppl(model):.2f} | – | – |"
        )
    print(f"\n{header}\n" + "\n".join(lines) + f"\n\n({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
