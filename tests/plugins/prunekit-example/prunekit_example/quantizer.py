"""``example_rtn``: round-to-nearest fake quantization of the decoder Linears (symmetric, one
scale per output channel), through the engine's directory flow
(:func:`prunekit.core.quantize.staged_quantize`). It writes what it was given to
``example_quant.json``, which the engine copies into the output directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.contracts import PluginBase
from prunekit.core.quantize import staged_quantize

RECORD = "example_quant.json"


@dataclass
class RoundToNearestConfig:
    """Options of ``example_rtn``."""

    bits: int = field(default=8, metadata={"help": "weight bits, 2..8"})
    note: str = field(default="", metadata={"help": "free text written to example_quant.json"})

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8], got {self.bits!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "note": self.note}


def round_to_nearest(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` on a symmetric ``bits``-bit grid, one scale per output channel (row)."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return (weight / scale).round().clamp(-qmax - 1, qmax) * scale


class RoundToNearest(PluginBase):
    name = "example_rtn"
    config_class = RoundToNearestConfig

    def quantize(self, model: nn.Module, tokenizer: Any, calib_ids, config) -> nn.Module:
        def run(src: Path, out: Path) -> None:
            from transformers import AutoModelForCausalLM

            staged = AutoModelForCausalLM.from_pretrained(src)
            decoder = staged.get_decoder()
            n = 0
            with torch.no_grad():
                for module in decoder.modules():
                    if isinstance(module, nn.Linear):
                        module.weight.copy_(round_to_nearest(module.weight, config.bits))
                        n += 1
            staged.save_pretrained(out)
            tokenizer.save_pretrained(out)
            record = {**config.to_dict(), "linears": n, "calib_rows": _rows(calib_ids)}
            (out / RECORD).write_text(json.dumps(record), encoding="utf-8")

        return staged_quantize(model, tokenizer, "example-rtn", run)


def _rows(calib_ids) -> int | None:
    return None if calib_ids is None else int(calib_ids.shape[0])
