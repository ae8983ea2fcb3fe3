"""Does pruning buy what the FLOPs promise? Dense vs pruned prefill latency of random Llama
models of a few sizes, measured side by side in one run, next to the analytic FLOP ratio.

    python benchmarks/speedup.py [--sizes 512,1024,2048] [--tokens 256] [--repeats 7]

For every size (hidden D, MLP width 2.75 D, D/64 query heads of 64, 4 query heads per KV
head, ``--layers`` layers, a 1024-token vocabulary so the LM head stays small) and every plan:

- ``layers``: 25% of the layers removed;
- ``mlp``: 30% of the MLP neurons of every layer removed (uniform; kept width a multiple of 64);
- ``heads``: one query head of every KV group removed in every layer (uniform, 25%);
- ``per-layer mlp``: the same number of MLP neurons removed, unevenly (0%..60% by layer), so
  the result has per-layer shapes (``per_layer_config``);

the dense and the pruned model each run one prefill forward pass (batch 1, ``--tokens``
tokens, logits of the last position only, no KV cache) ``--repeats`` times, alternating
dense/pruned so that machine noise hits both alike; the medians give the measured speedup
``t_dense / t_pruned``. The ideal speedup is ``F_dense / F_pruned`` with ``F`` the analytic
forward FLOPs per token at that length (``prunekit.core.evaluate.flops_per_token``). The last
column is measured / ideal (1.0 = pruning pays off exactly as the FLOPs say).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time


def make_llama(hidden: int, layers: int, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    heads = hidden // 64
    config = tf.LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=64,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(config).eval()


def plans(model):
    from prunekit import PrunePlan
    from prunekit.plugins import get_adapter

    shapes = get_adapter(model).shapes(model)
    n = len(shapes)
    s = shapes[0]
    inter = s.intermediate
    k = (int(inter * 0.3) // 64) * 64
    drop_layers = list(range(n - 1 - max(1, n // 4), n - 1))
    group = s.n_heads // s.n_kv_heads
    heads = [g * group for g in range(s.n_kv_heads)]  # first query head of every group
    fractions = [0.6 * i / (n - 1) for i in range(n)]  # 0% .. 60%, mean 30%
    total = k * n
    uneven = [int(f * inter) for f in fractions]
    uneven[-1] += total - sum(uneven)
    return {
        "layers": PrunePlan(layers=drop_layers),
        "mlp": PrunePlan(neurons={i: list(range(k)) for i in range(n)}),
        "heads": PrunePlan(heads={i: heads for i in range(n)}),
        "per-layer mlp": PrunePlan(
            neurons={i: list(range(m)) for i, m in enumerate(uneven) if m > 0}
        ),
    }


def prefill_time(model, ids) -> float:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="512,1024,2048", help="hidden sizes")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="prefill length")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    import torch

    from prunekit import apply_plan
    from prunekit.core.evaluate import flops_per_token

    print(
        f"prefill of 1 x {args.tokens} tokens, median of {args.repeats} alternating runs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, sdpa attention"
    )
    print("| hidden | plan | dense ms | pruned ms | measured speedup | ideal (FLOPs) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for hidden in (int(h) for h in args.sizes.split(",")):
        dense = make_llama(hidden, args.layers)
        ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(0))
        f_dense = flops_per_token(dense, args.tokens)
        for name, plan in plans(dense).items():
            pruned = apply_plan(copy.deepcopy(dense), plan)
            for m in (dense, pruned):  # warm-up
                prefill_time(m, ids)
            td, tp = [], []
            for _ in range(args.repeats):
                td.append(prefill_time(dense, ids))
                tp.append(prefill_time(pruned, ids))
            d, q = statistics.median(td), statistics.median(tp)
            ideal = f_dense / flops_per_token(pruned, args.tokens)
            print(
                f"| {hidden} | {name} | {d * 1e3:.1f} | {q * 1e3:.1f} | {d / q:.3f} "
                f"| {ideal:.3f} | {d / q / ideal:.3f} |",
                flush=True,
            )
            del pruned
        del dense
    return 0


if __name__ == "__main__":
    sys.exit(main())
