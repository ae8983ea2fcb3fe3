"""``prunekit eval``: perplexity (or embedding similarity), latency, memory, size and FLOPs of
one model, printed as a small table and optionally written as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prunekit.commands.apply import add_allow_pickle


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity, latency, memory, parameters and FLOPs of a model",
        description=__doc__,
    )
    p.add_argument("model", help="model directory (uniform or per-layer), hub id, or .gguf file")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL")
    add_allow_pickle(p)
    p.add_argument(
        "--text",
        help="held-out text file (e.g. WikiText-2 test); decoders: perplexity, "
        "encoders: embedding similarity to --dense",
    )
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of --text")
    p.add_argument("--max-chars", type=int, help="read only the first N characters of --text")
    p.add_argument("--context-len", type=int, default=2048, help="perplexity window (tokens)")
    p.add_argument("--dense", help="dense model directory to compare an encoder's embeddings with")
    p.add_argument(
        "--latency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure prefill/decode throughput and peak memory (default: on)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="latency: sequences per batch")
    p.add_argument("--prompt-len", type=int, default=128, help="latency: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="latency: decoded tokens")
    p.add_argument("--repeats", type=int, default=5, help="latency: timed runs (median)")
    p.add_argument("--json", dest="json_out", help="also write the full result to this file")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from prunekit.commands.placement import add_device_args

    add_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("max_tokens", "max_chars", "context_len", "batch_size", "prompt_len", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.text is not None and not Path(args.text).is_file():
        raise FileNotFoundError(f"--text {args.text} is not a file; pass a text file")
    if args.json_out is not None and not Path(args.json_out).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json {args.json_out}: its folder does not exist")

    from prunekit.core.evaluate import evaluate
    from prunekit.core.io import load_model
    from prunekit.core.preflight import check_model_input
    from prunekit.core.report import result_table

    # from the configs alone, before any weight is read
    check_model_input(args.model, gguf_file=args.gguf_file, quantized_ok=True)
    if args.dense is not None:
        check_model_input(args.dense, quantized_ok=True)

    from prunekit.commands.placement import device_kwargs

    placement = device_kwargs(args)  # a bad --device / --dtype fails before any loading
    model, tokenizer = load_model(
        args.model, gguf_file=args.gguf_file, allow_pickle=args.allow_pickle, **placement
    )
    dense = None
    if args.dense is not None:
        dense, _ = load_model(args.dense, allow_pickle=args.allow_pickle, **placement)
    if args.text is not None and tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; save the tokenizer with it")
    result = evaluate(
        model,
        tokenizer,
        text=args.text,
        dense_model=dense,
        context_len=args.context_len,
        max_tokens=args.max_tokens,
        max_chars=args.max_chars,
        latency_kwargs={
            "batch_size": args.batch_size,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
        },
        measure_latency=args.latency,
        progress=not args.no_progress,
    )
    result["model"] = str(args.model)
    print(result_table({str(args.model): result}))
    print(details(result))
    if args.json_out is not None:
        Path(args.json_out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def details(result: dict[str, Any]) -> str:
    """What the numbers of :func:`prunekit.core.report.result_table` were measured on."""
    lines = [
        f"{result['model_type']}, {result['n_layers']} layers; FLOPs at "
        f"{result['flops_seq_len']} tokens"
    ]
    ppl = result.get("perplexity")
    if ppl:
        lines.append(
            f"perplexity: {ppl['tokens']:,} tokens of {ppl['text']}, {ppl['windows']} windows "
            f"of {ppl['context_len']}"
        )
    sim = result.get("embedding_similarity")
    if sim:
        lines.append(f"embedding cosine: {sim['sentences']} sentences vs the dense model")
    lat = result.get("latency")
    if lat:
        new = f" + {lat['new_tokens']} new tokens" if lat.get("decode_tokens_per_s") else ""
        lines.append(
            f"speed: batch {lat['batch_size']} x {lat['prompt_len']}{new} on {lat['device']} "
            f"{lat['dtype']}, {lat['threads']} threads; memory: {lat.get('memory_method', '-')}"
        )
    return "\n".join(lines)
