"""Evaluation: perplexity against a hand-written reference, window accounting, analytic FLOPs
against hand counts, latency and memory sanity, embedding similarity, the CLI, lm-eval."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import VOCAB, save_tiny, tiny_model, tiny_tokenizer, wiki_text
from torch import nn

from prunekit import PrunePlan, apply_plan
from prunekit.core import evaluate as ev


@pytest.fixture(scope="module")
def text() -> str:
    return wiki_text()[:1500]


def _ids(text: str) -> list[int]:
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def _reference_nll(model, ids: list[int], context_len: int) -> tuple[float, int, int]:
    """Mean NLL by hand: one window at a time, one position at a time."""
    total, scored, windows = 0.0, 0, 0
    for start in range(0, len(ids), context_len):
        window = ids[start : start + context_len]
        if len(window) < 2:
            continue
        windows += 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0].double()
        for t in range(1, len(window)):
            logp = logits[t - 1] - torch.logsumexp(logits[t - 1], dim=0)
            total -= float(logp[window[t]])
            scored += 1
    return total / scored, scored, windows


# ---- perplexity -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_perplexity_matches_hand_reference(arch, text):
    model = tiny_model(arch)
    ids = _ids(text)
    nll, scored, windows = _reference_nll(model, ids, 48)
    got = ev.perplexity(model, tiny_tokenizer(), text, context_len=48, progress=False)
    assert got["nll"] == pytest.approx(nll, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert (got["tokens"], got["windows"], got["input_tokens"]) == (scored, windows, len(ids))
    assert got["context_len"] == 48 and got["add_bos"] is False
    assert got["text"].startswith("<raw text")


def test_constant_model_has_vocab_perplexity(text):
    """Zero final norm -> zero logits -> uniform prediction -> perplexity = vocabulary size."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.zero_()
    got = ev.perplexity(model, tiny_tokenizer(), text, context_len=40, progress=False)
    assert got["perplexity"] == pytest.approx(VOCAB, rel=1e-6)


def test_window_and_budget_accounting(text, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = _ids(text)
    n = len(ids)
    # last window of exactly one token: nothing to predict there, so it is dropped
    c = next(c for c in range(20, 200) if n % c == 1)
    got = ev.perplexity(model, tok, text, context_len=c, progress=False)
    assert got["windows"] == n // c and got["tokens"] == n - 1 - n // c
    # token budget: the first 101 tokens in windows of 50 -> 49 + 49 scored, 1 dropped
    got = ev.perplexity(model, tok, text, context_len=50, max_tokens=101, progress=False)
    assert (got["input_tokens"], got["windows"], got["tokens"]) == (101, 2, 98)
    assert got["max_tokens"] == 101
    ref, _, _ = _reference_nll(model, ids[:101], 50)
    assert got["nll"] == pytest.approx(ref, rel=1e-6)
    # character budget on a file == the same prefix passed as raw text
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    by_file = ev.perplexity(model, tok, path, context_len=64, max_chars=1234, progress=False)
    by_str = ev.perplexity(model, tok, text[:1234], context_len=64, progress=False)
    assert by_file["nll"] == by_str["nll"] and by_file["tokens"] == by_str["tokens"]
    assert by_file["text"] == str(path) and by_file["max_chars"] == 1234


def test_add_bos_scores_every_text_token(text):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = _ids(text)[:90]
    got = ev.perplexity(
        model, tok, text, context_len=31, max_tokens=90, add_bos=True, progress=False
    )
    assert got["add_bos"] is True and got["tokens"] == 90 and got["windows"] == 3
    # by hand: every window is [BOS] + 30 text tokens
    bos = tok.bos_token_id
    total = 0.0
    for s in range(0, 90, 30):
        w = [bos] + ids[s : s + 30]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].double(), -1)
        total -= sum(float(logp[t - 1, w[t]]) for t in range(1, len(w)))
    assert got["nll"] == pytest.approx(total / 90, rel=1e-6)


