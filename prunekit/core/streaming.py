"""Apply a :class:`PrunePlan` to a checkpoint directory tensor by tensor, without building the
model: read each tensor (plain file reads, :mod:`prunekit.core.tensorfile`), slice it by the plan,
write it to output shards sharded like the input, with ``model.safetensors.index.json`` when
there are several.

The model is built only as a skeleton on the meta device (no memory): the adapter names the
role of every per-layer tensor (:meth:`~prunekit.adapters.base.Adapter.state_key_roles`),
:func:`prunekit.apply_plan` on the skeleton gives the new tensor names (layers renumbered),
their shapes and the config exactly as the in-memory path writes it, and each real projection
is cut by the adapter's own ``slice_projection`` — so the result equals
``load_model`` + ``apply_plan`` + ``save_pretrained`` bit for bit. Tensors keep their dtype;
tied embeddings stay tied (the tied copy is not stored, as in the input). Each output file's
header is known before any tensor is read, so files are written tensor by tensor: tensors the
plan does not cut (embeddings, norms, kept layers' unsliced weights) are copied file to file by
the kernel, a projection the plan cuts is read only where it is kept (its kept rows, or its
columns from blocks of rows) when the adapter slices it as ``nn.Linear``, and peak memory is
the runtime plus about the kept part of one projection, never a shard or a whole layer.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from math import prod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.checkpoint import (
    DTYPES,
    TensorInfo,
    checkpoint_tensors,
    main_dtype,
    max_shard_bytes,
)
from prunekit.core.io import (
    AtomicDir,
    _strip_config_key,
    build_sidecar,
    check_output_dir,
    global_access,
    meta_skeleton,
    write_sidecar,
)
from prunekit.core.plan import PrunePlan
from prunekit.core.serving import write_remote_code
from prunekit.core.surgery import apply_plan
from prunekit.core.tensorfile import (
    copy_tensor_bytes,
    read_selected,
    read_tensor,
    return_freed_memory_to_os,
    write_tensor,
)
from prunekit.errors import ModelLoadError
from prunekit.plugins import get_adapter

INDEX_FILE = "model.safetensors.index.json"
#: tokenizer files copied unchanged from the input directory
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_HEAD_ROLES = {"q": "out", "kv": "out", "o": "in"}
_NEURON_ROLES = {"mlp_in": "out", "mlp_out": "in"}


# ---- the meta skeleton ---------------------------------------------------------------------
def _state_names(model: nn.Module) -> dict[tuple[int, str], str]:
    """(module id, attribute) -> state-dict key, for every parameter and persistent buffer."""
    out = {}
    for m_name, module in model.named_modules():
        named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for attr, _ in named:
            if attr not in getattr(module, "_non_persistent_buffers_set", ()):
                out[(id(module), attr)] = f"{m_name}.{attr}" if m_name else attr
    return out


# ---- slicing real tensors ---------------------------------------------------------------
class _Slicer:
    """Slices one checkpoint tensor (or the tensors of one projection) as
    :func:`prunekit.apply_plan` would slice the module holding it."""

    def __init__(self, skeleton: nn.Module, plan: PrunePlan):
        self.model = skeleton
        self.adapter = get_adapter(skeleton)
        self.roles = self.adapter.state_key_roles(skeleton)
        self.shapes = self.adapter.shapes(skeleton)
        self.head_keeps = plan.validate(self.shapes)
        self.neurons = plan.neurons
        self.pending: dict[str, torch.Tensor] = {}
        self.out_shapes: dict[str, tuple[int, ...]] = {}  # new key -> shape after the plan

    def keep(self, layer_idx: int, role: str) -> tuple[Any, str] | None:
        """``(keep indices, dim)`` of a projection role in a layer, or ``None`` (untouched)."""
        layer = self.adapter.layers(self.model)[layer_idx]
        if role in _HEAD_ROLES and layer_idx in self.head_keeps:
            keep_q, keep_kv = self.head_keeps[layer_idx]
            heads = keep_kv if role == "kv" else keep_q
            return self.adapter.head_features(layer, heads), _HEAD_ROLES[role]
        if role in _NEURON_ROLES and self.neurons.get(layer_idx):
            gone = set(self.neurons[layer_idx])
            n = self.shapes[layer_idx].intermediate
            return [i for i in range(n) if i not in gone], _NEURON_ROLES[role]
        return None

    def cut(self, key: str) -> tuple[Any, str] | None:
        """How the tensor ``key`` is cut, or ``None`` when it is copied unchanged."""
        layer_idx, role = self.roles.get(key, (None, "layer"))
        return self.keep(layer_idx, role) if layer_idx is not None else None

    def tensor(self, key: str, tensors: dict[str, TensorInfo]) -> torch.Tensor:
        if key in self.pending:
            return self.pending.pop(key)
        cut = self.cut(key)
        if cut is None:
            return read_tensor(tensors[key])
        m_name = key.rpartition(".")[0]
        module = self.model.get_submodule(m_name)
        names = [name for name, _ in module.named_parameters(recurse=False)]
        if self._linear_layout(module, names):
            self._read_cut(m_name, names, cut, tensors)
            return self.pending.pop(key)
        for name in names:
            param = read_tensor(tensors[f"{m_name}.{name}"])
            setattr(module, name, nn.Parameter(param, False))
            del param
        self.adapter.slice_projection(module, *cut)
        for name in names:
            self.pending[f"{m_name}.{name}"] = getattr(module, name).detach()
            setattr(module, name, nn.Parameter(torch.empty(0, device="meta"), False))
        return self.pending.pop(key)

    def _linear_layout(self, module: nn.Module, names: list[str]) -> bool:
        """Whether the adapter slices this projection as ``nn.Linear`` (weight ``[out, in]``,
        bias on the output side), so that only the kept rows/columns need to be read: no
        adapter class overrides the base ``slice_projection`` (which is ``slice_linear``)."""
        owners = [c for c in type(self.adapter).__mro__ if "slice_projection" in vars(c)]
        return len(owners) == 1 and set(names) <= {"weight", "bias"} and module.weight.dim() == 2

    def _read_cut(self, m_name: str, names: list[str], cut: tuple[Any, str], tensors) -> None:
        """Read the kept part of an ``nn.Linear``-layout projection into ``pending``: what
        ``slice_projection`` on the whole tensors gives, without reading them whole."""
        keep, dim = cut
        keep = torch.as_tensor(keep, dtype=torch.long)
        for name in names:
            info = tensors[f"{m_name}.{name}"]
            if name == "weight":
                t = read_selected(info, keep, 0 if dim == "out" else 1)
            else:
                t = read_tensor(info)
                t = t.index_select(0, keep) if dim == "out" else t
            self.pending[f"{m_name}.{name}"] = t


# ---- writing ---------------------------------------------------------------------------
def plan_shards(sizes: dict[str, int], limit: int | None) -> list[list[str]]:
    """Split keys (in order) into shards of at most ``limit`` bytes (a larger tensor gets a
    shard of its own), as ``save_pretrained(max_shard_size=...)`` does."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes.items():
        if limit is not None and shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_config(model: nn.Module, source: Path, out: Path, dtype: torch.dtype) -> None:
    """config.json (and generation_config.json) as ``model.save_pretrained`` writes them."""
    config = get_adapter(model).saved_config(model.config)  # e.g. a Llama head count as Mistral
    config.dtype = str(dtype).split(".")[1]
    if config is model.config:
        config.architectures = [type(model).__name__]
    with global_access(config):
        config.save_pretrained(out)
    _strip_config_key(out / "config.json", "allow_global_per_layer_attribute_access")
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", out / "generation_config.json")
    elif model.can_generate():
        model.generation_config.save_pretrained(out)


