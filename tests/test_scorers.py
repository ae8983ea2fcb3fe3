"""Each scorer against a plain reference (hidden states from ``output_hidden_states=True``,
direct formulas, autograd) and on constructed cases."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHS, DECODERS, VOCAB, save_tiny, tiny_model

import prunekit
from prunekit import Scores, score
from prunekit.core.plan import PrunePlan

FORWARD = (
    "block_influence angular_distance magnitude output_norm "
    "activation_frequency wanda neuron_magnitude"
).split()


@pytest.fixture
def samples() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 11), generator=torch.Generator().manual_seed(3))


def hidden_states(model, samples):
    base = model.base_model
    with torch.no_grad():
        out = base(input_ids=samples, output_hidden_states=True)
    hs = list(out.hidden_states)
    adapter = prunekit.get_adapter(model)
    if adapter.causal:
        # transformers applies the final norm to the last entry; the last layer's raw output
        # is what the scorers see: recompute it by running the last layer on hs[-2]
        hs[-1] = _last_layer_output(model, samples)
    return hs


def _last_layer_output(model, samples):
    layers = prunekit.get_adapter(model).layers(model)
    box = {}
    h = layers[-1].register_forward_hook(lambda m, a, o: box.setdefault("o", o))
    with torch.no_grad():
        model.base_model(input_ids=samples)
    h.remove()
    o = box["o"]
    return o[0] if isinstance(o, tuple) else o


def cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_block_influence_and_angular_match_hidden_state_reference(arch, samples):
    model = tiny_model(arch)
    s = score(
        model,
        samples,
        ["block_influence", "angular_distance"],
        batch_size=4,
        progress=False,
        configs={"angular_distance": {"token": "last"}},
    )
    hs = hidden_states(model, samples)
    L = len(hs) - 1
    bi_ref = torch.stack([1 - cos(hs[i], hs[i + 1]).mean() for i in range(L)])
    torch.testing.assert_close(s["block_influence"], bi_ref, atol=1e-5, rtol=1e-4)
    ad = s["angular_distance"]
    assert ad.shape == (L, L)
    for n in range(1, L + 1):
        for start in range(L):
            if start + n > L:
                assert math.isnan(ad[n - 1, start])
                continue
            c = cos(hs[start][:, -1], hs[start + n][:, -1]).clamp(-1, 1)
            ref = (torch.arccos(c) / math.pi).mean()
            torch.testing.assert_close(ad[n - 1, start], ref, atol=1e-5, rtol=1e-4)


def test_angular_all_tokens_reference(samples):
    model = tiny_model("qwen2")
    s = score(
        model,
        samples,
        ["angular_distance"],
        batch_size=4,
        progress=False,
        configs={"angular_distance": {"token": "all"}},
    )
    hs = hidden_states(model, samples)
    L = len(hs) - 1
    for n in (1, 2, L):
        for start in range(L - n + 1):
            c = cos(hs[start], hs[start + n]).clamp(-1, 1)
            ref = (torch.arccos(c) / math.pi).mean()
            torch.testing.assert_close(
                s["angular_distance"][n - 1, start], ref, atol=1e-5, rtol=1e-4
            )


def test_identity_layer_has_bi_zero_and_is_chosen_first(samples):
    model = tiny_model("llama")
    layer = prunekit.get_adapter(model).layers(model)[2]
    with torch.no_grad():  # zero both residual branches: the layer is an exact identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    s = score(model, samples, ["block_influence", "angular_distance"], progress=False)
    assert s["block_influence"][2].abs() < 1e-6
    assert s["angular_distance"][0, 2].abs() < 2e-3  # arccos is steep near 1
    for scorer in ("block_influence", "angular_distance"):
        plan = prunekit.select(s, prunekit.Targets(layers=1, layer_scorer=scorer))
        assert plan.layers == [2]


def _proj_inputs(model, samples, projection):
    """Per layer: inputs of ``projection(adapter)(layer)`` for all tokens (reference capture by
    plain hooks)."""
    adapter = prunekit.get_adapter(model)
    got = {}
    hs = []
    for i, layer in enumerate(adapter.layers(model)):

        def hook(m, a, _i=i):
            got.setdefault(_i, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))

        hs.append(projection(adapter)(layer).register_forward_pre_hook(hook))
    with torch.no_grad():
        model.base_model(input_ids=samples)
    for h in hs:
        h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def _head_out(model, samples):
    """Per layer: inputs of o_proj for all tokens."""
    return _proj_inputs(model, samples, lambda adapter: adapter.head_output_projection)


def _neuron_in(model, samples):
    return _proj_inputs(model, samples, lambda adapter: adapter.neuron_output_projection)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_head_scorers_match_reference(arch, samples):
    model = tiny_model(arch)
    s = score(model, samples, ["magnitude", "output_norm"], batch_size=4, progress=False)
    adapter = prunekit.get_adapter(model)
    z = _head_out(model, samples)
    for i, layer in enumerate(adapter.layers(model)):
        sh = adapter.layer_shape(layer)
        d = sh.head_dim
        wq = adapter.qkv_projections(layer)[0].weight
        wo = adapter.head_output_projection(layer).weight
        for h in range(sh.n_heads):
            rows = slice(h * d, (h + 1) * d)
            mag = torch.sqrt(wq[rows].pow(2).sum() + wo[:, rows].pow(2).sum())
            torch.testing.assert_close(s["magnitude"][i, h], mag, atol=1e-5, rtol=1e-5)
            contrib = z[i][:, rows] @ wo[:, rows].T  # [T, hidden]: head h's residual write
            ref = contrib.norm(dim=-1).mean()
            torch.testing.assert_close(s["output_norm"][i, h], ref, atol=1e-5, rtol=1e-4)


def test_zeroed_head_scores_zero(samples):
    model = tiny_model("mistral")
    adapter = prunekit.get_adapter(model)
    layer = adapter.layers(model)[1]
    with torch.no_grad():
        layer.self_attn.q_proj.weight[8:16].zero_()  # head 1 (head_dim 8)
        layer.self_attn.o_proj.weight[:, 8:16].zero_()
    s = score(model, samples, ["magnitude", "output_norm", "taylor"], progress=False)
    for name in ("magnitude", "output_norm", "taylor"):
        assert s[name][1, 1] == 0, name
        assert (s[name][1, [0, 2, 3]] > 0).all(), name
    groups = s.head_groups("magnitude")
    assert groups.shape == (5, 2)
    torch.testing.assert_close(groups, s["magnitude"].reshape(5, 2, 4).sum(-1))


@pytest.mark.parametrize("granularity", ["element", "vector"])
def test_taylor_matches_autograd_reference(granularity, samples):
    model = tiny_model("qwen3")
    s = score(
        model,
        samples,
        ["taylor", "neuron_taylor"],
        batch_size=3,
        progress=False,
        configs={
            "taylor": {"granularity": granularity},
            "neuron_taylor": {"granularity": granularity},
        },
    )
    adapter = prunekit.get_adapter(model)
    layers = adapter.layers(model)
    heads_ref = torch.zeros(5, 8)
    neur_ref = torch.zeros(5, 96)
    for b in (slice(0, 3), slice(3, 6)):
        model.zero_grad()
        ids = samples[b]
        model(input_ids=ids, labels=ids).loss.backward()
        for i, layer in enumerate(layers):
            q, o = layer.self_attn.q_proj.weight, layer.self_attn.o_proj.weight
            pq = (q * q.grad).reshape(8, 8, -1)
            po = (o * o.grad).reshape(o.shape[0], 8, 8).permute(1, 2, 0)
            up = [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]
            dn = layer.mlp.down_proj.weight
            if granularity == "element":
                heads_ref[i] += pq.abs().sum((1, 2)) + po.abs().sum((1, 2))
                neur_ref[i] += sum((w * w.grad).abs().sum(1) for w in up)
                neur_ref[i] += (dn * dn.grad).abs().sum(0)
            else:
                heads_ref[i] += (pq.sum((1, 2)) + po.sum((1, 2))).abs()
                v = sum((w * w.grad).sum(1) for w in up) + (dn * dn.grad).sum(0)
                neur_ref[i] += v.abs()
    model.zero_grad()
    torch.testing.assert_close(s["taylor"], heads_ref / 2, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(s["neuron_taylor"], neur_ref / 2, atol=1e-6, rtol=1e-4)
    # the model is left as it was: no gradients, requires_grad restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_neuron_scorers_match_reference(arch, samples):
    model = tiny_model(arch)
    cfg = {"activation_frequency": {"threshold": 0.5, "relative": True}}
    s = score(
        model,
        samples,
        ["activation_frequency", "wanda", "neuron_magnitude"],
        batch_size=4,
        progress=False,
        configs=cfg,
    )
    adapter = prunekit.get_adapter(model)
    a = _neuron_in(model, samples)
    for i, layer in enumerate(adapter.layers(model)):
        x = a[i]
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        freq = (x.abs() > 0.5 * rms).float().mean(0)
        torch.testing.assert_close(s["activation_frequency"][i], freq, atol=1e-6, rtol=0)
        wd = adapter.neuron_output_projection(layer).weight
        wanda = wd.abs().sum(0) * x.pow(2).mean(0).sqrt()
        torch.testing.assert_close(s["wanda"][i], wanda, atol=1e-5, rtol=1e-4)
        ins = [p.weight for p in adapter.mlp_input_projections(layer)]
        mag = torch.sqrt(sum(w.pow(2).sum(1) for w in ins) + wd.pow(2).sum(0))
        torch.testing.assert_close(s["neuron_magnitude"][i], mag, atol=1e-5, rtol=1e-5)


def test_dead_neuron_has_frequency_zero(samples):
    model = tiny_model("llama")
    mlp = prunekit.get_adapter(model).layers(model)[3].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5].zero_()  # act(gate) * 0 = 0 at every token
    s = score(
        model,
        samples,
        ["activation_frequency", "wanda"],
        progress=False,
        configs={"activation_frequency": {"threshold": 0.0, "relative": False}},
    )
    assert s["activation_frequency"][3, 5] == 0
    assert s["wanda"][3, 5] == 0
    assert (s["activation_frequency"][3, :5] == 1).all()  # SwiGLU is never exactly 0 otherwise
    plan = prunekit.select(s, prunekit.Targets(neurons=1, mode="per_layer", round_to=1))
    assert plan.neurons == {3: [5]}


def test_perplexity_drop_reference(samples):
    model = tiny_model("llama")
    s = score(model, samples, ["perplexity_drop"], batch_size=4, progress=False)

    def loss():
        with torch.no_grad():
            return float(model(input_ids=samples, labels=samples).loss)

    base = loss()
    for i in (0, 3):
        with prunekit.masked(model, PrunePlan(layers=[i])):
            ref = loss() - base
        assert abs(float(s["perplexity_drop"][i]) - ref) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_from_disk_equals_normal(arch, samples, tmp_path):
    model = tiny_model(arch)
    names = FORWARD
    normal = score(model, samples, names, batch_size=4, progress=False)
    prunekit.save_pretrained(model, tmp_path / "m", None)
    seq = score(tmp_path / "m", samples, names, batch_size=4, sequential=True, progress=False)
    seq_mem = score(model, samples, names, batch_size=5, sequential=True, progress=False)
    for name in names:
        for other in (seq, seq_mem):
            torch.testing.assert_close(
                other[name],
                normal[name],
                atol=2e-5,
                rtol=1e-4,
                equal_nan=True,
                msg=f"{arch} {name}",
            )


def test_sequential_on_per_layer_pruned_model(samples, tmp_path):
    model = tiny_model("llama")
    prunekit.apply_plan(model, PrunePlan(heads={1: [0, 1, 2, 3]}, neurons={2: list(range(10))}))
    normal = score(model, samples, ["output_norm", "wanda"], progress=False)
    assert isinstance(normal["wanda"], list) and normal["wanda"][2].shape == (86,)
    prunekit.save_pretrained(model, tmp_path / "m", None)
    seq = score(
        str(tmp_path / "m"), samples, ["output_norm", "wanda"], sequential=True, progress=False
    )
    for name in ("output_norm", "wanda"):
        for a, b in zip(seq[name], normal[name], strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    groups = normal.head_groups("output_norm")
    assert isinstance(groups, list) and groups[1].shape == (1,)


def test_sequential_refuses_whole_model_scorers(samples, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="sequential"):
        score(model, samples, ["taylor"], sequential=True, progress=False)
    with pytest.raises(ValueError, match="token='last'"):
        score(
            model,
            samples,
            ["angular_distance"],
            sequential=True,
            progress=False,
            configs={"angular_distance": {"token": "all"}},
        )
    # a path is loaded (issue 14: score() takes a model directory like load_model does): a
    # folder that holds no model says so; a saved model scores as the same model in memory
    from prunekit.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="config.json"):
        score(tmp_path, samples, ["wanda"], progress=False)
    save_tiny("llama", tmp_path / "m")
    by_path = score(tmp_path / "m", samples, ["wanda"], progress=False)
    in_memory = score(tiny_model("llama"), samples, ["wanda"], progress=False)
    torch.testing.assert_close(by_path["wanda"], in_memory["wanda"], rtol=1e-5, atol=1e-6)


def test_errors_name_the_fix(samples):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="encoder"):
        score(model, samples, ["taylor"], progress=False)
    with pytest.raises(KeyError, match="valid scorers"):
        score(model, samples, ["nope"], progress=False)
    with pytest.raises(ValueError, match="token"):
        score(model, samples, ["angular_distance"], configs={"angular_distance": {"token": "x"}})
    with pytest.raises(ValueError, match="token ids"):
        score(model, samples.float(), ["wanda"])
    with pytest.raises(ValueError, match="not requested"):
        score(model, samples, ["wanda"], configs={"taylor": {}})


@pytest.mark.parametrize("arch", DECODERS)
def test_scores_json_roundtrip(arch, samples, tmp_path):
    model = tiny_model(arch)
    s = score(
        model,
        samples,
        ["block_influence", "angular_distance", "magnitude", "wanda"],
        progress=False,
    )
    s.to_json(tmp_path / "s.json")
    back = Scores.from_json(tmp_path / "s.json")
    assert back.names() == s.names() and back.shapes == s.shapes
    for n in s:
        assert back.unit(n) == s.unit(n)
        torch.testing.assert_close(back[n], s[n], equal_nan=True)
    assert back.meta["n_samples"] == 6


def _register_scorer(monkeypatch, scorer):
    """Make ``scorer`` a registered plugin for the rest of the test."""
    import prunekit.plugins as plugins_mod
    from prunekit.hookspecs import hookimpl
    from prunekit.plugins import Plugins

    class Plugin:
        @hookimpl
        def register_scorers(self, register):
            register(scorer)

    pm = Plugins(load_entrypoints=False, extra=(Plugin(),))
    monkeypatch.setattr(plugins_mod, "get_plugins", lambda: pm)


def test_third_party_scorer_usable_by_name(samples, monkeypatch):
    from dataclasses import dataclass

    import prunekit.plugins as plugins_mod
    from prunekit.core.capture import Accumulator
    from prunekit.scorers.base import Scorer

    @dataclass
    class Cfg:
        scale: float = 1.0

    class Acc(Accumulator):
        taps = frozenset({"layer_io"})

        def __init__(self, n, scale):
            self.v = torch.zeros(n)
            self.scale = scale

        def on_layer_io(self, i, x_in, x_out, rows):
            self.v[i] += self.scale * (x_out - x_in).norm()

        def result(self):
            return self.v

    class DeltaNorm(Scorer):
        name = "delta_norm"
        unit = "layers"
        config_class = Cfg

        def accumulator(self, ctx, config):
            return Acc(ctx.n_layers, config.scale)

    _register_scorer(monkeypatch, DeltaNorm())
    assert "delta_norm" in plugins_mod.get_plugins().scorers
    model = tiny_model("llama")
    s = score(
        model,
        samples,
        ["delta_norm", "block_influence"],
        progress=False,
        configs={"delta_norm": {"scale": 2.0}},
    )
    assert s["delta_norm"].shape == (5,) and (s["delta_norm"] > 0).all()
    plan = prunekit.select(s, prunekit.Targets(layers=1, layer_scorer="delta_norm"))
    assert plan.layers == [1 + int(s["delta_norm"][1:4].argmin())]


def test_scorers_follow_the_plugin_contract():
    from prunekit.contracts import Plugin
    from prunekit.core.scores import get_scorer, is_block
    from prunekit.plugins import get_plugins

    reg = get_plugins().scorers
    for name in reg.names():
        s = get_scorer(name)
        assert isinstance(s, Plugin) and s.available() == (True, "")
        assert s.unit in ("layers", "heads", "neurons", "attention", "mlps")
    blocks = [n for n in reg.names() if is_block(reg.get(n))]
    assert blocks == ["angular_distance", "heal_loss", "heal_residual"]
    # a head scorer named for neurons is the counterpart it declares, not a name rule
    assert get_scorer("taylor", "neurons").name == "neuron_taylor"
    assert get_scorer("magnitude", "neurons").name == "neuron_magnitude"
    assert get_scorer(reg.get("wanda")) is reg.get("wanda")  # objects pass through
    with pytest.raises(ValueError, match="scores heads, not layers"):
        get_scorer("taylor", "layers")


def test_scorer_options_plain_and_dotted():
    from prunekit.core.scores import get_scorer, scorer_options

    objs = [get_scorer(n) for n in ("block_influence", "angular_distance", "taylor")]
    assert scorer_options(["token=all"], objs) == {"angular_distance": {"token": "all"}}
    assert scorer_options(["taylor.granularity=vector", "token=last"], objs) == {
        "taylor": {"granularity": "vector"},
        "angular_distance": {"token": "last"},
    }
    with pytest.raises(ValueError, match="valid: angular_distance.token, taylor.granularity"):
        scorer_options(["nope=1"], objs)
    with pytest.raises(ValueError, match="not a requested scorer"):
        scorer_options(["wanda.x=1"], objs)
    with pytest.raises(ValueError, match="no requested scorer has option 'token'"):
        scorer_options(["taylor.token=all"], objs)
    with pytest.raises(ValueError, match="key=value"):
        scorer_options(["token"], objs)


def test_score_accepts_objects_and_cli_strings(samples):
    from prunekit.core.scores import get_scorer

    model = tiny_model("llama")
    ad = get_scorer("angular_distance")
    s = score(model, samples, [ad], progress=False, configs={"angular_distance": {"token": "all"}})
    ref = score(
        model,
        samples,
        ["angular_distance"],
        progress=False,
        configs={"angular_distance": {"token": "all"}},
    )
    torch.testing.assert_close(s["angular_distance"], ref["angular_distance"], equal_nan=True)
    assert s.meta["scorers"]["angular_distance"] == {"token": "all"}
    with pytest.raises(ValueError, match="unknown option"):
        score(model, samples, [ad], progress=False, configs={"angular_distance": {"tok": "x"}})


def test_third_party_block_scorer_selects_a_block(monkeypatch):
    """A scorer says it selects a contiguous block by metadata (``block = True``), not by
    being called angular_distance."""
    from prunekit.core.shapes import LayerShape
    from prunekit.scorers.base import Scorer

    class MyBlock(Scorer):
        name = "my_block"
        unit = "layers"
        block = True

    _register_scorer(monkeypatch, MyBlock())
    L = 6
    d = torch.full((L, L), float("nan"))
    for n in range(1, L + 1):
        d[n - 1, : L - n + 1] = torch.arange(L - n + 1, 0, -1).float()  # cheapest: last start
    shapes = [LayerShape(4, 2, 8, 32)] * L
    s = Scores({"my_block": d}, {"my_block": "layers"}, shapes, {})
    plan = prunekit.select(s, prunekit.Targets(layers=2, layer_scorer="my_block"))
    assert plan.layers == [3, 4]
    with pytest.raises(ValueError, match="contiguous block"):
        prunekit.plan_for(
            None, None, prunekit.Targets(layers=2, layer_scorer="my_block", layer_steps=2)
        )


def test_cli_scorer_opt(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import save_tiny

    save_tiny("llama", tmp_path / "m")

    def cli(*args):
        cmd = [sys.executable, "-m", "prunekit", "score", str(tmp_path / "m"), *args]
        return subprocess.run(cmd, capture_output=True, text=True)

    res = cli("--scorers", "angular_distance", "--scorer-opt", "tokn=all")
    assert res.returncode == 2 and "valid: angular_distance.token" in res.stderr, res.stderr
    res = cli(
        "--scorers",
        "block_influence,angular_distance",
        "--scorer-opt",
        "token=all",
        "--calib-samples",
        "4",
        "--seq-len",
        "16",
        "--layers",
        "1",
        "--no-progress",
        "-o",
        str(tmp_path / "s.json"),
    )
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "s.json").read_text())["meta"]
    assert meta["scorers"] == {"block_influence": {}, "angular_distance": {"token": "all"}}
