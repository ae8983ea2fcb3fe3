"""Pruning x quantization on SmolLM2-135M-Instruct: dense / pruned / pruned+recovered /
pruned+recovered+{awq, gptq, torchao int8}, WikiText-2 perplexity and size on disk.

    python benchmarks/quantize.py                       # recovers itself (5 min of LoRA)
    python benchmarks/quantize.py --recovered DIR       # start from a saved recovered model
    python benchmarks/quantize.py --methods torchao     # only some quantizers

Pruning: 20% of the layers (6 of 30) with the lowest ShortGPT block influence on Brown
(``prunekit.plan_for``). Recovery: ``lora`` on Brown windows for ``--minutes`` (CPU). Each
quantizer then runs on the recovered model (calibration: the same Brown windows as the
pruning, for AWQ/GPTQ), the result is written with ``save_quantized`` and **reloaded with
``AutoModelForCausalLM.from_pretrained``** before it is evaluated, so every figure is that of
the model on disk. Perplexity: WikiText-2 test, first ``--eval-chars`` characters, no BOS,
non-overlapping ``--context-len`` windows (``prunekit.core.evaluate.perplexity``). Size on
disk: the weight files (``*.safetensors``) of the saved directory.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers probes for: run
# without this script's folder on the path (as benchmarks/subblock.py does)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def weights_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="awq,gptq,torchao")
    p.add_argument("--recovered", type=Path, default=None, help="saved recovered model dir")
    p.add_argument("--minutes", type=float, default=5.0, help="LoRA recovery budget")
    p.add_argument("--remove", type=int, default=6, help="layers to remove (6 of 30 = 20%%)")
    p.add_argument("--calib-samples", type=int, default=32, help="Brown windows (prune, quant)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-chars", type=int, default=100_000)
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument(
        "--group-size", type=int, default=None,
        help="awq/gptq group size; default: fitted as compress does (SmolLM2's hidden 576 = "
        "9 x 64 is not a multiple of 128, so 64)",
    )  # fmt: skip
    p.add_argument(
        "--quantized-only", action="store_true",
        help="with --recovered: skip the dense/pruned/recovered rows (already measured)",
    )  # fmt: skip
    p.add_argument(
        "--awq-backend", default="auto", choices=["auto", "autoawq", "gptqmodel"],
        help="auto: AutoAWQ when it imports (about 40 s per layer on a 2-core CPU), else GPTQModel",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = p.parse_args(argv)

    import torch
    import transformers

    from prunekit import PrunePlan, Targets, apply_plan, load_pretrained, plan_for, save_pretrained
    from prunekit.core.calibration import load_calibration
    from prunekit.core.data import wikitext2_test_path
    from prunekit.core.evaluate import evaluate
    from prunekit.core.models import default_model_dir
    from prunekit.core.quantize import QUANTIZATION_INFO_ATTR, group_size_fit
    from prunekit.core.recovery import RecoveryConfig, recover
    from prunekit.quantizers import (
        get_quantizer,
        quantize,
        quantizer_config,
        save_quantized,
    )

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="prunekit-quant-bench-"))
    dense, tok = load_pretrained(default_model_dir())
    calib = load_calibration(None, tok, n_samples=args.calib_samples, seq_len=args.seq_len)

    def metrics(model) -> dict:
        # the evaluation `prunekit compress` runs on each stage (latency left out)
        return evaluate(
            model,
            tok,
            text=wikitext2_test_path(),
            context_len=args.context_len,
            max_chars=args.eval_chars,
            measure_latency=False,
            progress=False,
        )

    rows: list[dict] = []

    def row(name: str, model, directory: Path, seconds: float | None = None) -> None:
        m = metrics(model)
        rows.append(
            {"model": name, "ppl": m["perplexity"]["perplexity"], "params": m["params"],
             "gflops": m["flops_per_token"] / 1e9, "disk_mb": weights_mb(directory),
             "s": seconds}
        )  # fmt: skip
        r = rows[-1]
        print(
            f"{name}: perplexity {r['ppl']:.2f}, {r['params'] / 1e6:.2f} M params, "
            f"{r['gflops']:.3f} GFLOPs/token, weights {r['disk_mb']:.1f} MB",
            flush=True,
        )

    reference = not (args.quantized_only and args.recovered is not None)
    if reference:
        save_pretrained(dense, work / "dense", tok)
        row("dense (30 layers, fp32)", dense, work / "dense")
    if args.recovered is None:
        plan, _ = plan_for(dense, calib, Targets(layers=args.remove), progress=False)
        pruned = copy.deepcopy(dense)
        apply_plan(pruned, plan)
        save_pretrained(pruned, work / "pruned", tok)
        row(f"pruned (layers {plan.layers} removed, BI)", pruned, work / "pruned")
        train = load_calibration(None, tok, n_samples=512, seq_len=128, seed=1)
        config = RecoveryConfig(
            method="lora", steps=None, minutes=args.minutes, lr=1e-3, warmup_steps=2,
            batch_size=2, seq_len=128, n_samples=512, eval_every=5, eval_samples=4,
            patience=None,
        )  # fmt: skip
        recover(pruned, train, config, progress=False)
        recovered_dir = work / "recovered"
        save_pretrained(pruned, recovered_dir, tok)
        recovered = pruned
        label = f"+ lora ({args.minutes:g} min)"
    elif not reference:
        recovered_dir = args.recovered
        recovered, _ = load_pretrained(recovered_dir)
    else:
        recovered_dir = args.recovered
        recovered, _ = load_pretrained(recovered_dir)
        # The plans travel in the sidecar: re-apply them to the dense model for the row
        # "pruned, not recovered".
        sidecar = json.loads((recovered_dir / "prunekit.json").read_text(encoding="utf-8"))
        pruned = copy.deepcopy(dense)
        for plan in sidecar.get("plans", []):
            apply_plan(pruned, PrunePlan.from_dict(plan))
        save_pretrained(pruned, work / "pruned", tok)
        row(f"pruned ({pruned.config.num_hidden_layers} layers, no recovery)", pruned,
            work / "pruned")  # fmt: skip
        del pruned
        label = f"pruned + recovered ({recovered_dir})"
    del dense
    if reference:
        row(label, recovered, recovered_dir)

    for name in filter(None, args.methods.split(",")):
        quantizer = get_quantizer(name)
        ok, reason = quantizer.available()
        if not ok:
            print(f"{name}: skipped ({reason})", flush=True)
            continue
        t = time.perf_counter()
        config = quantizer_config(
            quantizer, group_size=args.group_size if name in ("awq", "gptq") else None
        )
        if name == "awq":
            config = dataclasses.replace(config, backend=args.awq_backend)
        # the engine `compress --quantize` runs: group size fitted (or checked), then quantized
        config, fit = group_size_fit(recovered, quantizer, config)
        if fit is not None:
            print(f"{name}: {fit.note}", flush=True)
        q = quantize(copy.deepcopy(recovered), tok, quantizer, config, calib_ids=calib)
        seconds = time.perf_counter() - t
        info = q.__dict__.get(QUANTIZATION_INFO_ATTR, {})
        save_quantized(q, work / name, tok)
        del q
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(work / name).eval()
        desc = info.get("config", {})
        keys = ("bits", "group_size", "scheme", "backend")
        summary = ", ".join(f"{k}={v}" for k, v in desc.items() if k in keys)
        row(f"+ {name} ({summary})", reloaded, work / name, seconds)
        del reloaded

    print()
    print(
        f"SmolLM2-135M-Instruct; WikiText-2 test first {args.eval_chars:,} chars, "
        f"{args.context_len}-token windows; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| model | WikiText-2 ppl | params (M) | GFLOPs/token | weights on disk (MB) "
        "| quantize time (s) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        s = f"{r['s']:.0f}" if r["s"] is not None else ""
        print(
            f"| {r['model']} | {r['ppl']:.2f} | {r['params'] / 1e6:.2f} | {r['gflops']:.3f} "
            f"| {r['disk_mb']:.1f} | {s} |"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; files in {work}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
