"""A DeciLM / Nemotron-NAS reference forward pass, written from the published config semantics
(``block_configs``: per layer ``attention: {no_op, n_heads_in_group}`` with a global
``num_attention_heads``, ``ffn: {no_op, ffn_mult | intermediate_size}`` with
``ffn_mult -> roundup(int(2 * m * hidden / 3), 256)``; a no-op sub-block has no weights and
no norm; pre-norm RMSNorm, rotary embeddings, SwiGLU). It uses no prunekit and no transformers
model class: only ``config.json`` and the safetensors of an export directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _width(ffn: dict, hidden: int) -> int:
    if "ffn_mult" in ffn:
        width = int(2 * ffn["ffn_mult"] * hidden / 3)
        return width if width % 256 == 0 else width + 256 - width % 256
    return ffn["intermediate_size"]


class DeciLMReference:
    """Load ``path`` (an export directory) and compute logits for token ids."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.cfg = json.loads((path / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            self.w.update({k: v.double() for k, v in load_file(f).items()})
        c = self.cfg
        self.n_heads = c["num_attention_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.n_heads
        self.eps = c["rms_norm_eps"]
        assert c["architectures"] == ["DeciLMForCausalLM"] and c["model_type"] == "nemotron-nas"
        assert c.get("rope_scaling") is None, "the reference implements default rotary only"

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        return y + self.w[name + ".bias"] if name + ".bias" in self.w else y

    def _attention(self, x: torch.Tensor, p: str, att: dict, cos, sin) -> torch.Tensor:
        b, t, _ = x.shape
        n_kv = self.n_heads // att["n_heads_in_group"]
        q = self._linear(x, p + "q_proj").view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self._linear(x, p + "k_proj").view(b, t, n_kv, self.head_dim).transpose(1, 2)
        v = self._linear(x, p + "v_proj").view(b, t, n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(att["n_heads_in_group"], dim=1)
        v = v.repeat_interleave(att["n_heads_in_group"], dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        out = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return self._linear(out.transpose(1, 2).reshape(b, t, -1), p + "o_proj")

    def _mlp(self, x: torch.Tensor, p: str, ffn: dict) -> torch.Tensor:
        gate = self._linear(x, p + "gate_proj")
        assert gate.shape[-1] == _width(ffn, self.cfg["hidden_size"]), "width != block_configs"
        return self._linear(
            torch.nn.functional.silu(gate) * self._linear(x, p + "up_proj"), p + "down_proj"
        )

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        c, w = self.cfg, self.w
        x = w["model.embed_tokens.weight"][ids]
        pos = torch.arange(ids.shape[1], dtype=torch.float64)
        inv = 1.0 / (
            c["rope_theta"]
            ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        )
        ang = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)
        cos, sin = ang.cos(), ang.sin()
        assert len(c["block_configs"]) == c["num_hidden_layers"]
        for i, block in enumerate(c["block_configs"]):
            p = f"model.layers.{i}."
            if not block["attention"]["no_op"]:
                h = _rms(x, w[p + "input_layernorm.weight"], self.eps)
                x = x + self._attention(h, p + "self_attn.", block["attention"], cos, sin)
            else:
                assert not any(k.startswith(p + "self_attn.") for k in w)
            if not block["ffn"]["no_op"]:
                h = _rms(x, w[p + "post_attention_layernorm.weight"], self.eps)
                x = x + self._mlp(h, p + "mlp.", block["ffn"])
            else:
                assert not any(k.startswith(p + "mlp.") for k in w)
        x = _rms(x, w["model.norm.weight"], self.eps)
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return (x @ head.T).float()
