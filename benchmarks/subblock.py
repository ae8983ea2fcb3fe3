"""Sub-block pruning vs whole-layer pruning on SmolLM2-135M (issue 16), no recovery.

Rows: dense; (a) ``--layers`` whole layers removed by block influence; (b) attention removed
from N layers by attention influence (N = (a)'s layer count: the same KV-cache size);
(c) MLP removed from M layers by MLP influence (M chosen so that (c) removes about as many
parameters as (a)). Columns: WikiText-2 test perplexity (first ``--max-chars`` characters),
parameters, KV-cache bytes per token (fp32: 2 · KV heads · head_dim · 4 bytes per layer that
keeps attention), prefill and decode throughput (``prunekit.core.speed.latency``).

    .venv/bin/python benchmarks/subblock.py [--max-chars 100000] [--calib-samples 32]
"""

from __future__ import annotations

import argparse
import copy

import torch

from prunekit import apply_plan, load_model
from prunekit.core.calibration import load_calibration
from prunekit.core.data import wikitext2_test_path
from prunekit.core.evaluate import perplexity
from prunekit.core.models import default_model_dir
from prunekit.core.select import Targets, plan_for
from prunekit.core.speed import latency
from prunekit.plugins import get_adapter


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=6, help="whole layers removed in row (a)")
    ap.add_argument("--max-chars", type=int, default=100_000)
    ap.add_argument("--context-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args()


def kv_bytes_per_token(model) -> int:
    shapes = get_adapter(model).shapes(model)
    size = next(model.parameters()).element_size()
    return sum(2 * s.n_kv_heads * s.head_dim * size for s in shapes)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _row(name: str, model, tok, args, plan=None) -> dict:
    text = wikitext2_test_path()
    ppl = perplexity(
        model, tok, text, context_len=args.context_len, max_chars=args.max_chars, progress=False
    )["perplexity"]
    speed = latency(
        model,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        memory=False,
    )
    removed = ""
    if plan is not None:
        removed = f"layers {plan.layers}" if plan.layers else ""
        removed += f"attention {plan.attention}" if plan.attention else ""
        removed += f"mlp {plan.mlp}" if plan.mlp else ""
    return {
        "row": name,
        "perplexity": ppl,
        "params (M)": n_params(model) / 1e6,
        "KV bytes/token": kv_bytes_per_token(model),
        "prefill tok/s": speed["prefill_tokens_per_s"],
        "decode tok/s": speed["decode_tokens_per_s"],
        "removed": removed,
    }


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    torch.manual_seed(0)
    dense, tok = load_model(default_model_dir())
    calib = load_calibration(None, tok, n_samples=args.calib_samples, seq_len=args.seq_len)
    shape = get_adapter(dense).shapes(dense)[0]
    hidden = dense.config.hidden_size
    per_attention = hidden * shape.head_dim * (2 * shape.n_heads + 2 * shape.n_kv_heads)
    per_mlp = 3 * hidden * shape.intermediate
    per_layer = per_attention + per_mlp + 2 * hidden
    n_mlps = round(args.layers * per_layer / per_mlp)
    rows = [_row("dense", dense, tok, args)]
    runs = [
        (f"(a) {args.layers} layers, block influence", Targets(layers=args.layers)),
        (f"(b) attention of {args.layers} layers (= KV of a)", Targets(attention=args.layers)),
        (f"(c) MLP of {n_mlps} layers (~ params of a)", Targets(mlps=n_mlps)),
    ]
    for name, targets in runs:
        model = copy.deepcopy(dense)
        plan, _ = plan_for(model, calib, targets, progress=False)
        apply_plan(model, plan)
        rows.append(_row(name, model, tok, args, plan))
        print(rows[-1], flush=True)
    print(_table(rows))


if __name__ == "__main__":
    main()
