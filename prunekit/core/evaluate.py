"""Evaluation of dense and pruned models: perplexity, latency, peak memory, parameter count,
analytic FLOPs per token, and (for encoders without an LM head) embedding similarity.

Every function records its settings in the dict it returns, so a figure can be re-created.
Perplexity follows the usual non-overlapping-window protocol (Press et al. 2021 call it
"non-overlapping inference"): the text is tokenised once, cut into consecutive windows of
``context_len`` tokens, and each window is scored independently::

    NLL = - 1/N * sum_w sum_{t=1}^{|w|-1} log p(x_{w,t} | x_{w,<t})      PPL = exp(NLL)

where ``N`` counts the scored tokens (the first token of a window has no context and is not
scored unless a BOS token is prepended with ``add_bos=True``). With SmolLM2-135M-Instruct (fp32),
WikiText-2 test, no BOS and 2048-token windows this gives 21.98 (20.64 on the first 100,000
characters), the figures in ``../shared/data/README.md``.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "embedding_similarity",
    "evaluate",
    "flops_breakdown",
    "flops_per_token",
    "latency",
    "param_count",
    "peak_memory",
    "perplexity",
    "read_text",
    "sentences_from_text",
    "weights_memory_mb",
]

_MB = 1024 * 1024


# ---- text ---------------------------------------------------------------------------------
def read_text(text: str | os.PathLike, max_chars: int | None = None) -> tuple[str, str]:
    """``(content, label)``: the file's content when ``text`` names an existing file, else
    ``text`` itself (raw text); cut to the first ``max_chars`` characters when given. The
    label is the path, or ``"<raw text, N chars>"``."""
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    path = _existing_file(text)
    if path is not None:
        content, label = path.read_text(encoding="utf-8"), str(path)
    elif isinstance(text, os.PathLike):
        raise FileNotFoundError(f"text file {text} does not exist; pass an existing file")
    else:
        content, label = str(text), f"<raw text, {len(text)} chars>"
    if max_chars is not None:
        content = content[:max_chars]
    if not content.strip():
        raise ValueError(f"text {label} is empty; pass a file or a string with some text")
    return content, label


def _existing_file(text: Any) -> Path | None:
    if not isinstance(text, str | os.PathLike):
        raise TypeError(f"text must be a path or a string, got {type(text).__name__}")
    if isinstance(text, str) and ("\n" in text or len(text) > 4096):
        return None  # clearly raw text, not a file name
    try:
        path = Path(text)
        return path if path.is_file() else None
    except (OSError, ValueError):  # name too long, NUL byte, ...
        return None


def sentences_from_text(
    text: str | os.PathLike, n: int = 64, *, min_words: int = 6, max_words: int = 64
) -> list[str]:
    """The first ``n`` sentences of ``text`` (path or raw text) with ``min_words`` to
    ``max_words`` words; headings (WikiText ``= Title =`` lines) are skipped."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    content, label = read_text(text)
    out: list[str] = []
    for line in content.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", line):
            if min_words <= len(sentence.split()) <= max_words:
                out.append(sentence)
                if len(out) == n:
                    return out
    if not out:
        raise ValueError(
            f"no sentence of {min_words}-{max_words} words in {label}; pass a longer text"
        )
    return out


# ---- helpers ------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _is_causal(model: nn.Module) -> bool:
    from prunekit.plugins import get_adapter

    return bool(get_adapter(model).causal) and model.get_output_embeddings() is not None


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


