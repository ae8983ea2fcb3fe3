"""Memory benchmark: pruning a model without holding it in memory (issue 14).

A random Llama of ~1.1B parameters (TinyLlama-1.1B geometry: 22 layers, hidden 2048, 32 query /
4 KV heads, MLP 5632) is written in bf16 as sharded safetensors, tensor by tensor from a
meta-device model (the whole model never exists in RAM), with a byte-level BPE tokenizer
trained on the bundled Brown sample. Then, each in a fresh process whose peak RSS is read from
``getrusage(RUSAGE_CHILDREN)`` in a wrapper process:

1. ``prunekit apply`` (streaming) of a uniform plan removing 25% of layers, heads, neurons;
2. ``prunekit compress --sequential --layers 0.25 --heads 0.25 --neurons 0.25 --no-eval``;
3. the same ``compress`` without ``--sequential`` (the model loaded whole, in bf16).

Each peak RSS is divided by the size of the weights on disk (goals: apply <= 0.25, sequential
compress <= 0.5), as is the peak above the baseline of a process that only imports prunekit,
torch and the plugins (``prunekit plugins``), and the peak above the runtime every streaming path
pays before it reads a tensor (those imports, transformers' modeling code, the model built on
the meta device): on a 1.1B model that fixed cost is most of the ratio, on an 8B model a small
part. Usage::

    python benchmarks/memory.py [--keep DIR] [--calib-samples 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD = "500MB"

BUILD = r"""
import json, sys, torch, transformers as tf
from pathlib import Path
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
out, shard = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True)
cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=64, tie_word_embeddings=False, max_position_embeddings=2048)
cfg.architectures = ["LlamaForCausalLM"]
cfg.dtype = "bfloat16"
with torch.device("meta"):
    model = tf.LlamaForCausalLM(cfg)
shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
g = torch.Generator().manual_seed(0)
files, current, size, n_params = [], {}, 0, 0
def flush():
    global current, size
    if current:
        name = f"part-{len(files)}.safetensors"
        save_file(current, out / name, metadata={"format": "pt"})
        files.append((name, list(current)))
    current, size = {}, 0
for key, shape in shapes.items():
    if "norm" in key:
        t = torch.ones(shape, dtype=torch.bfloat16)
    else:
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    if size and size + t.numel() * 2 > shard:
        flush()
    current[key] = t
    size += t.numel() * 2
    n_params += t.numel()
flush()
weight_map, total = {}, 0
for i, (name, keys) in enumerate(files):
    final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    (out / name).rename(out / final)
    weight_map.update({k: final for k in keys})
total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
(out / "model.safetensors.index.json").write_text(json.dumps(
    {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map},
    indent=2))
cfg.save_pretrained(out)
text = Path(sys.argv[3]).read_text()[:300_000]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
    vocab_size=4000, special_tokens=["<pad>", "<unk>", "<s>"], show_progress=False))
PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                        bos_token="<s>", eos_token="<s>").save_pretrained(out)
print(n_params)
"""

# the fixed cost of the streaming paths: torch, transformers' config and modeling code (which
# imports torch._dynamo and triton), the plugins, and the model built on the meta device
SKELETON = r"""
import sys
from prunekit.core.io import meta_skeleton
meta_skeleton(sys.argv[1])
"""

WRAP = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": res.returncode, "peak": peak, "seconds": dt,
                  "tail": (res.stdout + res.stderr)[-1500:]}))
"""


def _brown_sample() -> Path:
    found = sorted((ROOT / "prunekit" / "data").glob("brown*.txt"))
    if not found:
        raise SystemExit("no bundled text under prunekit/data for the tokenizer")
    return max(found, key=lambda p: p.stat().st_size)


def _plan(model_dir: Path, path: Path) -> None:
    """Remove 25% of layers, heads (one KV group of 8 in every kept layer) and neurons."""
    cfg = json.loads((model_dir / "config.json").read_text())
    n, heads, inter = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]
    layers = [i for i in range(1, n - 1)][-round(n * 0.25) :]
    kept = [i for i in range(n) if i not in layers]
    group = heads // cfg["num_key_value_heads"]
    plan = {
        "layers": layers,
        "heads": {str(i): list(range(heads - group, heads)) for i in kept},
        "neurons": {str(i): list(range(0, inter, 4)) for i in kept},
    }
    path.write_text(json.dumps(plan))


def _measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    if m["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{m['tail']}")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="build (or reuse) the model in this directory and keep it")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--skip-in-memory", action="store_true", help="skip the whole-model run")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="prunekit-mem-"))
    model_dir = tmp / "llama-1b-bf16"
    try:
        if not (model_dir / "config.json").is_file():
            t0 = time.perf_counter()
            shard = str(500 * 10**6)
            subprocess.run(
                [sys.executable, "-c", BUILD, str(model_dir), shard, str(_brown_sample())],
                check=True,
            )
            print(f"built the random bf16 model in {time.perf_counter() - t0:.0f} s")
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        prunekit = [sys.executable, "-m", "prunekit.cli"]
        _plan(model_dir, tmp / "plan.json")
        runs = {
            "apply (streaming)": [
                *prunekit,
                "apply",
                str(model_dir),
                "--plan",
                str(tmp / "plan.json"),
                "-o",
                str(tmp / "applied"),
                "--overwrite",
            ],
        }
        compress = [
            *prunekit,
            "compress",
            str(model_dir),
            "--layers",
            "0.25",
            "--heads",
            "0.25",
            "--neurons",
            "0.25",
            "--no-eval",
            "--head-scorer",
            "output_norm",
            "--calib-samples",
            str(args.calib_samples),
            "--seq-len",
            str(args.seq_len),
            "--overwrite",
        ]
        runs["compress --sequential"] = [*compress, "-o", str(tmp / "seq"), "--sequential"]
        if not args.skip_in_memory:
            runs["compress (whole model)"] = [*compress, "-o", str(tmp / "mem")]
        rows = []
        base = _measure([*prunekit, "plugins"])["peak"]  # interpreter + torch + plugins
        print(f"baseline (prunekit plugins): peak RSS {base / 2**30:.2f} GiB", flush=True)
        # what every path that reads the config and builds the model on the meta device pays
        runtime = _measure([sys.executable, "-c", SKELETON, str(model_dir)])["peak"]
        print(f"runtime (imports + meta skeleton): peak RSS {runtime / 2**30:.2f} GiB", flush=True)
        for name, cmd in runs.items():
            m = _measure(cmd)
            rows.append((name, m["peak"], m["seconds"]))
            print(
                f"{name}: peak RSS {m['peak'] / 2**30:.2f} GiB in {m['seconds']:.0f} s", flush=True
            )
        print(
            f"\nweights on disk: {weights / 2**30:.2f} GiB (bf16, "
            f"{len(list(model_dir.glob('*.safetensors')))} shards)"
        )
        print(f"baseline peak RSS of `prunekit plugins`: {base / 2**30:.2f} GiB")
        print(f"runtime peak RSS (imports + meta skeleton): {runtime / 2**30:.2f} GiB")
        head = f"{'run':28s} {'peak RSS GiB':>12s} {'/ weights':>10s} {'(peak-base)/w':>14s}"
        print(f"{head} {'(peak-runtime)/w':>17s} {'seconds':>8s}")
        for name, peak, seconds in rows:
            above, work = (peak - base) / weights, (peak - runtime) / weights
            cols = f"{peak / 2**30:12.2f} {peak / weights:10.2f} {above:14.2f} {work:17.2f}"
            print(f"{name:28s} {cols} {seconds:8.0f}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
