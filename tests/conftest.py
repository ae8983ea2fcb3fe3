"""Tiny random models, one per built-in adapter, and helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNEKIT_SHARED", ROOT.parent / "shared"))
VOCAB = 128


def brown_text() -> str:
    """Calibration/training text: Brown from the development data folder ($PRUNEKIT_DATA or
    ../shared/data) when present, else the sample bundled in the package (295 KB)."""
    from prunekit.core.data import brown_path

    return brown_path().read_text(encoding="utf-8")


def wiki_text() -> str:
    """Held-out text: the local WikiText-2 test when present, else the last 100,000 characters
    of the bundled Brown sample (disjoint from its first 100,000, which tests calibrate on)."""
    from prunekit.core.data import bundled_text_path, wikitext2_local_path

    local = wikitext2_local_path()
    if local is not None:
        return local.read_text(encoding="utf-8")
    return bundled_text_path().read_text(encoding="utf-8")[-100_000:]


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=5, intermediate_size=96)
    gqa = dict(num_attention_heads=8, num_key_value_heads=2)
    windows = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)
    if arch == "llama":
        return tf.LlamaConfig(**common, **gqa, head_dim=8, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**common, **gqa, head_dim=8, sliding_window=4)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, **gqa, **windows, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, **gqa, **windows, head_dim=8)
    if arch == "bert":
        return tf.BertConfig(**common, num_attention_heads=4)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, attn: str = "eager"):
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = attn
    cls = tf.BertModel if arch == "bert" else tf.AutoModelForCausalLM
    model = cls.from_config(config) if arch != "bert" else cls(config)
    # Random init leaves norms at 1 and biases at 0; perturb them so slicing mistakes show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: int = 300):
    """Run ``code`` in a fresh interpreter (never importing prunekit unless the code does)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "bert")
DECODERS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 13), generator=g)


_TOKENIZER = None


def tiny_tokenizer():
    """A byte-level BPE tokenizer with VOCAB tokens, trained offline on a slice of Brown
    (:func:`brown_text`), so tiny models can read real text (calibration, perplexity) in
    end-to-end tests."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        text = brown_text()[:200_000]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<pad>", "<unk>", "<s>"], show_progress=False
        )
        tok.train_from_iterator(text.splitlines(), trainer)
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="<s>",
        )
    return _TOKENIZER


def save_tiny(arch: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model of ``arch`` with :func:`tiny_tokenizer`, saved as a model dir."""
    from prunekit import save_pretrained

    return save_pretrained(tiny_model(arch, seed=seed), path, tiny_tokenizer())


# ---- recovery tests: a learnable token stream, a fast config, one thread ---------------------
#: A short repeated token pattern: learnable in a few dozen steps, so "loss went down" means
#: the loop trains, not noise (2400 tokens -> 100 sequences of 24).
PATTERN_TEXT = torch.tensor([5, 17, 3, 99, 42, 7, 64, 23, 11, 80, 2, 31]).repeat(200)
assert int(PATTERN_TEXT.max()) < VOCAB
FAST_RECOVERY = dict(seq_len=24, batch_size=4, eval_every=10, eval_samples=8, warmup_steps=5)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only spin (8x slower). Use
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
