"""LoRA recovery (and QLoRA, its 4-bit-base variant): adapters on every attention and MLP
projection, found through the architecture adapter, merged into the weights at the end."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from prunekit.core.recovery import RecoveryMethod
from prunekit.core.training import TrainingSession, requires_grad_flags, set_requires_grad_flags
from prunekit.plugins import get_adapter


def layers_near_pruning(model: nn.Module, radius: int) -> list[int]:
    """Current indices of the layers next to what the last applied plan removed: the ``radius``
    kept layers before and after each removed layer, and the layers that lost heads, neurons
    or a sub-block. ``[]`` when no plan was applied (:func:`prunekit.core.surgery.applied_plans`).
    """
    from prunekit.core.surgery import applied_plans

    plans = applied_plans(model)
    if not plans:
        return []
    plan = plans[-1]
    n_now = len(get_adapter(model).layers(model))
    removed = set(plan.layers)
    kept = [i for i in range(n_now + len(removed)) if i not in removed]  # original indices
    touched = set(plan.heads) | set(plan.neurons) | set(plan.attention) | set(plan.mlp)
    for r in removed:
        below = [i for i in kept if i < r][-radius:] if radius else []
        above = [i for i in kept if i > r][:radius]
        touched.update(below + above)
    position = {orig: now for now, orig in enumerate(kept)}
    return sorted(position[i] for i in touched if i in position)


def lora_target_names(model: nn.Module, layers: list[int] | None = None) -> list[str]:
    """Full module names of the projections LoRA adapts, found through the architecture
    adapter (query/key/value, head output, MLP input and output projections of every layer,
    or of the layer indices ``layers``; no name-sniffing). Only ``nn.Linear`` modules are
    returned."""
    adapter = get_adapter(model)
    wanted: dict[int, nn.Module] = {}
    chosen = None if layers is None else set(layers)
    for i, layer in enumerate(adapter.layers(model)):
        if chosen is not None and i not in chosen:
            continue
        mods = [
            *adapter.qkv_projections(layer),
            adapter.head_output_projection(layer),
            *adapter.mlp_input_projections(layer),
            adapter.neuron_output_projection(layer),
        ]
        for m in mods:
            wanted[id(m)] = m
    names = [n for n, m in model.named_modules() if id(m) in wanted and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(
            f"found no nn.Linear projections to adapt in {type(model).__name__} through the "
            f"{adapter.name!r} adapter; use method='full' for this architecture"
        )
    return names


def attach_lora(
    model: nn.Module, r: int, alpha: int, dropout: float = 0.0, layers: list[int] | None = None
) -> nn.Module:
    """Wrap ``model``'s attention and MLP projections (of every layer, or of ``layers``) with
    peft LoRA adapters (in place) and return the ``PeftModel``; only the adapter weights
    require gradients. Undo with :func:`merge_lora`."""
    import peft

    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_names(model, layers),
        bias="none",
    )
    return peft.get_peft_model(model, config)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the LoRA deltas ``W ← W + (α/r)·B·A`` into the base weights and remove every
    adapter module; returns the base model (the same object that was wrapped)."""
    return peft_model.merge_and_unload()


def has_lora_modules(model: nn.Module) -> bool:
    """Whether any peft tuner layer is left in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_layers(model: nn.Module, config: Any) -> list[int] | None:
    """The layers ``config.lora_layers`` asks for: ``None`` (every layer) for ``"all"``;
    for ``"near_removed"`` those of :func:`layers_near_pruning` (every layer when the model
    carries no plan)."""
    if getattr(config, "lora_layers", "all") == "all":
        return None
    return layers_near_pruning(model, config.lora_radius) or None


class LoraRecovery(RecoveryMethod):
    """Low-rank adaptation (Hu et al. 2021, arXiv 2106.09685): ``W x + (α/r)·B A x`` with
    ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` (``B = 0`` at start, so training starts exactly at the
    pruned model) on every attention and MLP projection (``lora_layers="near_removed"``: only
    of the layers next to the pruned ones, cheaper per step); merged into ``W`` at the end, so the
    result has no adapter and keeps its pruned shapes. Gromov et al. 2024 heal pruned layers
    this way."""

    name = "lora"
    description = "LoRA on attention and MLP projections, merged into the weights at the end"

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:
        flags = requires_grad_flags(model)
        layers = lora_layers(model, config)
        wrapped = attach_lora(
            model, config.lora_r, config.lora_alpha, config.lora_dropout, layers=layers
        )
        params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}

        def finish() -> nn.Module:
            merged = merge_lora(wrapped)
            set_requires_grad_flags(merged, flags)
            return merged

        return TrainingSession(model=model, module=wrapped, params=params, _finish=finish)


class QloraRecovery(RecoveryMethod):
    """QLoRA (Dettmers et al. 2023, arXiv 2305.14314): LoRA adapters trained on top of an NF4
    4-bit copy of the frozen projections (bitsandbytes, CUDA). At the end the adapter deltas
    ``(α/r)·B·A`` are added to the *original full-precision* weights (not re-quantized) and
    the original modules are put back, so the result is a plain pruned model like ``lora``'s.
    Gromov et al. 2024 heal pruned models this way."""

    name = "qlora"
    description = "LoRA on a 4-bit NF4 base (bitsandbytes + CUDA), merged into full precision"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
            return True, ""
        return False, (
            "qlora needs the `bitsandbytes` package (pip install bitsandbytes) and a CUDA GPU "
            "(torch.cuda.is_available() is true); on a CPU use method='lora' instead, which "
            "trains the same adapters on the full-precision base"
        )

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:  # pragma: no cover
        import bitsandbytes as bnb
        import peft

        flags = requires_grad_flags(model)
        home = next(model.parameters()).device
        cuda = torch.device("cuda")
        names = lora_target_names(model)
        originals: dict[str, nn.Linear] = {}
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lin: nn.Linear = getattr(parent, attr)
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.detach().to("cpu").clone(), requires_grad=False, quant_type="nf4"
            )
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            originals[name] = lin
            setattr(parent, attr, q)
        model.to(cuda)  # quantizes the Params4bit on the way
        had_flag = "is_loaded_in_4bit" in model.__dict__
        model.is_loaded_in_4bit = True  # makes peft dispatch its bnb 4-bit LoRA layer
        lora_config = peft.LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=names,
            bias="none",
        )
        wrapped = peft.get_peft_model(model, lora_config)
        params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}

        def finish() -> nn.Module:
            with torch.no_grad():
                for name, lin in originals.items():
                    parent_name, _, attr = name.rpartition(".")
                    parent = model.get_submodule(parent_name)
                    lora_layer = getattr(parent, attr)
                    delta = lora_layer.get_delta_weight("default")
                    lin.weight.add_(delta.to(device=lin.weight.device, dtype=lin.weight.dtype))
                    setattr(parent, attr, lin)
            model.to(home)
            if not had_flag:
                del model.is_loaded_in_4bit
            set_requires_grad_flags(model, flags)
            return model

        return TrainingSession(model=model, module=wrapped, params=params, _finish=finish)