def test_batching_does_not_change_the_result(text):
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    one = ev.perplexity(model, tok, text, context_len=32, progress=False)
    three = ev.perplexity(model, tok, text, context_len=32, batch_size=3, progress=False)
    assert three["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert three["tokens"] == one["tokens"]


def test_perplexity_errors(text, tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="embedding_similarity"):
        ev.perplexity(tiny_model("bert"), tok, text, progress=False)
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match="context_len"):
        ev.perplexity(llama, tok, text, context_len=1)
    with pytest.raises(ValueError, match="too few"):
        ev.perplexity(llama, tok, "a", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.perplexity(llama, tok, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="empty"):
        ev.perplexity(llama, tok, "   \n  ")


# ---- FLOPs and parameters -------------------------------------------------------------------
def test_flops_hand_count_tiny_llama():
    # D=64, 5 layers, 8 q heads, 2 kv heads, head_dim 8, MLP 96 (gated), vocab 128, tied
    got = ev.flops_breakdown(tiny_model("llama"), seq_len=64)
    assert got["attention_proj"] == 5 * (2 * 64 * 64 + 2 * 64 * 16 + 2 * 64 * 16 + 2 * 64 * 64)
    assert got["attention_score"] == 5 * (2 * 64 * 32.5 + 2 * 64 * 32.5)  # causal: 65/2 keys
    assert got["mlp"] == 5 * 3 * 2 * 64 * 96
    assert got["lm_head"] == 2 * 64 * 128
    assert ev.flops_per_token(tiny_model("llama"), 64) == sum(
        v for k, v in got.items() if k != "total"
    )
    assert ev.flops_per_token(tiny_model("llama"), 64, lm_head=False) == got["total"] - 16384


def test_flops_hand_count_tiny_bert():
    # D=64, 4 heads of 16, MLP 96 (not gated), bidirectional, no LM head
    got = ev.flops_breakdown(tiny_model("bert"), seq_len=10)
    assert got["attention_proj"] == 5 * 4 * 2 * 64 * 64
    assert got["attention_score"] == 5 * 4 * 64 * 10
    assert got["mlp"] == 5 * 2 * 2 * 64 * 96
    assert got["lm_head"] == 0


def _linear_flops(model) -> float:
    """2 x (weights of every Linear inside the layers): what the matmul terms must equal."""
    from prunekit import get_adapter

    layers = get_adapter(model).layers(model)
    return sum(2.0 * m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear))


PLANS = {
    "layers": PrunePlan(layers=[1, 3]),
    "heads": PrunePlan(heads={i: [0, 4] for i in range(5)}),
    "neurons": PrunePlan(neurons={i: list(range(0, 96, 3)) for i in range(5)}),
    "per_layer": PrunePlan(heads={2: [0, 1, 2, 3]}, neurons={0: [5, 6], 4: list(range(40))}),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_flops_and_params_shrink_after_pruning(arch):
    dense = tiny_model(arch)
    base_flops, base_params = ev.flops_per_token(dense, 128), ev.param_count(dense)
    for name, plan in PLANS.items():
        if arch == "bert" and name in ("heads", "per_layer"):  # 4 heads, no GQA
            plan = PrunePlan(heads={i: [0] for i in range(5)}, neurons=plan.neurons)
        model = tiny_model(arch)
        removed = sum(p.numel() for p in model.parameters())
        apply_plan(model, plan)
        removed -= sum(p.numel() for p in model.parameters())
        parts = ev.flops_breakdown(model, 128)
        assert parts["attention_proj"] + parts["mlp"] == _linear_flops(model), name
        assert parts["total"] < base_flops, name
        assert ev.param_count(model) == base_params - removed > 0, name


def test_evaluate_per_layer_model_in_memory(text):
    """Heterogeneous layers (per-layer KV heads and MLP widths): perplexity equals the hand
    reference and decoding with the KV cache runs."""
    model = tiny_model("llama")
    apply_plan(model, PLANS["per_layer"])
    assert model.config.is_heterogeneous
    got = ev.evaluate(
        model,
        tiny_tokenizer(),
        text=text,
        context_len=64,
        latency_kwargs={"prompt_len": 6, "new_tokens": 2, "repeats": 1, "memory": False},
        progress=False,
    )
    nll, scored, _ = _reference_nll(model, _ids(text), 64)
    assert got["perplexity"]["nll"] == pytest.approx(nll, rel=1e-6)
    assert got["perplexity"]["tokens"] == scored
    assert got["latency"]["decode_tokens_per_s"] > 0


def test_param_count_counts_tied_weights_once():
    model = tiny_model("llama")  # tie_word_embeddings=True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(p): p.numel() for p in model.state_dict(keep_vars=True).values()}
    assert ev.param_count(model) == sum(unique.values())
    assert ev.param_count(model, embeddings=False) == sum(unique.values()) - 128 * 64
    untied = tiny_model("mistral")
    assert ev.param_count(untied) - ev.param_count(untied, embeddings=False) == 2 * 128 * 64


# ---- latency and memory ---------------------------------------------------------------------
def test_latency_decoder_records_settings():
    got = ev.latency(tiny_model("llama"), batch_size=2, prompt_len=8, new_tokens=3, repeats=2)
    assert got["prefill_tokens_per_s"] > 0 and got["decode_tokens_per_s"] > 0
    assert got["prefill_tokens_per_s"] == pytest.approx(2 * 8 / got["prefill_s"])
    assert got["decode_tokens_per_s"] == pytest.approx(2 * 3 / got["decode_s"])
    assert {k: got[k] for k in ("batch_size", "prompt_len", "new_tokens", "repeats")} == {
        "batch_size": 2,
        "prompt_len": 8,
        "new_tokens": 3,
        "repeats": 2,
    }
    assert got["causal"] is True and got["device"] == "cpu" and got["dtype"] == "float32"
    assert got["peak_memory_mb"] >= 0
    llama = tiny_model("llama")
    weight_bytes = 4 * (ev.param_count(llama) + sum(b.numel() for b in llama.buffers()))
    assert got["weights_memory_mb"] == pytest.approx(weight_bytes / 2**20)


def test_latency_encoder_is_prefill_only():
    got = ev.latency(tiny_model("bert"), prompt_len=8, repeats=1, warmup=0, memory=False)
    assert got["prefill_tokens_per_s"] > 0
    assert got["decode_tokens_per_s"] is None and got["new_tokens"] == 0
    assert "peak_memory_mb" not in got
    with pytest.raises(ValueError, match="repeats"):
        ev.latency(tiny_model("bert"), repeats=0)


def test_latency_leaves_training_mode_alone():
    model = tiny_model("llama").train()
    ev.latency(model, prompt_len=4, new_tokens=1, repeats=1, warmup=0, memory=False)
    assert model.training


def test_peak_memory_sees_a_64mb_allocation():
    def allocate():
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        return float(x[-1])

    got = ev.peak_memory(allocate)
    assert got["peak_memory_mb"] >= 60, got
    assert got["method"] in ("rss_hwm", "ru_maxrss_delta")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc + /proc behaviour")
def test_peak_memory_sees_memory_the_allocator_kept_from_an_earlier_run():
    # 48 chunks of 4 MiB: after the first run frees them, glibc raises its mmap threshold and
    # keeps the freed pages in its heap, so the second run reuses resident pages and its RSS
    # never grows. The measurement must hand free heap back to the kernel first.
    def allocate():
        chunks = [torch.ones(2**20) for _ in range(48)]
        return sum(float(c[-1]) for c in chunks)

    allocate()
    allocate()
    got = ev.peak_memory(allocate)
    assert got["peak_memory_mb"] >= 150, got


# ---- encoders ---------------------------------------------------------------------------------
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A short one.",
    "Structured pruning removes whole heads, neurons and layers from a network.",
]


