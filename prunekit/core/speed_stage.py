"""The speed comparison of a ``compress`` run: the dense, compressed and quantized models timed
side by side (:func:`~prunekit.core.speed_compare.compare_latency`) once, after the compressed
model is saved.

Each model's figures go to ``metrics[stage]["latency"]`` (median tokens/s, min..max over the
rounds, the per-round values, memory), and each stage's speedup over the dense model with the
analytic FLOP ratio beside it to ``metrics[stage]["latency"]["speedup"]``. The dense model is
needed beside the compressed one only here: when the input was a directory (or a GGUF file, or
a hub id) it is reloaded from it in the compressed model's dtype and device, and freed after;
a dense copy the run already holds (a distillation teacher, an encoder's reference) is used as
it is. When that cannot be done the report says why in one line (``metrics["dense"]
["latency"]["note"]``): latency is off in the recipe, the model is spread by a ``device_map``
(timings would measure transfers), or the dense weights would not fit in the memory left. An
in-memory model is pruned in place, so its dense figures are taken alone before pruning
(:func:`time_dense_alone`) and marked ``side_by_side: false``, with no speedup.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from prunekit.core.flops import flops_per_token
from prunekit.core.quality import model_device
from prunekit.core.speed_compare import LatencySettings, compare_latency

__all__ = ["flop_ratio_of", "measure_speed", "record_speed", "settings_for", "time_dense_alone"]

_MB = 1024 * 1024
#: room kept free beside the dense weights (activations, KV cache, the allocator's slack)
_HEADROOM = 1.25


def settings_for(recipe) -> LatencySettings:
    """The recipe's ``evaluation`` section as :class:`LatencySettings`: ``prompt_len``,
    ``new_tokens``, ``repeats`` (the interleaved rounds), memory measured."""
    ev = recipe.evaluation
    return LatencySettings(
        prompt_len=ev.prompt_len, new_tokens=ev.new_tokens, rounds=ev.repeats, memory=True
    )


def time_dense_alone(run, source: Any) -> None:
    """Before pruning, for an in-memory model only (pruned in place, so there will be no
    dense model to time beside it): the dense figures alone, marked ``side_by_side: false``."""
    if not run.recipe.evaluation.latency or not isinstance(source, nn.Module):
        return
    if run.dense is not None:  # a dense copy is kept anyway: timed side by side later
        return
    run.say("timing the dense model (alone: an in-memory model is pruned in place)")
    with run.timer("latency"):
        got = compare_latency({"dense": run.model}, settings_for(run.recipe))
    if "dense" in got["failed"]:
        raise RuntimeError(f"the dense model did not run: {got['failed']['dense']}")
    run.metrics["dense"]["latency"] = {
        **got["models"]["dense"],
        "side_by_side": False,
        "note": "dense speed measured alone before pruning (an in-memory model is pruned in "
        "place; pass a model directory to time dense and pruned side by side)",
        "settings": got["settings"],
    }


def measure_speed(run, source: tuple, quantized: nn.Module | None) -> None:
    """After the save: time the dense, the compressed and (when it runs here) the quantized
    model side by side, and record figures, speedups and FLOP ratios in ``run.metrics``."""
    final = "recovered" if "recovered" in run.metrics else "pruned"
    dense_info = run.metrics.setdefault("dense", {})
    if not run.recipe.evaluation.latency:
        dense_info["latency"] = {"note": "speed not measured: evaluation.latency is off"}
        return
    spread = _device_map_spread(run.model)
    if spread:
        dense_info["latency"] = {"note": f"speed not measured: {spread}"}
        return
    models: dict[str, nn.Module] = {}
    reloaded = False
    if run.dense is not None:
        models["dense"] = run.dense
    elif not isinstance(source[0], nn.Module):
        why = _no_room_for_dense(run)
        if why:
            dense_info["latency"] = {"note": f"dense not timed side by side: {why}"}
        else:
            models["dense"], reloaded = _reload_dense(run, source), True
    models[final] = run.model
    if quantized is not None:
        models["quantized"] = quantized
    run.say(f"timing {', '.join(models)} side by side")
    try:
        with run.timer("latency"):
            got = compare_latency(models, settings_for(run.recipe))
        ratio = flop_ratio_of(models.get("dense"), run.model, run.recipe.evaluation.prompt_len)
    finally:
        if reloaded:
            del models["dense"]
            _free()
    record_speed(run.metrics, got, ratio)


def record_speed(
    metrics: dict[str, dict[str, Any]], got: dict[str, Any], flop_ratio: float | None
) -> None:
    """Put a :func:`compare_latency` result (stages as model names, ``"dense"`` the baseline
    when present) into the run's ``metrics``: ``metrics[stage]["latency"]`` = the stage's
    figures, ``side_by_side``, the settings, and its ``speedup`` over dense (``{"prefill",
    "decode", "vs", "flop_ratio", "flop_seq_len"}``; None for dense or without dense)."""
    side_by_side = "dense" in got["models"]
    for stage, figures in got["models"].items():
        entry = metrics.setdefault(stage, {})
        if stage == "dense" or not side_by_side:
            speedup = None
        else:
            speedup = {
                **got["speedups"][stage],
                "vs": "dense",
                "flop_ratio": flop_ratio,
                "flop_seq_len": got["settings"]["prompt_len"],
            }
        entry["latency"] = {
            **figures,
            "side_by_side": len(got["models"]) > 1,
            "speedup": speedup,
            "settings": got["settings"],
        }
    for stage, why in got["failed"].items():
        entry = metrics.setdefault(stage, {})
        entry["latency"] = {"note": f"{stage} speed not measured on this device: {why}"}


def flop_ratio_of(dense: nn.Module | None, model: nn.Module, seq_len: int) -> float | None:
    """Analytic FLOPs per token, dense / compressed, at the prompt length (quantization
    leaves the count unchanged, so the quantized stage shares it)."""
    if dense is None:
        return None
    try:
        return flops_per_token(dense, seq_len) / flops_per_token(model, seq_len)
    except Exception:  # noqa: BLE001 -- an architecture the FLOP count does not know
        return None


def _device_map_spread(model: nn.Module) -> str | None:
    """Why timing would be meaningless: a model spread by a ``device_map`` over several
    devices or offloaded to CPU/disk (timings would measure the transfers)."""
    placed = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    if len(placed) > 1 or placed & {"disk", "meta"}:
        return f"the model is spread by a device_map over {sorted(placed)} (offload)"
    return None


def _free_mb(device: torch.device) -> float | None:
    """Memory that can still be allocated on ``device`` (CUDA: free device memory; CPU:
    ``MemAvailable``), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / _MB
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _no_room_for_dense(run) -> str | None:
    """Why the dense model cannot be reloaded beside the compressed one, or None: its
    weights (dense parameter count x the compressed model's element size, with 25% headroom)
    against the memory left on the compressed model's device."""
    params = run.metrics.get("dense", {}).get("params")
    if params is None:
        return None
    dtype = next(run.model.parameters()).dtype
    device = model_device(run.model)
    need = params * dtype.itemsize / _MB * _HEADROOM
    free = _free_mb(device)
    if free is not None and need > free:
        return (
            f"its weights ({need / _HEADROOM:.0f} MB in {str(dtype).removeprefix('torch.')}, "
            f"+25% headroom) do not fit in the {free:.0f} MB left on {device}"
        )
    return None


def _reload_dense(run, source: tuple) -> nn.Module:
    """The dense model again from the run's input, in the compressed model's dtype/device."""
    from prunekit.core.io import load_model

    model_or_path, gguf_file, allow_pickle = source[:3]
    run.say(f"reloading the dense model from {model_or_path} to time it side by side")
    with run.timer("load"):
        dense, _ = load_model(
            model_or_path,
            gguf_file=gguf_file,
            allow_pickle=allow_pickle,
            dtype=next(run.model.parameters()).dtype,
            device=model_device(run.model),
        )
    return dense.eval()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
