"""The probe saved with every result: a few tokens and the model's outputs on them, so that
anyone can check that a reload gives the same numbers."""

from __future__ import annotations

from pathlib import Path

import torch

PROBE_TOKENS = 16


def probe_outputs(model, tokenizer, eval_text: Path | str | None) -> dict[str, torch.Tensor]:
    """A few tokens of the evaluation text (the default calibration text when evaluation is
    off) and the model's logits on them, saved with the result so that anyone can check a
    reload gives the same numbers."""
    from prunekit.core.data import brown_path
    from prunekit.core.quality import read_text

    text, _ = read_text(brown_path() if eval_text is None else eval_text, 2000)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :PROBE_TOKENS]
    with torch.no_grad():
        out = model(input_ids=ids)
    values = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return {"input_ids": ids.contiguous(), "output": values.float().contiguous()}


def save_probe(out_dir: Path, probe: dict[str, torch.Tensor]) -> None:
    # In a sub-folder: servers glob *.safetensors at the top level as weights.
    from safetensors.torch import save_file

    (out_dir / "probe").mkdir(exist_ok=True)
    save_file(probe, str(out_dir / "probe" / "probe.safetensors"))


__all__ = ["PROBE_TOKENS", "probe_outputs", "save_probe"]
