"""Calibration windows: shape, reproducibility, sources, and the evaluation-data guard."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from prunekit.core.calibration import Calibration, CalibrationError, load_calibration


class CharTokenizer:
    """One token per byte (mod VOCAB-1); EOS = VOCAB-1. Enough to check packing exactly."""

    eos_token_id = VOCAB - 1
    bos_token_id = VOCAB - 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[b % (VOCAB - 1) for b in t.encode()] for t in texts]}


def _write(path, n_docs=30, words=60):
    docs = [" ".join(f"w{d}x{i}" for i in range(words)) for d in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return docs


def test_shape_dtype_reproducible_and_seeded(tmp_path):
    f = tmp_path / "a.txt"
    _write(f)
    tok = CharTokenizer()
    a = load_calibration(f, tok, n_samples=5, seq_len=40, seed=3)
    b = load_calibration(str(f), tok, n_samples=5, seq_len=40, seed=3)
    c = load_calibration(f, tok, n_samples=5, seq_len=40, seed=4)
    assert a.shape == (5, 40) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_are_slices_of_the_packed_documents(tmp_path):
    f = tmp_path / "a.txt"
    docs = _write(f, n_docs=8, words=20)
    tok = CharTokenizer()
    x = load_calibration(f, tok, n_samples=6, seq_len=25, seed=0)
    # every window must appear verbatim in some packing of the documents joined by EOS
    doc_ids = [tok([d])["input_ids"][0] for d in docs]
    eos = tok.eos_token_id
    for row in x.tolist():
        pieces = [p for p in _split(row, eos) if p]
        for p in pieces[1:-1]:  # inner pieces are whole documents
            assert p in doc_ids
        for p in pieces[:1] + pieces[-1:]:  # edge pieces are a suffix / prefix of a document
            assert any(_contains(d, p) for d in doc_ids)
    # non-overlapping aligned chunks when there are enough of them
    flat = [tuple(r) for r in x.tolist()]
    assert len(set(flat)) == len(flat)


def _split(row, sep):
    out, cur = [], []
    for t in row:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    out.append(cur)
    return out


def _contains(seq, part):
    n = len(part)
    return any(seq[i : i + n] == part for i in range(len(seq) - n + 1))


def test_folder_of_txt_files(tmp_path):
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "one.txt", n_docs=3)
    _write(tmp_path / "d" / "two.txt", n_docs=3)
    (tmp_path / "d" / "ignored.csv").write_text("a,b\n")
    x = load_calibration(tmp_path / "d", CharTokenizer(), n_samples=4, seq_len=32)
    assert x.shape == (4, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .txt files"):
        load_calibration(tmp_path / "empty", CharTokenizer(), n_samples=1, seq_len=8)


def test_wikitext_test_is_refused(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text("some text " * 100)
    with pytest.raises(CalibrationError, match="evaluation only"):
        load_calibration(f, CharTokenizer(), n_samples=1, seq_len=8)
    with pytest.raises(CalibrationError, match="evaluation only"):
        load_calibration("wikitext:wikitext-2-raw-v1:test", CharTokenizer())


def test_too_short_and_bad_counts(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("tiny\n")
    with pytest.raises(CalibrationError, match="fewer than seq_len"):
        load_calibration(f, CharTokenizer(), n_samples=1, seq_len=64)
    with pytest.raises(ValueError, match="n_samples"):
        load_calibration(f, CharTokenizer(), n_samples=0)
    with pytest.raises(ValueError, match="seq_len"):
        Calibration(seq_len=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_calibration(tmp_path / "missing.txt", CharTokenizer())


def test_datasets_name_failure_is_clear(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalibrationError, match="local text file"):
        load_calibration("some_corpus:cfg:train", CharTokenizer(), n_samples=1, seq_len=8)


def test_self_calibration_is_seeded_and_starts_at_bos():
    model = tiny_model("llama")
    tok = CharTokenizer()
    a = load_calibration("self", tok, n_samples=3, seq_len=6, seed=0, model=model)
    b = Calibration("self", n_samples=3, seq_len=6, seed=0).load(tok, model=model)
    assert a.shape == (3, 6) and torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all()
    assert a.max() < VOCAB
    with pytest.raises(CalibrationError, match="model="):
        load_calibration("self", tok, n_samples=1, seq_len=4)
    with pytest.raises(CalibrationError, match="encoder"):
        load_calibration("self", tok, n_samples=1, seq_len=4, model=tiny_model("bert"))


def test_calibration_dict_roundtrip():
    c = Calibration("x.txt", n_samples=4, seq_len=16, seed=2)
    assert Calibration.from_dict(c.to_dict()) == c


@pytest.mark.slow
def test_brown_default_with_real_tokenizer():
    from transformers import AutoTokenizer

    from prunekit.core.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    x = load_calibration(None, tok, n_samples=4, seq_len=64)
    assert x.shape == (4, 64)
    assert "the" in tok.decode(x[0]).lower()
