"""Scoring benchmark: capture overhead and sequential-mode memory.

1. Overhead: on SmolLM2-135M (fp32) with Brown calibration windows, the time of ONE capture
   pass computing every forward-only scorer, divided by the time of a plain
   ``torch.no_grad()`` forward of the same model on the same samples (target <= 1.3).
2. Memory: a ~1.1B-parameter Llama (TinyLlama-1.1B geometry) with random weights is saved to a
   temporary directory as fp32 safetensors; a fresh subprocess scores it in sequential mode
   from disk and reports its peak RSS (``ru_maxrss``, which includes the Python / torch /
   transformers baseline) divided by the fp32 weight size (target <= 0.4).

    .venv/bin/python benchmarks/scoring.py [--samples 16] [--seq-len 256] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORWARD_SCORERS = [
    "block_influence",
    "angular_distance",
    "magnitude",
    "output_norm",
    "activation_frequency",
    "wanda",
    "neuron_magnitude",
]


def overhead(n_samples: int, seq_len: int, batch_size: int, repeats: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    import prunekit
    from prunekit.core.calibration import load_calibration
    from prunekit.core.models import default_model_dir

    path = default_model_dir()
    model, _ = prunekit.load_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    samples = load_calibration(None, tok, n_samples=n_samples, seq_len=seq_len, seed=0)

    def plain():
        with torch.no_grad():
            for s in range(0, n_samples, batch_size):
                model(input_ids=samples[s : s + batch_size], use_cache=False)

    def scored():
        prunekit.score(model, samples, FORWARD_SCORERS, batch_size=batch_size, progress=False)

    plain()  # warm-up
    t_plain, t_score = [], []
    for _ in range(repeats):  # interleaved, so machine-load drift hits both alike
        t0 = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scored()
        t_score.append(time.perf_counter() - t0)
    p, s = statistics.median(t_plain), statistics.median(t_score)
    return {
        "model": "SmolLM2-135M-Instruct fp32",
        "samples": f"{n_samples} x {seq_len} Brown tokens, batch {batch_size}",
        "threads": torch.get_num_threads(),
        "plain_forward_s": round(p, 3),
        "capture_all_forward_scorers_s": round(s, 3),
        "ratio": round(s / p, 3),
    }


BUILD = r"""
import sys, torch, transformers as tf
out = sys.argv[1]
cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=64, tie_word_embeddings=False, max_position_embeddings=2048)
torch.manual_seed(0)
with torch.device("meta"):
    model = tf.LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu")
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    model.model.rotary_emb.__init__(cfg)  # real inv_freq after to_empty
model.save_pretrained(out, max_shard_size="2GB")
print(sum(p.numel() for p in model.parameters()))
"""

MEASURE = r"""
import json, resource, sys, time, torch
import prunekit
path, n, seq_len, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
samples = torch.randint(0, 32000, (n, seq_len), generator=torch.Generator().manual_seed(0))
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
s = prunekit.score(path, samples, ["block_influence", "angular_distance", "output_norm",
                   "activation_frequency", "wanda"], sequential=True, batch_size=bs,
                   progress=False)
dt = time.perf_counter() - t0
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss_bytes": peak_kb * 1024, "rss_after_imports_bytes": base_kb * 1024,
                  "seconds": round(dt, 1), "bi_first": [round(float(v), 4) for v in
                  s["block_influence"][:3]]}))
"""


def memory(n_samples: int, seq_len: int, batch_size: int, keep: str | None) -> dict:
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="prunekit-bench-"))
    model_dir = tmp / "llama-1b-random"
    try:
        if not (model_dir / "config.json").is_file():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", BUILD, str(model_dir)], check=True)
            print(f"built random 1.1B Llama in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                MEASURE,
                str(model_dir),
                str(n_samples),
                str(seq_len),
                str(batch_size),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        m = json.loads(out.stdout.strip().splitlines()[-1])
        return {
            "model": "random Llama, TinyLlama-1.1B geometry (22 layers, 2048 hidden, 32/4 heads)",
            "samples": f"{n_samples} x {seq_len} random tokens, batch {batch_size}",
            "weights_fp32_GB": round(weight_bytes / 1e9, 3),
            "peak_rss_GB": round(m["peak_rss_bytes"] / 1e9, 3),
            "rss_after_imports_GB": round(m["rss_after_imports_bytes"] / 1e9, 3),
            "sequential_seconds": m["seconds"],
            "ratio": round(m["peak_rss_bytes"] / weight_bytes, 3),
        }
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--keep-dir", help="build/keep the 1B model here (reused when present)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.skip_overhead:
        r = overhead(args.samples, args.seq_len, args.batch_size, args.repeats)
        print("overhead:", json.dumps(r))
        print(f"  capture pass / plain forward = {r['ratio']:.2f} (target <= 1.3)")
    if not args.skip_memory:
        r = memory(args.samples, args.seq_len, args.batch_size, args.keep_dir)
        print("memory:", json.dumps(r))
        print(f"  sequential peak RSS / fp32 weights = {r['ratio']:.2f} (target <= 0.4)")


if __name__ == "__main__":
    main()