def test_embedding_similarity_with_itself_is_one():
    model = tiny_model("bert")
    got = ev.embedding_similarity(model, model, tiny_tokenizer(), SENTENCES)
    assert got == pytest.approx(1.0, abs=1e-6)


def test_embedding_similarity_matches_unpadded_reference():
    """Batched with padding == one sentence at a time by hand (padding is masked out)."""
    dense, pruned = tiny_model("bert"), tiny_model("bert")
    apply_plan(pruned, PrunePlan(layers=[2], heads={0: [1, 2]}))
    tok = tiny_tokenizer()
    cosines = []
    for s in SENTENCES:
        ids = torch.tensor([tok(s)["input_ids"]])
        with torch.no_grad():
            a = pruned(input_ids=ids).last_hidden_state[0].mean(0)
            b = dense(input_ids=ids).last_hidden_state[0].mean(0)
        cosines.append(float(torch.dot(a, b) / (a.norm() * b.norm())))
    got = ev.embedding_similarity(pruned, dense, tok, SENTENCES, batch_size=3)
    assert got == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
    assert got < 0.9999


def test_sentences_from_text_skips_headings():
    text = (
        " = Title = \n\nOne two three four five six. Too short.\n"
        "Seven eight nine ten eleven twelve!"
    )
    assert ev.sentences_from_text(text, 5) == [
        "One two three four five six.",
        "Seven eight nine ten eleven twelve!",
    ]
    with pytest.raises(ValueError, match="no sentence"):
        ev.sentences_from_text("tiny. text.", 3)


