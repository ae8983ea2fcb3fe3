"""Reading a JSON object given either inline or as a file path (plans, scores), with errors
that name the file and what it should hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(
    text_or_path: str | Path, what: str, error: type[Exception] = ValueError
) -> dict[str, Any]:
    """Parse ``text_or_path`` (inline JSON starting with ``{``, or a path) as a JSON object.

    A missing file raises ``FileNotFoundError``; invalid JSON or a non-object raises ``error``
    (e.g. :class:`prunekit.PruningPlanError`) with the file name and the parser's position."""
    text = str(text_or_path)
    source = "inline JSON"
    if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise error(f"{what} file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} ({source}) is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} ({source}) must be a JSON object, got {type(data).__name__}")
    return data
