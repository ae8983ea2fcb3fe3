"""``datasets`` sources: presets, spec strings, a fast check that they resolve, and reading
their text. The forms a spec string takes are described in :mod:`prunekit.core.data`."""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prunekit.errors import PrunekitError

ROLES = ("calibration", "evaluation")


class DataSourceError(PrunekitError, ValueError):
    """A text source cannot be used; ``source`` and ``role`` say which and what for."""

    def __init__(self, message: str, *, source: Any = None, role: str = "calibration"):
        self.source = source
        self.role = role
        super().__init__(message)


# ---- datasets specs ------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """One ``datasets.load_dataset`` call and the column holding the text.

    ``column`` (``field=`` in a spec string) names a string column, or a chat column (a list
    of ``{role, content}`` messages); None picks ``text`` or the first string column.
    ``eval_split`` is the held-out split a preset uses for evaluation."""

    path: str
    config: str | None = None
    split: str = "train"
    column: str | None = None
    data_files: dict[str, str] | tuple[str, ...] | None = None
    streaming: bool = False
    eval_split: str | None = field(default=None, compare=False)

    def load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"path": self.path, "name": self.config, "split": self.split}
        if self.data_files is not None:
            files = self.data_files
            kwargs["data_files"] = dict(files) if isinstance(files, dict) else list(files)
        if self.streaming:
            kwargs["streaming"] = True
        return kwargs

    def is_local(self) -> bool:
        """Needs no hub: a local folder or one of ``datasets``' packaged builders."""
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return Path(self.path).is_dir() or self.path in _PACKAGED_DATASETS_MODULES

    def describe(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self._options().items())
        return f"hf:{self.path}" + (f"?{query}" if query else "")

    def _options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"config": self.config, "split": self.split, "field": self.column}
        files = self.data_files
        if isinstance(files, dict):
            files = ",".join(files.values()) if len(files) == 1 else None
        out["data_files"] = ",".join(files) if isinstance(files, tuple) else files
        out["streaming"] = 1 if self.streaming else None
        return {k: v for k, v in out.items() if v is not None}


_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
#: presets: ``--calib NAME`` / ``--eval-text NAME``
PRESETS: dict[str, DatasetSpec] = {
    "wikitext2": DatasetSpec("wikitext", "wikitext-2-raw-v1", "train", "text", eval_split="test"),
    "wikitext103": DatasetSpec(
        "wikitext", "wikitext-103-raw-v1", "train", "text", eval_split="test"
    ),
    # one shard of each split (as Wanda / SparseGPT do), streamed: C4 is never downloaded whole
    "c4": DatasetSpec(
        "allenai/c4", None, "train", "text", _C4_FILES, True, eval_split="validation"
    ),
    "pile-val": DatasetSpec(
        "mit-han-lab/pile-val-backup", None, "validation", "text", streaming=True
    ),
    "ultrachat": DatasetSpec(
        "HuggingFaceH4/ultrachat_200k", None, "train_sft", "messages", None, True, "test_sft"
    ),
    "fineweb-edu": DatasetSpec(
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text", streaming=True
    ),
    "alpaca": DatasetSpec("tatsu-lab/alpaca", None, "train", "text"),
}
_SPEC_KEYS = ("config", "split", "field", "data_files", "streaming")


