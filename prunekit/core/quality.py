"""How good a model is: perplexity (decoders) and embedding similarity to the dense model
(encoders without an LM head), plus the text and model helpers the evaluation shares.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "embedding_similarity",
    "eval_mode",
    "is_causal",
    "model_device",
    "perplexity",
    "progress_bar",
    "read_text",
    "sentences_from_text",
    "synchronize",
    "vocab_size",
]


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
def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op elsewhere), so a timer measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode and ``torch.inference_mode`` for the block; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def is_causal(model: nn.Module) -> bool:
    """Whether the model is a causal LM with an LM head (perplexity, decoding)."""
    from prunekit.plugins import get_adapter

    return bool(get_adapter(model).causal) and model.get_output_embeddings() is not None


def vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def progress_bar(iterable, *, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


# ---- perplexity ---------------------------------------------------------------------------
def _batches(windows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Windows of the same length batched together, ``batch_size`` at a time (all but
    possibly the last window have the same length)."""
    batches: list[list[list[int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0]) == len(w):
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


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
    if not is_causal(model):
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
    batches = _batches(windows, batch_size)
    device = model_device(model)
    nll_sum = 0.0
    scored = 0
    with eval_mode(model):
        for batch in progress_bar(batches, total=len(batches), desc="perplexity", enabled=progress):
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
    with eval_mode(model), eval_mode(dense_model):
        for chunk in progress_bar(chunks, total=len(chunks), desc="similarity", enabled=progress):
            enc = tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            a = _pooled(model, {k: v.to(model_device(model)) for k, v in enc.items()})
            b = _pooled(dense_model, {k: v.to(model_device(dense_model)) for k, v in enc.items()})
            cos = nn.functional.cosine_similarity(a.float(), b.float().to(a.device), dim=-1)
            total += float(cos.sum())
    return total / len(sentences)