def test_evaluate_bundles_decoder_and_encoder(text):
    tok = tiny_tokenizer()
    lat = {"prompt_len": 8, "new_tokens": 2, "repeats": 1}
    dec = ev.evaluate(
        tiny_model("llama"),
        tok,
        text=text,
        context_len=32,
        max_chars=800,
        latency_kwargs=lat,
        progress=False,
    )
    assert dec["perplexity"]["max_chars"] == 800 and dec["perplexity"]["context_len"] == 32
    assert dec["latency"]["decode_tokens_per_s"] > 0 and dec["n_layers"] == 5
    assert dec["flops_per_token"] == ev.flops_per_token(tiny_model("llama"), 32)
    bert = tiny_model("bert")
    enc = ev.evaluate(bert, tok, text=text, dense_model=bert, measure_latency=False, progress=False)
    assert enc["embedding_similarity"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert "perplexity" not in enc and "latency" not in enc


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_eval_pruned_model(tmp_path, text):
    from conftest import run_python

    from prunekit import load_pretrained, save_pretrained

    model = tiny_model("llama")
    # uniform: 4 of 8 heads in every layer (6 heads would not divide hidden 64, which
    # transformers' Llama config validator requires)
    apply_plan(model, PrunePlan(layers=[1], heads={i: [0, 1, 4, 5] for i in (0, 2, 3, 4)}))
    save_pretrained(model, tmp_path / "m", tiny_tokenizer())
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    code = "import sys; from prunekit.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [
        "eval",
        str(tmp_path / "m"),
        "--text",
        str(tmp_path / "t.txt"),
        "--context-len",
        "40",
        "--max-chars",
        "2000",
        "--prompt-len",
        "8",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
        "--no-progress",
        "--json",
        str(tmp_path / "r.json"),
    ]
    res = run_python(code.replace("sys.argv[1:]", repr(args)))
    assert res.returncode == 0, res.stderr
    assert "perplexity" in res.stdout and "decode tokens/s" in res.stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    loaded, tok = load_pretrained(tmp_path / "m")
    ref = ev.perplexity(
        loaded, tok, tmp_path / "t.txt", context_len=40, max_chars=2000, progress=False
    )
    assert saved["perplexity"]["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert saved["params"] == ev.param_count(model)
    assert f"{ref['perplexity']:.2f}" in res.stdout


def test_cli_eval_bad_inputs(tmp_path, capsys):
    from prunekit.cli import main

    save_tiny("llama", tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--text", str(tmp_path / "nope.txt")]) == 2
    assert "prunekit: error: --text" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m"), "--max-tokens", "0"]) == 2
    assert "--max-tokens must be >= 1" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "local model directory" in capsys.readouterr().err


def test_cli_eval_without_text_in_process(tmp_path, capsys):
    from prunekit.cli import main

    save_tiny("bert", tmp_path / "b")
    rc = main(
        [
            "eval",
            str(tmp_path / "b"),
            "--prompt-len",
            "8",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "prefill tokens/s" in out and "decode" not in out
    assert json.loads((tmp_path / "r.json").read_text())["latency"]["causal"] is False


# ---- lm-evaluation-harness --------------------------------------------------------------------
def test_run_lm_eval_without_the_extra_says_how_to_install(monkeypatch):
    from prunekit.core.lm_eval import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'prunekit\[lm_eval\]'"):
        run_lm_eval(tiny_model("llama"), tiny_tokenizer(), ["hellaswag"])
    with pytest.raises(ValueError, match="tasks"):
        run_lm_eval(tiny_model("llama"), tiny_tokenizer(), [])


def test_run_lm_eval_local_task_matches_hand_loglikelihoods(tmp_path, monkeypatch):
    """An offline multiple-choice task: the harness's per-choice log-likelihoods equal ours."""
    pytest.importorskip("lm_eval")
    from prunekit.core.lm_eval import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [
        {"question": "The cat sat on the", "choices": ["mat", "dog", "sky"], "label": 0},
        {"question": "He went to the", "choices": ["store", "of", "blue"], "label": 2},
        {"question": "Water is", "choices": ["wet", "dry"], "label": 1},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "task.yaml").write_text(
        "task: prunekit_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    model, tok = tiny_model("llama"), tiny_tokenizer()
    got = run_lm_eval(model, tok, ["prunekit_tiny_mc"], include_path=tmp_path, log_samples=True)
    samples = sorted(got["_raw"]["samples"]["prunekit_tiny_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for row, sample in zip(rows, samples, strict=True):
        ctx = tok(row["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in row["choices"]:
            whole = tok(row["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], -1)
            lls.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        harness = [ll for ll, _ in sample["filtered_resps"]]
        assert harness == pytest.approx(lls, abs=1e-4)
        correct += max(range(len(lls)), key=lls.__getitem__) == row["label"]
    assert got["prunekit_tiny_mc"]["acc,none"] == pytest.approx(correct / len(rows))


# ---- real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_wikitext_first_100k_chars_reference_figure():
    """../shared/data/README.md: 20.64 over 24,940 tokens (fp32, no BOS, 2048 windows)."""
    from prunekit import load_pretrained
    from prunekit.core.data import wikitext2_local_path, wikitext2_test_path
    from prunekit.core.models import default_model_dir

    if wikitext2_local_path() is None:
        pytest.skip("the reference figure needs the local WikiText-2 test (PRUNEKIT_DATA)")

    model, tok = load_pretrained(default_model_dir())
    got = ev.perplexity(model, tok, wikitext2_test_path(), max_chars=100_000, progress=False)
    assert got["tokens"] == 24_940
    assert round(got["perplexity"], 2) == 20.64