# ---- perplexity ---------------------------------------------------------------------------
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | os.PathLike,
    *,
    context_len: int = 2048,
    max_tokens: int | None = None,
    max_chars: int | None = None,
    batch_size: int = 1,
    add_bos: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a causal LM on ``text`` over non-overlapping windows (formula in the
    module docstring).

    ``text`` is a file path or, when no such file exists, the text itself. ``max_chars`` keeps
    the first characters before tokenising; ``max_tokens`` keeps the first tokens after
    tokenising. The text is tokenised without special tokens; ``add_bos=True`` prepends the
    tokenizer's BOS to every window (each window then holds ``context_len - 1`` text tokens,
    all scored). Full windows are batched ``batch_size`` at a time (no padding: the shorter
    last window runs alone). Returns ``{"perplexity", "nll", "tokens" (scored), "windows",
    "input_tokens", "context_len", "max_tokens", "max_chars", "batch_size", "text", "add_bos"}``.
    """
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2, got {context_len}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 or None, got {max_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not _is_causal(model):
        raise ValueError(
            f"perplexity needs a causal LM with an LM head; {type(model).__name__} has none. "
            "For encoders use embedding_similarity(model, dense_model, tokenizer, sentences)"
        )
    content, label = read_text(text, max_chars)
    ids = tokenizer(content, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos: list[int] = []
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token; use add_bos=False")
        bos = [int(tokenizer.bos_token_id)]
    step = context_len - len(bos)
    windows = [bos + ids[i : i + step] for i in range(0, len(ids), step)]
    windows = [w for w in windows if len(w) >= 2]  # a lone token has nothing to predict
    if not windows:
        raise ValueError(
            f"text {label} gives {len(ids)} token(s): too few to score; pass a longer text"
        )
    # Batch windows of the same length together (all but possibly the last one).
    batches: list[list[list[int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0]) == len(w):
            batches[-1].append(w)
        else:
            batches.append([w])

    device = _device(model)
    nll_sum = 0.0
    scored = 0
    with _eval_mode(model):
        for batch in _progress(batches, total=len(batches), desc="perplexity", enabled=progress):
            x = torch.tensor(batch, dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False).logits
            pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            target = x[:, 1:].reshape(-1)
            nll_sum += float(nn.functional.cross_entropy(pred, target, reduction="sum"))
            scored += target.numel()
    nll = nll_sum / scored
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": scored,
        "windows": len(windows),
        "input_tokens": len(ids),
        "context_len": context_len,
        "max_tokens": max_tokens,
        "max_chars": max_chars,
        "batch_size": batch_size,
        "text": label,
        "add_bos": add_bos,
    }


# ---- memory -------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Hand the memory glibc keeps from freed tensors back to the kernel (``malloc_trim``).

    After a first pass frees its activations, glibc raises its mmap threshold and keeps the
    pages in its heap; a second pass reuses them without the resident set growing, so a peak
    read from the RSS would miss it. A no-op off glibc.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run ``fn()`` and measure the memory it needed above what was in use before.

    On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before (``method:
    "cuda_max_allocated"``). On CPU: the peak resident set size minus the RSS before, read
    from Linux's ``VmHWM`` after handing glibc's free heap back to the kernel and resetting the
    counter through ``/proc/self/clear_refs`` (``method: "rss_hwm"``); elsewhere the
    process-lifetime ``ru_maxrss`` delta, which reads 0 when an earlier peak was higher
    (``method: "ru_maxrss_delta"``). Returns ``{"peak_memory_mb", "method"}``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_memory_mb": (peak - before) / _MB, "method": "cuda_max_allocated"}
    if _reset_peak_rss():
        before = _proc_status_kb("VmRSS")
        fn()
        peak = _proc_status_kb("VmHWM")
        if before is not None and peak is not None:
            return {"peak_memory_mb": max(peak - before, 0) / 1024, "method": "rss_hwm"}
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mb": (peak - before) / 1024, "method": "ru_maxrss_delta"}


def weights_memory_mb(model: nn.Module) -> float:
    """Memory held by the parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total / _MB