def _rename_map(pruned: nn.Module, before: dict[tuple[int, str], str]) -> dict[str, str]:
    """Old state-dict key -> new key, for the tensors ``pruned`` still has."""
    after = _state_names(pruned)
    return {before[k]: after[k] for k in before if k in after}


def _itemsize(info: TensorInfo, cast: torch.dtype | None) -> int:
    floating = info.dtype.startswith(("F", "BF"))
    return cast.itemsize if cast is not None and floating else info.itemsize


def _dtype_name(info: TensorInfo, cast: torch.dtype | None) -> str:
    if cast is None or not info.dtype.startswith(("F", "BF")):
        return info.dtype
    return next(name for name, dtype in DTYPES.items() if dtype == cast)


def _write_shard(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], fill) -> None:
    """Write a safetensors file whose header (``entries``: name, dtype, shape) is known up
    front, then each tensor's bytes in order (``fill(file, name)``): one tensor at a time in
    memory, never the whole shard."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        n = prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes
    with open(path, "wb", buffering=0) as f:  # unbuffered: tensors go straight to the file
        f.write(struct.pack("<Q", len(text)) + text)
        for name, _, _ in entries:
            fill(f, name)
        if f.tell() != 8 + len(text) + offset:
            raise RuntimeError(f"{path.name}: wrote {f.tell()} bytes, expected more")


def _write_shards(out: Path, shards: list[list[str]], new_to_old, slicer, tensors, cast) -> dict:
    names = _shard_names(len(shards))
    weight_map: dict[str, str] = {}
    total_size = total_params = 0

    def fill(f, new_key: str) -> None:
        old = new_to_old[new_key]
        if cast is None and old not in slicer.pending and slicer.cut(old) is None:
            copy_tensor_bytes(f, tensors[old])
            return
        t = slicer.tensor(old, tensors)
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        write_tensor(f, t)

    for name, keys in zip(names, shards, strict=True):
        entries = []
        for k in keys:
            info = tensors[new_to_old[k]]
            shape = tuple(slicer.out_shapes[k])
            entries.append((k, _dtype_name(info, cast), shape))
            weight_map[k] = name
            total_size += prod(shape) * DTYPES[entries[-1][1]].itemsize
            total_params += prod(shape)
        _write_shard(out / name, entries, fill)
    return {
        "metadata": {"total_parameters": total_params, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }


def stream_apply(
    model_dir: str | Path,
    plan: PrunePlan,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: int | None = None,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Apply ``plan`` to the checkpoint in ``model_dir`` and write the pruned model to
    ``out_dir`` tensor by tensor, never building the model. Output shards are at most
    ``max_shard_size`` bytes (default: the input's largest shard; one file when the input is
    one file). Tensors keep their dtype unless ``dtype`` casts the floating ones. The config,
    sidecar (``extra`` added) and tokenizer files are written as the in-memory ``apply_plan`` +
    ``save_pretrained`` writes them; the input is never modified (an output inside, above or
    at the input is refused). Fixes glibc's mmap/trim thresholds for the process, so that
    each freed tensor goes back to the OS (``tensorfile.return_freed_memory_to_os``)."""
    source = Path(model_dir)
    check_output_dir(out_dir, overwrite, inputs=(source,))
    return_freed_memory_to_os()
    tensors = checkpoint_tensors(source)
    cast = dtype
    dtype = dtype or main_dtype(tensors)
    skeleton = meta_skeleton(source, dtype)
    slicer = _Slicer(copy.deepcopy(skeleton), plan)  # validates the plan before any write
    before = _state_names(skeleton)
    unknown = sorted(set(tensors) - set(before.values()))
    if unknown:
        raise ModelLoadError(
            f"checkpoint tensors {unknown[:5]} are not in the {type(skeleton).__name__} "
            "built from its config; apply the plan in memory instead (--in-memory)"
        )
    renamed = _rename_map(apply_plan(skeleton, plan), before)
    new_state = skeleton.state_dict()
    slicer.out_shapes = {k: tuple(v.shape) for k, v in new_state.items()}
    new_to_old = {new: old for old, new in renamed.items() if old in tensors}
    order = [k for k in new_state if k in new_to_old]
    sizes = {k: new_state[k].numel() * _itemsize(tensors[new_to_old[k]], cast) for k in order}
    limit = max_shard_size if max_shard_size is not None else max_shard_bytes(tensors)
    shards = plan_shards(sizes, limit)
    with AtomicDir(out_dir, overwrite, inputs=(source,)) as tmp:
        index = _write_shards(tmp, shards, new_to_old, slicer, tensors, cast)
        if len(shards) > 1:
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (tmp / INDEX_FILE).write_text(text, encoding="utf-8")
        _write_config(skeleton, source, tmp, dtype)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        write_sidecar(tmp, build_sidecar(skeleton, extra=extra))
        write_remote_code(tmp)  # per-layer: loadable with trust_remote_code=True
    return Path(out_dir)


__all__ = ["INDEX_FILE", "TOKENIZER_FILES", "plan_shards", "stream_apply"]
