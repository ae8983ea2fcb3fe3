"""Sub-block pruning vs whole-layer pruning on SmolLM2-135M (issue 16), no recovery.

Rows: dense; (a) ``--layers`` whole layers removed by block influence; (b) attention removed
from N layers by attention influence (N = (a)'s layer count: the same KV-cache size);
(c) MLP removed from M layers by MLP influence (M chosen so that (c) removes about as many
parameters as (a)); (d) a per-layer result made for serving (``--serve decilm``: per-layer
MLP widths in multiples of 256, ``--neurons``), exported to DeciLM / Nemotron-NAS and checked
with the DeciLM reference of the tests (logits of the export vs the prunekit model).

Columns: WikiText-2 test perplexity (first ``--max-chars`` characters, 2048-token windows),
parameters, KV-cache bytes per token (2 · KV heads · head_dim · bytes per layer that keeps
attention), prefill and decode throughput measured side by side: every round times each model
once (``prunekit.core.speed.latency`` with one repeat), in turn; the medians over the rounds
are reported, after one untimed round, and each model's speed relative to the dense model of
the same round (median of the per-round ratios).

    .venv/bin/python benchmarks/subblock.py [--max-chars 100000] [--calib-samples 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: run
# without this script's folder on the path; the tests' DeciLM reference loader is imported
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "tests"))

import torch  # noqa: E402
from decilm_reference import DeciLMReference  # noqa: E402

from prunekit import apply_plan, load_model, save_pretrained  # noqa: E402
from prunekit.core.calibration import load_calibration  # noqa: E402
from prunekit.core.data import wikitext2_test_path  # noqa: E402
from prunekit.core.evaluate import perplexity  # noqa: E402
from prunekit.core.export import export_decilm  # noqa: E402
from prunekit.core.models import default_model_dir  # noqa: E402
from prunekit.core.select import Targets, plan_for  # noqa: E402
from prunekit.core.serving import loadable_by  # noqa: E402
from prunekit.core.speed import latency  # noqa: E402
from prunekit.plugins import get_adapter  # noqa: E402


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=6, help="whole layers removed in row (a)")
    ap.add_argument("--serve-neurons", type=float, default=0.25, help="row (d): --neurons")
    ap.add_argument("--max-chars", type=int, default=100_000)
    ap.add_argument("--context-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (after one untimed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ppl", action="store_true", help="speed, parameters and KV only")
    return ap.parse_args()


def kv_bytes_per_token(model) -> int:
    shapes = get_adapter(model).shapes(model)
    size = next(model.parameters()).element_size()
    return sum(2 * s.n_kv_heads * s.head_dim * size for s in shapes)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _removed(plan) -> str:
    if plan is None:
        return ""
    parts = []
    for name in ("layers", "attention", "mlp"):
        if getattr(plan, name):
            parts.append(f"{name} {getattr(plan, name)}")
    if plan.neurons:
        widths = sorted({1536 - len(v) for v in plan.neurons.values()})
        parts.append(f"neurons in {len(plan.neurons)} layers (widths {widths})")
    return "; ".join(parts)


def _speeds(models: dict, args) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s of every model, timed in turn, round after round (medians),
    and each model's speed relative to the dense model of the same round (median of the
    per-round ratios: robust to a machine whose load drifts between rounds)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    kw = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, memory=False, warmup=0)
    for r in range(args.rounds + 1):
        for name, model in models.items():
            res = latency(model, repeats=1, **kw)
            if r:  # round 0 warms up
                times[name].append((res["prefill_s"], res["decode_s"]))
    out = {}
    for name, t in times.items():
        pairs = list(zip(t, times["dense"], strict=True))
        out[name] = {
            "prefill tok/s": args.prompt_len / statistics.median(p for p, _ in t),
            "decode tok/s": args.new_tokens / statistics.median(d for _, d in t),
            "prefill x dense": statistics.median(dp / p for (p, _), (dp, _) in pairs),
            "decode x dense": statistics.median(dd / d for (_, d), (_, dd) in pairs),
        }
    return out


def _check_export(model, tok, plan, row: dict) -> None:
    """Save (d), export it to DeciLM and compare the reference loader's logits."""
    with tempfile.TemporaryDirectory() as tmp:
        src = save_pretrained(model, Path(tmp) / "served", tok)
        row["loadable_by"] = ", ".join(loadable_by(src))
        out = export_decilm(src, Path(tmp) / "deci", require_ffn_mult=True)
        ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = model(input_ids=ids).logits
        got = DeciLMReference(out).logits(ids)
        row["export"] = f"decilm, reference max |Δlogit| {float((got - want).abs().max()):.1e}"


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    dense, tok = load_model(default_model_dir())
    calib = load_calibration(None, tok, n_samples=args.calib_samples, seq_len=args.seq_len)
    shape = get_adapter(dense).shapes(dense)[0]
    hidden = dense.config.hidden_size
    per_attention = hidden * shape.head_dim * (2 * shape.n_heads + 2 * shape.n_kv_heads)
    per_mlp = 3 * hidden * shape.intermediate
    per_layer = per_attention + per_mlp + 2 * hidden
    n_mlps = round(args.layers * per_layer / per_mlp)
    runs = [
        (f"(a) {args.layers} layers, block influence", Targets(layers=args.layers)),
        (f"(b) attention of {args.layers} layers (= KV of a)", Targets(attention=args.layers)),
        (f"(c) MLP of {n_mlps} layers (~ params of a)", Targets(mlps=n_mlps)),
        (
            f"(d) per-layer neurons {args.serve_neurons:.0%}, --serve decilm",
            Targets(neurons=args.serve_neurons, mode="per_layer", serve="decilm"),
        ),
    ]
    models, plans = {"dense": dense}, {"dense": None}
    for name, targets in runs:
        model = copy.deepcopy(dense)
        plan, _ = plan_for(model, calib, targets, progress=False)
        models[name], plans[name] = apply_plan(model, plan), plan
        print(f"[{time.time() - t0:.0f}s] {name}: {_removed(plan)}", flush=True)
    rows = []
    for name, model in models.items():
        ppl = "–"
        if not args.skip_ppl:
            ppl = perplexity(
                model,
                tok,
                wikitext2_test_path(),
                context_len=args.context_len,
                max_chars=args.max_chars,
                progress=False,
            )["perplexity"]
        row = {
            "row": name,
            "perplexity": ppl,
            "params (M)": n_params(model) / 1e6,
            "KV bytes/token": kv_bytes_per_token(model),
        }
        if name.startswith("(d)"):
            _check_export(model, tok, plans[name], row)
        rows.append(row)
        print(f"[{time.time() - t0:.0f}s] {row}", flush=True)
    speeds = _speeds(models, args)
    for row in rows:
        row.update(speeds[row["row"]])
        row["removed"] = _removed(plans[row["row"]])
    print(f"[{time.time() - t0:.0f}s] done")
    print(_table(rows))


def _table(rows: list[dict]) -> str:
    keys = ["row", "perplexity", "params (M)", "KV bytes/token", "prefill tok/s", "decode tok/s"]
    keys += ["prefill x dense", "decode x dense"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        extra = [f"{k}: {r[k]}" for k in ("removed", "loadable_by", "export") if r.get(k)]
        if extra:
            lines.append(f"- {r['row']}: " + "; ".join(extra))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