# ---- latency ------------------------------------------------------------------------------
def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def latency(
    model: nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    memory: bool = True,
) -> dict[str, Any]:
    """Prefill and decode throughput on random token ids (median of ``repeats`` runs after
    ``warmup`` untimed ones).

    Prefill: one forward pass over ``batch_size x prompt_len`` tokens that fills the KV cache
    and computes the logits of the last position only (what ``generate`` does);
    ``prefill_tokens_per_s = batch_size * prompt_len / median time``. Decode: ``new_tokens``
    greedy steps of one token per sequence with the KV cache;
    ``decode_tokens_per_s = batch_size * new_tokens / median time``. Encoders (no KV cache,
    no generation) get prefill only: a full forward pass. ``memory=True`` adds the peak memory
    of one prefill + decode run (:func:`peak_memory`) and the weights' size. Timings include
    a CUDA synchronise on GPU. The settings, device, dtype and CPU threads are recorded.
    """
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("prompt_len", prompt_len, 1),
        ("new_tokens", new_tokens, 0),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    device = _device(model)
    causal = _is_causal(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab_size(model), (batch_size, prompt_len), generator=g).to(device)
    keep_last = _accepts(model, "logits_to_keep")

    def prefill():
        if not causal:
            return model(input_ids=ids, attention_mask=torch.ones_like(ids))
        kwargs = {"logits_to_keep": 1} if keep_last else {}
        return model(input_ids=ids, use_cache=True, **kwargs)

    def run_once() -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        out = prefill()
        _sync(device)
        t1 = time.perf_counter()
        if not causal or new_tokens == 0:
            return t1 - t0, 0.0
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    prefill_s: list[float] = []
    decode_s: list[float] = []
    mem: dict[str, Any] = {}
    with _eval_mode(model):
        for _ in range(warmup):
            run_once()
        if memory:
            mem = peak_memory(run_once, device)
        for _ in range(repeats):
            p, d = run_once()
            prefill_s.append(p)
            decode_s.append(d)
    p_med = statistics.median(prefill_s)
    result: dict[str, Any] = {
        "prefill_tokens_per_s": batch_size * prompt_len / p_med,
        "prefill_s": p_med,
        "decode_tokens_per_s": None,
        "decode_s": None,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens if causal else 0,
        "repeats": repeats,
        "warmup": warmup,
        "causal": causal,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    if causal and new_tokens > 0:
        d_med = statistics.median(decode_s)
        result["decode_s"] = d_med
        result["decode_tokens_per_s"] = batch_size * new_tokens / d_med
    if memory:
        result["peak_memory_mb"] = mem["peak_memory_mb"]
        result["memory_method"] = mem["method"]
        result["weights_memory_mb"] = weights_memory_mb(model)
    return result


# ---- size ---------------------------------------------------------------------------------
def param_count(model: nn.Module, *, embeddings: bool = True) -> int:
    """Number of parameters (tied tensors counted once). ``embeddings=False`` leaves out the
    input embedding and a separate (untied) output embedding."""
    total = sum(p.numel() for p in model.parameters())
    if not embeddings:
        seen: set[int] = set()
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and id(module.weight) not in seen:
                seen.add(id(module.weight))
                total -= module.weight.numel()
    return total


def flops_breakdown(model: nn.Module, seq_len: int = 2048) -> dict[str, float]:
    """Analytic forward FLOPs per token, by part, from the per-layer shapes.

    A matrix product ``[1, a] @ [a, b]`` costs ``2ab`` FLOPs (one multiply and one add per
    weight). With hidden size ``D`` and, per layer ``l``, ``H_l`` query heads, ``K_l`` KV
    heads, head size ``d`` and MLP width ``I_l``::

        attention_proj  = sum_l 2 D d (2 H_l + 2 K_l)        # q, o  and  k, v projections
        attention_score = sum_l 4 H_l d c                    # Q K^T and A V over c keys
        mlp             = sum_l 2 m D I_l                    # m = 3 (gate, up, down) or 2
        lm_head         = 2 D V                              # when the model has an LM head

    ``c`` is the mean number of keys a token attends to in a forward pass over ``seq_len``
    tokens: ``(seq_len + 1) / 2`` for causal models, ``seq_len`` for bidirectional encoders
    (sliding windows are ignored). Embedding look-ups, norms, biases, activations, softmax
    and rotary embeddings are lower-order and left out. Kaplan et al. 2020 ("Scaling Laws for
    Neural Language Models", Table 1) count the same terms.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    from prunekit.core.shapes import config_global
    from prunekit.plugins import get_adapter

    adapter = get_adapter(model)
    hidden = int(config_global(model.config.get_text_config(), "hidden_size"))
    m = 3 if adapter.gated else 2
    c = (seq_len + 1) / 2 if adapter.causal else float(seq_len)
    proj = score = mlp = 0.0
    for s in adapter.shapes(model):
        proj += 2 * hidden * s.head_dim * (2 * s.n_heads + 2 * s.n_kv_heads)
        score += 4 * s.n_heads * s.head_dim * c
        mlp += 2 * m * hidden * s.intermediate
    head = model.get_output_embeddings() if adapter.causal else None
    lm_head = 0.0 if head is None else 2.0 * adapter.out_features(head) * adapter.in_features(head)
    return {
        "attention_proj": proj,
        "attention_score": score,
        "mlp": mlp,
        "lm_head": lm_head,
        "total": proj + score + mlp + lm_head,
    }


def flops_per_token(model: nn.Module, seq_len: int = 2048, *, lm_head: bool = True) -> float:
    """Analytic forward FLOPs per token at sequence length ``seq_len`` (formula in
    :func:`flops_breakdown`); ``lm_head=False`` leaves out the output projection."""
    parts = flops_breakdown(model, seq_len)
    return parts["total"] - (0.0 if lm_head else parts["lm_head"])


# ---- encoders -----------------------------------------------------------------------------
def _pooled(model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**enc, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out.hidden_states[-1]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def embedding_similarity(
    model: nn.Module,
    dense_model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    progress: bool = False,
) -> float:
    """Mean over ``sentences`` of the cosine similarity between the mean-pooled last hidden
    states of ``model`` and of ``dense_model`` (sentence-transformers' pooling for
    all-MiniLM-L6-v2): ``1/n sum_i cos(mean_t h_i,t, mean_t h'_i,t)``, padding excluded.
    1.0 means the pruned encoder embeds exactly like the dense one."""
    if not sentences:
        raise ValueError("sentences is empty; pass at least one sentence")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token is None:
        batch_size = 1  # no padding needed one sentence at a time
    total = 0.0
    chunks = [sentences[i : i + batch_size] for i in range(0, len(sentences), batch_size)]
    with _eval_mode(model), _eval_mode(dense_model):
        for chunk in _progress(chunks, total=len(chunks), desc="similarity", enabled=progress):
            enc = tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            a = _pooled(model, {k: v.to(_device(model)) for k, v in enc.items()})
            b = _pooled(dense_model, {k: v.to(_device(dense_model)) for k, v in enc.items()})
            cos = nn.functional.cosine_similarity(a.float(), b.float().to(a.device), dim=-1)
            total += float(cos.sum())
    return total / len(sentences)


# ---- bundle -------------------------------------------------------------------------------
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    *,
    text: str | os.PathLike | None = None,
    dense_model: nn.Module | None = None,
    context_len: int = 2048,
    max_tokens: int | None = None,
    max_chars: int | None = None,
    latency_kwargs: dict[str, Any] | None = None,
    measure_latency: bool = True,
    n_sentences: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Everything the before/after table needs, in one dict::

        {"model_type", "n_layers", "params", "params_no_embeddings",
         "flops_per_token", "flops_seq_len",
         "perplexity": {...perplexity()...}          # causal LMs, when text is given
         "embedding_similarity": {"cosine", "sentences", "text"}   # encoders, with dense_model
         "latency": {...latency()...}}                # unless measure_latency=False

    Decoders get the perplexity on ``text`` (``context_len``, ``max_tokens``, ``max_chars``).
    Encoders (no LM head) get the embedding similarity to ``dense_model`` on the first
    ``n_sentences`` sentences of ``text`` (cut to ``max_chars``). ``flops_per_token`` is taken
    at ``context_len``; ``latency_kwargs`` go to :func:`latency`.
    """
    from prunekit.plugins import get_adapter

    adapter = get_adapter(model)
    causal = _is_causal(model)
    result: dict[str, Any] = {
        "model_type": model.config.model_type,
        "n_layers": len(adapter.layers(model)),
        "params": param_count(model),
        "params_no_embeddings": param_count(model, embeddings=False),
        "flops_per_token": flops_per_token(model, context_len),
        "flops_seq_len": context_len,
    }
    if text is not None and causal:
        result["perplexity"] = perplexity(
            model,
            tokenizer,
            text,
            context_len=context_len,
            max_tokens=max_tokens,
            max_chars=max_chars,
            progress=progress,
        )
    elif text is not None and dense_model is not None:
        content, label = read_text(text, max_chars)
        sentences = sentences_from_text(content, n_sentences)
        result["embedding_similarity"] = {
            "cosine": embedding_similarity(
                model, dense_model, tokenizer, sentences, progress=progress
            ),
            "sentences": len(sentences),
            "text": label,
            "max_chars": max_chars,
        }
    if measure_latency:
        result["latency"] = latency(model, **(latency_kwargs or {}))
    return result