def parse_spec(text: str, role: str = "calibration") -> DatasetSpec:
    """A preset name, ``hf:PATH?key=value&...`` or ``NAME[:CONFIG[:SPLIT]]`` as a
    :class:`DatasetSpec` (see the module doc). ``role="evaluation"`` picks a preset's
    held-out split."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if text in PRESETS:
        spec = PRESETS[text]
        return (
            replace(spec, split=spec.eval_split)
            if role == "evaluation" and spec.eval_split
            else spec
        )
    if text.startswith("hf:"):
        return _parse_query(text)
    name, config, split = (text.split(":", 2) + [None, None])[:3]
    if not name:
        raise DataSourceError(f"{text!r}: no dataset name before ':'", source=text, role=role)
    return DatasetSpec(name, config or None, split or "train")


def _parse_query(text: str) -> DatasetSpec:
    path, _, query = text[3:].partition("?")
    if not path:
        raise DataSourceError(f"{text!r}: no dataset path after 'hf:'", source=text)
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or key not in _SPEC_KEYS:
            raise DataSourceError(
                f"{text!r}: bad option {item!r}; use key=value with keys {', '.join(_SPEC_KEYS)}",
                source=text,
            )
        options[key] = value
    if "field" in options:
        options["column"] = options.pop("field")
    if "data_files" in options:
        options["data_files"] = tuple(f for f in options["data_files"].split(",") if f)
    if "streaming" in options:
        flag = options["streaming"].lower()
        if flag not in ("1", "0", "true", "false", "yes", "no"):
            raise DataSourceError(f"{text!r}: streaming must be 1/0/true/false", source=text)
        options["streaming"] = flag in ("1", "true", "yes")
    return DatasetSpec(path, **options)


# ---- reaching the hub ----------------------------------------------------------------------
def hub_offline() -> bool:
    """``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` as ``datasets`` reads them."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=4)
def _can_connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection within ``timeout`` seconds (checked once per
    process): without it ``datasets`` would retry for half a minute before failing."""
    if hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    return _can_connect(url.hostname or "huggingface.co", port, timeout)


def _hub_error(spec: DatasetSpec, role: str, cause: str) -> DataSourceError:
    flag = "--calib" if role == "calibration" else "--eval-text"
    return DataSourceError(
        f"{role} source {spec.describe()} cannot be loaded: {cause}. Without a hub pass a local "
        f"text file or folder ({flag} FILE), set HF_DATASETS_OFFLINE=1 to use datasets' cache"
        + (
            ", or leave it out (the bundled Brown sample)" if role == "calibration" else ", or none"
        ),
        source=spec.describe(),
        role=role,
    )


def check_spec(spec: DatasetSpec, role: str = "calibration") -> None:
    """Resolve ``spec`` quickly (builder and split names) without loading its data; raises
    :class:`DataSourceError` saying why and what to do instead."""
    if not spec.is_local() and not hub_offline() and not hub_reachable():
        raise _hub_error(spec, role, "the Hugging Face hub is not reachable")
    from datasets import load_dataset_builder

    kwargs = spec.load_kwargs()
    kwargs.pop("split")
    kwargs.pop("streaming", None)
    try:
        builder = load_dataset_builder(**kwargs)
    except Exception as e:  # unknown name or config, offline without a cache: all end here
        raise _hub_error(spec, role, f"{type(e).__name__}: {e}") from None
    splits = builder.info.splits
    base = spec.split.split("[", 1)[0].split("+", 1)[0]
    if splits and base not in splits:
        raise DataSourceError(
            f"{role} source {spec.describe()}: no split {base!r}; it has {', '.join(splits)}",
            source=spec.describe(),
            role=role,
        )


# ---- reading ---------------------------------------------------------------------------------
def read_documents(
    spec: DatasetSpec, *, max_chars: int | None = None, role: str = "calibration"
) -> list[Any]:
    """The non-empty rows of ``spec``'s text column: strings, or lists of chat messages
    (``{role, content}``) for a chat column. A streamed dataset is read only until
    ``max_chars`` characters are collected."""
    check_spec(spec, role)
    from datasets import load_dataset

    ds = load_dataset(**spec.load_kwargs())
    column = _text_column(ds, spec, role)
    docs: list[Any] = []
    size = 0
    for row in ds if spec.streaming else ds.select_columns([column]):
        doc = row[column]
        if not doc or (isinstance(doc, str) and not doc.strip()):
            continue
        docs.append(doc)
        size += len(as_text(doc))
        if spec.streaming and max_chars is not None and size >= max_chars:
            break
    if not docs:
        raise DataSourceError(f"{spec.describe()} holds no text", source=spec.describe(), role=role)
    return docs


def _text_column(ds: Any, spec: DatasetSpec, role: str) -> str:
    """``spec.column`` when the dataset has it, else ``text``, else the first string column."""
    if ds.features is None:  # a stream that does not declare its columns: look at one row
        row = next(iter(ds), {})
        names, strings = list(row), [k for k, v in row.items() if isinstance(v, str)]
    else:
        names = list(ds.features)
        strings = [c for c, f in ds.features.items() if getattr(f, "dtype", "") == "string"]
    wanted = spec.column or ("text" if "text" in names else next(iter(strings), None))
    if wanted is None or wanted not in names:
        what = f"no column {wanted!r}" if wanted else "no text column"
        raise DataSourceError(
            f"{spec.describe()} has {what}; name one with field=COLUMN (it has "
            f"{', '.join(names) or 'no columns'})",
            source=spec.describe(),
            role=role,
        )
    return wanted


def as_text(doc: Any) -> str:
    """A document as plain text: a string, or chat messages' contents one per line."""
    if isinstance(doc, str):
        return doc
    return "\n".join(str(m.get("content", "")) for m in doc)
