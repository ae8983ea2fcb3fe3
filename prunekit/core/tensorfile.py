"""Checkpoint tensors read and written with plain file I/O, for the paths that must not hold a
model in memory (streaming apply, sequential scoring from disk).

``safetensors.safe_open`` maps the whole file; every page a tensor read touches then counts
in the process's resident set until the file is closed, and the tensor is copied out of the
mapping once more. Here a tensor's bytes are read straight into a tensor allocated for them
(:func:`read_tensor`), written from the tensor's own memory (:func:`write_tensor`), and bytes
that need no change are copied file to file by the kernel (:func:`copy_tensor_bytes`): the
page cache holds them, never the process. :func:`return_freed_memory_to_os` stops glibc from
keeping each freed tensor's memory, which otherwise ratchets the resident set up tensor after
tensor.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import torch

from prunekit.core.checkpoint import DTYPES, TensorInfo

_CHUNK = 1 << 20


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The tensor ``info`` describes, read from its file into memory of its own (no mapping)."""
    tensor = torch.empty(info.shape, dtype=DTYPES[info.dtype])
    if info.nbytes == 0:
        return tensor
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start)
        _read_into(f, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), info)
    return tensor


def read_selected(info: TensorInfo, keep: torch.Tensor, axis: int) -> torch.Tensor:
    """``read_tensor(info).index_select(axis, keep)`` for a 2-D tensor, without the whole
    tensor in memory: rows are read straight into the result (runs of consecutive rows in one
    read), columns are selected from blocks of rows of about 1 MiB."""
    rows, cols = info.shape
    keep = torch.as_tensor(keep, dtype=torch.long)
    out_shape = (len(keep), cols) if axis == 0 else (rows, len(keep))
    out = torch.empty(out_shape, dtype=DTYPES[info.dtype])
    row_bytes = cols * info.itemsize
    with open(info.file, "rb", buffering=0) as f:
        if axis == 0:
            flat = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            for pos, first, n in _runs(keep.tolist()):
                f.seek(info.start + first * row_bytes)
                _read_into(f, flat[pos * row_bytes : (pos + n) * row_bytes], info)
            return out
        block = max(1, _CHUNK // max(row_bytes, 1))
        f.seek(info.start)
        for r in range(0, rows, block):
            part = torch.empty((min(block, rows - r), cols), dtype=out.dtype)
            _read_into(f, memoryview(part.reshape(-1).view(torch.uint8).numpy()), info)
            out[r : r + len(part)] = part.index_select(1, keep)
    return out


def _runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """``(position in indices, first index, length)`` of each run of consecutive indices."""
    runs: list[tuple[int, int, int]] = []
    for pos, i in enumerate(indices):
        if runs and runs[-1][1] + runs[-1][2] == i:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, i, 1))
    return runs


def _read_into(f: BinaryIO, buffer: memoryview, info: TensorInfo) -> None:
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise OSError(f"{info.file}: unexpected end of file reading a tensor")
        done += n


def write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    """Append ``tensor``'s bytes (made contiguous) to the unbuffered file ``f``, without a
    ``bytes`` copy of it."""
    tensor = tensor.detach().contiguous()
    if tensor.numel():
        _write_all(f, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def _write_all(f: BinaryIO, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += f.write(data[done:])


def copy_tensor_bytes(f: BinaryIO, info: TensorInfo) -> None:
    """Append the bytes of ``info``'s tensor to the unbuffered file ``f`` unchanged:
    ``os.copy_file_range`` (kernel to kernel) where the system has it, else 1 MiB at a time."""
    with open(info.file, "rb", buffering=0) as src:
        src.seek(info.start)
        left = info.nbytes
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    n = os.copy_file_range(src.fileno(), f.fileno(), left)
                    if not n:
                        break
                    left -= n
            except OSError:  # e.g. a filesystem that refuses it: fall back to reads
                src.seek(info.start + info.nbytes - left)
                f.seek(0, os.SEEK_END)
        while left:
            data = src.read(min(_CHUNK, left))
            if not data:
                raise OSError(f"{info.file}: unexpected end of file copying a tensor")
            _write_all(f, memoryview(data))
            left -= len(data)


def return_freed_memory_to_os() -> None:
    """Make glibc give freed tensors' memory back to the OS.

    glibc serves blocks below its mmap threshold (which grows with every large free, up to
    32 MiB) from the heap and keeps freed heap memory, so reading and dropping tensors or layers
    one after another ratchets the resident set up: on a 1.1B model the peak RSS of sequential
    scoring was 0.69x the fp32 weights with the default and 0.27x with a fixed 1 MiB mmap/trim
    threshold (``benchmarks/scoring.py``), and streaming apply's peak on the 1.1B bf16 model of
    ``benchmarks/memory.py`` fell from 812 to 533 MB. Process-wide, as malloc settings are; a
    no-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, no longer adaptive
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


__all__ = [
    "copy_tensor_bytes",
    "read_selected",
    "read_tensor",
    "return_freed_memory_to_os",
    "write_tensor",
]
