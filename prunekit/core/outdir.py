"""Output directories, the one place that guards them (issue 13): an output is never the
input, never contains it or lies inside it; ``overwrite`` replaces only an empty directory or
an earlier model/prunekit output; writes go to a temporary sibling moved into place when
complete (:class:`AtomicDir`); stale temporaries of killed runs are reported and removed;
SIGTERM removes the temporary like SIGINT. :mod:`prunekit.core.io` re-exports these."""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunekit.errors import OutputExistsError, OutputPathError

#: what an earlier model or prunekit output holds: ``--overwrite`` replaces a directory only
#: when every entry is one of these (or it is empty), so it never deletes unrelated files
_OUTPUT_NAMES = frozenset(
    {
        "prunekit.json",
        "report.md",
        "README.md",
        "plots",
        "probe",
        "merges.txt",
        "vocab.txt",
        "tokenizer.model",
        "spiece.model",
        "chat_template.jinja",
        ".gitattributes",
        ".cache",  # huggingface-cli download --local-dir
        "quant_log.csv",  # GPTQModel
    }
)
_OUTPUT_SUFFIXES = (".safetensors", ".json", ".py")


def input_paths(*sources: Any) -> tuple[Path, ...]:
    """The local files or directories a model, path or hub id was read from (a model by its
    ``config._name_or_path``); hub ids and in-memory models without a source give nothing."""
    found = []
    for source in sources:
        if hasattr(source, "config") and not isinstance(source, str | Path):  # a model
            source = getattr(source.config, "_name_or_path", None)
        if source and Path(source).exists():
            found.append(Path(source).resolve())
    return tuple(found)


def _check_not_input(out: Path, inputs: tuple[Path, ...]) -> None:
    target = out.resolve()
    for source in inputs:
        if target == source:
            how = "is"
        elif source.is_relative_to(target):
            how = "contains"
        elif target.is_relative_to(source):
            how = "lies inside"
        else:
            continue
        raise OutputPathError(
            str(out),
            f"{how} the input checkpoint {source}; the input is never overwritten: "
            "write somewhere outside it",
        )


def _foreign_entries(out: Path) -> list[str]:
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name not in _OUTPUT_NAMES and not (p.is_file() and p.name.endswith(_OUTPUT_SUFFIXES))
    )


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``out`` left by a killed run,
    saying so on stderr (one line)."""
    stale = sorted(
        p for pattern in (".tmp-*", ".old-*") for p in out.parent.glob(f".{out.name}{pattern}")
    )
    if stale:
        names = ", ".join(p.name for p in stale)
        print(f"prunekit: removing stale temporary {names} from an earlier run", file=sys.stderr)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def check_output_dir(
    out_dir: str | Path, overwrite: bool = False, *, inputs: tuple[Any, ...] = ()
) -> Path:
    """Fail before any work if ``out_dir`` cannot be written without losing anything: it is,
    contains or lies inside one of ``inputs`` (paths or models, see :func:`input_paths`), or it
    is not empty and ``overwrite`` is false, or it holds files that are not a model/prunekit
    output. Stale temporaries of an earlier killed run to ``out_dir`` are removed."""
    out = Path(out_dir)
    _check_not_input(out, input_paths(*inputs))
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(str(out))  # a file: never replaced
        if any(out.iterdir()):
            if not overwrite:
                raise OutputExistsError(str(out))
            foreign = _foreign_entries(out)
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise OutputPathError(
                    str(out),
                    f"holds files that are not a model or prunekit output ({shown}); "
                    "--overwrite replaces only those: choose another path",
                )
    if out.parent.is_dir():
        remove_stale_temporaries(out)
    return out


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM like SIGINT (``KeyboardInterrupt``) inside the block, so temporary
    directories are removed; a no-op outside the main thread or under a custom handler."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(
        signal.SIGTERM
    ) not in (signal.SIG_DFL, None):
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class AtomicDir:
    """Write into a temporary sibling directory; move it onto ``out_dir`` only on success
    (checked with :func:`check_output_dir`; SIGTERM removes the temporary like SIGINT)."""

    def __init__(self, out_dir: str | Path, overwrite: bool = False, *, inputs: tuple = ()):
        self.out = check_output_dir(out_dir, overwrite, inputs=inputs)
        self.tmp: Path | None = None
        self._signals = sigterm_as_interrupt()

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._signals.__enter__()
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            backup = None
            if self.out.exists():
                backup = self.out.with_name(f".{self.out.name}.old-{self.tmp.name[-8:]}")
                self.out.rename(backup)
            self.tmp.rename(self.out)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        finally:
            self._signals.__exit__(None, None, None)
