"""A safetensors checkpoint read without loading it: tensor names, dtypes and shapes from the
file headers (``prunekit info``, ``dtype="auto"``, streaming surgery)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import ModelLoadError

#: safetensors dtype name -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, torch_name)
    for name, torch_name in (
        pair.split(":")
        for pair in (
            "F64:float64 F32:float32 BF16:bfloat16 F16:float16 F8_E4M3:float8_e4m3fn "
            "F8_E5M2:float8_e5m2 I64:int64 I32:int32 I16:int16 I8:int8 U8:uint8 BOOL:bool"
        ).split()
    )
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it is, read from a safetensors header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    #: absolute byte offset of the tensor's data in ``file``
    start: int = 0

    @property
    def itemsize(self) -> int:
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"{self.file.name}: unsupported safetensors dtype {self.dtype}")
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.itemsize


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), read
    without mapping the file."""
    return _header(path)[0]


def _header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The header and the byte offset at which the tensor data begins; a file that is not
    safetensors, or is truncated, raises :class:`ModelLoadError` naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ModelLoadError(
            f"{path} is not a valid safetensors file (unreadable header); re-download or "
            "re-save the model"
        )
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{path} is truncated ({size} bytes, its header needs {8 + n + end}); re-download "
            "or re-save the model"
        )
    return header, 8 + n


def checkpoint_tensors(directory: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the ``*.safetensors`` files of ``directory``, file by file."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weight files")
    out: dict[str, TensorInfo] = {}
    for f in files:
        header, data = _header(f)
        for key, entry in header.items():
            if key != "__metadata__":
                start = data + entry["data_offsets"][0]
                out[key] = TensorInfo(f, entry["dtype"], tuple(entry["shape"]), start)
    return out


def main_dtype(tensors: dict[str, TensorInfo]) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes (what ``dtype="auto"`` loads)."""
    sizes: dict[str, int] = {}
    for t in tensors.values():
        if t.dtype.startswith(("F", "BF")):
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    return DTYPES[max(sizes, key=sizes.__getitem__)] if sizes else torch.float32


def max_shard_bytes(tensors: dict[str, TensorInfo]) -> int | None:
    """The input's shard size limit as far as it shows (its largest shard); ``None`` when the
    checkpoint is one file."""
    per_file: dict[Path, int] = {}
    for t in tensors.values():
        per_file[t.file] = per_file.get(t.file, 0) + t.nbytes
    return max(per_file.values()) if len(per_file) > 1 else None


def config_dtype(directory: str | Path) -> torch.dtype | None:
    """The dtype ``config.json`` states (``dtype`` or the older ``torch_dtype``), if any."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    name = raw.get("dtype") or raw.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def checkpoint_dtype(directory: str | Path) -> torch.dtype:
    """The checkpoint's own dtype: the one most of its safetensors bytes are stored in, else
    the config's ``dtype``, else float32."""
    files = list(Path(directory).glob("*.safetensors"))
    if files:
        return main_dtype(checkpoint_tensors(directory))
    return config_dtype(directory) or torch.float32


__all__ = [
    "DTYPES",
    "TensorInfo",
    "checkpoint_dtype",
    "checkpoint_tensors",
    "config_dtype",
    "main_dtype",
    "max_shard_bytes",
    "read_header",
]
