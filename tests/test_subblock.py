"""Sub-block pruning (issue 16): a plan's ``attention`` / ``mlp`` entries remove a layer's
attention or MLP sub-block with its norm, keeping the residual path. Surgery must equal the
masked reference, the KV cache must hold only layers that keep attention, and the result must
save, reload (prunekit and trust_remote_code without prunekit) and report its runtimes."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import DECODERS, VOCAB, logits, tiny_model
from test_serving import _load_in_clean_process, ids_for_test
from transformers.cache_utils import DummyLayer

from prunekit import PrunePlan, apply_plan, load_pretrained, save_pretrained
from prunekit.core.masking import masked
from prunekit.core.serving import PRUNEKIT, REMOTE_CODE, loadable_by
from prunekit.core.shapes import LayerShape
from prunekit.errors import PruningPlanError
from prunekit.plugins import get_adapter

N_LAYERS = 5


def random_subblock_plan(rng: random.Random) -> PrunePlan:
    """A valid plan mixing whole layers, sub-blocks, heads and neurons (5 layers, 8 heads in
    2 KV groups, 96 neurons)."""
    order = rng.sample(range(N_LAYERS), N_LAYERS)
    layers, attention, mlp, rest = order[:1], order[1:2], order[2:3], order[3:]
    if rng.random() < 0.5:
        attention.append(rest.pop())
    heads = {rest[0]: [0, 1, 2, 3]} if rest else {}
    neurons = {i: rng.sample(range(96), 7) for i in attention}
    return PrunePlan(layers=layers, attention=attention, mlp=mlp, heads=heads, neurons=neurons)


@pytest.mark.parametrize("arch", DECODERS)
def test_masked_equals_sliced(arch, ids):
    """Property: for random sub-block plans, the masked dense model and the cut model agree."""
    rng = random.Random(arch)
    for trial in range(3):
        plan = random_subblock_plan(rng)
        model = tiny_model(arch, seed=trial)
        with masked(model, plan):
            want = logits(model, ids)
        apply_plan(model, plan)
        torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=1e-5)
        shapes = get_adapter(model).shapes(model)
        assert len(shapes) == N_LAYERS - 1
        assert sum(not s.has_attention for s in shapes) == len(plan.attention)
        assert sum(not s.has_mlp for s in shapes) == len(plan.mlp)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_holds_only_layers_with_attention(arch, attn):
    model = tiny_model(arch, attn=attn)
    apply_plan(model, PrunePlan(layers=[3], attention=[0, 2], mlp=[1]))
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    assert torch.equal(cached, uncached)
    # layers 0 and 2 (original 0 and 2) keep no cache; original layer 3 is gone
    dummy = [isinstance(layer, DummyLayer) for layer in cache.layers]
    assert dummy == [True, False, True, False]
    assert cache.get_seq_length() == 9


def test_config_writes_skip_entries_and_shapes_read_back():
    model = apply_plan(tiny_model("llama"), PrunePlan(attention=[1], mlp=[3], layers=[4]))
    config = model.config.to_dict()
    assert config["num_hidden_layers"] == 4
    assert config["per_layer_config"] == {"1": {"skip": ["attention"]}, "3": {"skip": ["mlp"]}}
    adapter = get_adapter(model)
    shapes = adapter.shapes(model)
    assert shapes[1] == LayerShape(0, 0, 8, 96) and not shapes[1].has_attention
    assert shapes[3] == LayerShape(8, 2, 8, 0) and not shapes[3].has_mlp
    assert adapter.config_shapes(model.config) == shapes
    assert loadable_by(model.config)[0] == REMOTE_CODE


@pytest.mark.parametrize("arch", DECODERS)
def test_save_and_reload_with_prunekit(arch, tmp_path, ids):
    model = apply_plan(tiny_model(arch), PrunePlan(attention=[0, 3], mlp=[2], neurons={1: [4]}))
    out = save_pretrained(model, tmp_path / "m")
    reloaded, _ = load_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)
    assert get_adapter(reloaded).shapes(reloaded) == get_adapter(model).shapes(model)
    assert not any("layers.0.self_attn" in k for k in reloaded.state_dict())
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["plans"][0]["attention"] == [0, 3] and sidecar["plans"][0]["mlp"] == [2]
    assert sidecar["loadable_by"] == loadable_by(out)
    assert sidecar["loadable_by"][0] == REMOTE_CODE and sidecar["loadable_by"][-1] == PRUNEKIT


def test_subblock_results_load_with_remote_code_without_prunekit(tmp_path):
    ids = ids_for_test()
    expected, paths = {}, []
    for arch in DECODERS:
        plan = PrunePlan(attention=[1, 2], mlp=[0], layers=[4], heads={3: [0, 1, 2, 3]})
        model = apply_plan(tiny_model(arch), plan)
        out = save_pretrained(model, tmp_path / arch)
        expected[out], paths = logits(model, ids), [*paths, out]
    stdout = _load_in_clean_process(paths, tmp_path, ids)  # also checks cached == uncached
    assert stdout.count("Prunekit") == len(paths)
    for path, want in expected.items():
        got = torch.load(path / "remote_logits.pt")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_plan_round_trips_and_validates():
    plan = PrunePlan(attention=[3, 1, 1], mlp=[2])
    assert plan.attention == [1, 3]
    assert PrunePlan.from_json(plan.to_json()) == plan
    assert "attention" not in PrunePlan(layers=[1]).to_dict()
    assert not PrunePlan(mlp=[0]).is_empty()
    shapes = [LayerShape(8, 2, 8, 96)] * N_LAYERS
    cases = [
        (PrunePlan(attention=[5]), r"attention\[5\].*out of range"),
        (PrunePlan(mlp=[1], layers=[1]), r"mlp\[1\].*removed whole"),
        (PrunePlan(attention=[2], mlp=[2]), r"neither attention nor MLP"),
        (PrunePlan(attention=[2], heads={2: [0]}), r"drop its heads"),
        (PrunePlan(mlp=[2], neurons={2: [0]}), r"drop its neurons"),
    ]
    for bad, match in cases:
        with pytest.raises(PruningPlanError, match=match):
            bad.validate(shapes)
    cut = [shapes[0].without(mlp=True), *shapes[1:]]
    with pytest.raises(PruningPlanError, match="neither attention nor MLP"):
        PrunePlan(attention=[0]).validate(cut)
    with pytest.raises(PruningPlanError, match="no mlp sub-block left"):
        PrunePlan(mlp=[0]).validate(cut)


def test_encoder_refuses_subblock_removal_before_touching_anything():
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningPlanError, match="cannot remove attention/MLP sub-blocks"):
        apply_plan(model, PrunePlan(attention=[1]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_second_plan_on_a_subblock_pruned_model():
    """Indices refer to the model the plan is applied to; a second plan can remove the other
    sub-block of a layer only by removing the layer."""
    model = apply_plan(tiny_model("mistral"), PrunePlan(attention=[1]))
    with pytest.raises(PruningPlanError, match="no attention sub-block left"):
        apply_plan(model, PrunePlan(attention=[1]))
    apply_plan(model, PrunePlan(mlp=[3], layers=[0]))
    shapes = get_adapter(model).shapes(model)
    assert [(s.has_attention, s.has_mlp) for s in shapes] == [
        (False, True),
        (True, True),
        (True, False),
        (True, True),
    ]


# ---- scorers, selection, CLI ------------------------------------------------------------
def _reference_influence(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """1 − mean cos of (x, h) and (h, y) per layer, from hooks on each layer and attention."""
    layers = model.model.layers
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(layers))}
    handles = []
    for i, layer in enumerate(layers):

        def on_layer(m, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i]["x"], seen[i]["y"] = x, out[0] if isinstance(out, tuple) else out

        def on_attn(m, args, out, i=i):
            seen[i]["a"] = out[0]

        handles.append(layer.register_forward_hook(on_layer, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(on_attn))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    cos = torch.nn.functional.cosine_similarity
    attn, mlp = [], []
    for s in seen.values():
        h = s["x"] + s["a"]
        attn.append(1 - cos(s["x"], h, dim=-1).mean())
        mlp.append(1 - cos(h, s["y"], dim=-1).mean())
    return torch.stack(attn), torch.stack(mlp)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_subblock_scorers_match_their_formula(arch, ids):
    from prunekit.core.scores import score

    model = tiny_model(arch)
    scores = score(model, ids, ["attention_influence", "mlp_influence"], progress=False)
    assert scores.unit("attention_influence") == "attention"
    assert scores.unit("mlp_influence") == "mlps"
    want_attn, want_mlp = _reference_influence(model, ids)
    assert scores["attention_influence"].shape == (N_LAYERS,)
    torch.testing.assert_close(scores["attention_influence"], want_attn, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores["mlp_influence"], want_mlp, atol=1e-5, rtol=1e-4)
    # on a model with sub-blocks removed, the removed ones score NaN and never get picked
    apply_plan(model, PrunePlan(attention=[1], mlp=[2]))
    again = score(model, ids, ["attention_influence", "mlp_influence"], progress=False)
    assert torch.isnan(again["attention_influence"][1])
    assert torch.isnan(again["mlp_influence"][2])
    assert not torch.isnan(again["attention_influence"][[0, 2, 3, 4]]).any()


def test_selection_picks_lowest_subblocks_and_respects_protection(ids):
    from prunekit.core.scores import Scores
    from prunekit.core.select import select
    from prunekit.core.targets import Targets

    shapes = [LayerShape(8, 2, 8, 96)] * N_LAYERS
    values = {
        "attention_influence": torch.tensor([0.0, 0.5, 0.1, 0.2, 0.0]),
        "mlp_influence": torch.tensor([0.0, 0.3, 0.05, 0.9, 0.0]),
    }
    scores = Scores(values, {"attention_influence": "attention", "mlp_influence": "mlps"}, shapes)
    plan = select(scores, Targets(attention=2, mlps=1))
    assert plan.attention == [2, 3] and plan.mlp == [1]  # layer 2's MLP stays: not both
    assert plan.layers == [] and plan.meta["scorers"] == {
        "attention": "attention_influence",
        "mlps": "mlp_influence",
    }
    with pytest.raises(ValueError, match="attention target asks to remove 4"):
        select(scores, Targets(attention=4))


def test_plan_for_and_cli_remove_attention_end_to_end(tmp_path):
    from conftest import save_tiny
    from test_pipeline import cli, small_run_flags

    from prunekit.core.select import plan_for
    from prunekit.core.targets import Targets

    model = tiny_model("qwen3")
    samples = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    plan, scores = plan_for(model, samples, Targets(attention=2, mlps=0.2), progress=False)
    assert len(plan.attention) == 2 and len(plan.mlp) == 1
    assert not set(plan.attention) & set(plan.mlp) and {0, 4}.isdisjoint(plan.attention)

    texts = tmp_path / "texts"
    texts.mkdir()
    from conftest import brown_text, wiki_text

    (texts / "calib.txt").write_text(brown_text()[:20_000], encoding="utf-8")
    (texts / "eval.txt").write_text(wiki_text()[:3_000], encoding="utf-8")
    src = save_tiny("llama", tmp_path / "dense")
    out = tmp_path / "out"
    res = cli("compress", src, "-o", out, "--attention", "1", *small_run_flags(texts))
    assert res.returncode == 0, res.stderr[-3000:]
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert len(sidecar["plans"][0]["attention"]) == 1
    assert sidecar["recipe"]["targets"]["attention"] == 1
    assert sum(s["n_heads"] == 0 for s in sidecar["layer_shapes"]) == 1
    config = json.loads((out / "config.json").read_text())
    assert list(config["per_layer_config"].values()) == [{"skip": ["attention"]}]
    assert f"loads in: {REMOTE_CODE}" in res.stdout
    assert f"Loads in: {REMOTE_CODE}" in (out / "report.md").read_text()
    reloaded, _ = load_pretrained(out)
    assert sum(not s.has_attention for s in get_adapter(reloaded).shapes(reloaded)) == 1


# ---- iterative steps --------------------------------------------------------------------
def test_iterative_steps_split_subblock_targets():
    """The recipe's ``iterative`` splits attention/mlps targets over the steps like layers
    (a sub-block removed in an earlier step counts; a layer removed whole is none), and the
    heads fraction is of the layers that still have attention."""
    from prunekit.core.targets import Targets, step_targets, unit_counts

    dense = [LayerShape(8, 2, 8, 96)] * 10
    counts = unit_counts(dense)
    assert (counts["attention"], counts["mlps"], counts["heads"]) == (10, 10, 80)
    t = Targets(attention=4, mlps=0.2, heads=0.25, layers=2)
    first = step_targets(t, 2, 1, counts, dense)
    assert (first.attention, first.mlps, first.layers, first.heads) == (2, 1, 1, 0.125)
    # after step 1: one layer gone, attention of 2 layers, MLP of 1, and 2 of 8 query heads
    # from 4 of the 7 layers that keep attention
    s = LayerShape(8, 2, 8, 96)
    after = [s.without(attention=True)] * 2 + [s.without(mlp=True)]
    after += [LayerShape(6, 2, 8, 96)] * 4 + [s] * 2
    second = step_targets(t, 2, 2, counts, after)
    assert (second.attention, second.mlps, second.layers) == (2, 1, 1)
    done = 8 / 56  # of the 7 layers with attention
    assert second.heads == pytest.approx((0.25 - done) / (1 - done))
    assert step_targets(t, 1, 1, counts, dense) is t


def test_iterative_compress_removes_the_attention_target_once(tmp_path):
    from conftest import brown_text, tiny_tokenizer, wiki_text

    from prunekit import Recipe, compress

    (tmp_path / "calib.txt").write_text(brown_text()[:20_000], encoding="utf-8")
    (tmp_path / "eval.txt").write_text(wiki_text()[:2_000], encoding="utf-8")
    recipe = Recipe.from_dict(
        {
            "targets": {"attention": 2, "mlps": 1},
            "iterative": 2,
            "calibration": {"source": str(tmp_path / "calib.txt"), "n_samples": 4, "seq_len": 16},
            "evaluation": {"text": "none", "latency": False},
        }
    )
    model = tiny_model("llama")
    result = compress(model, recipe, tmp_path / "out", tokenizer=tiny_tokenizer(), progress=False)
    assert [len(p.attention) for p in result.plans] == [1, 1]
    assert sum(len(p.mlp) for p in result.plans) == 1
    shapes = get_adapter(model).shapes(model)
    assert sum(not s.has_attention for s in shapes) == 2
    assert sum(not s.has_mlp for s in shapes) == 1


# ---- streaming apply ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", DECODERS)
def test_streaming_apply_of_a_subblock_plan_equals_in_memory(arch, tmp_path, ids):
    """stream_apply (tensor by tensor, no model built) writes what apply_plan + save_pretrained
    write for a plan with sub-blocks: the same tensors bit for bit (a removed sub-block's
    weights and norm absent), config (skip entries), sidecar and remote code; a second round
    on the streamed result too."""
    from test_streaming import _assert_same, _checkpoint, _in_memory

    from prunekit import load_model
    from prunekit.core.streaming import stream_apply

    plan = PrunePlan(layers=[4], attention=[0, 2], mlp=[1], heads={3: [0, 1, 2, 3]})
    src = _checkpoint(tmp_path, arch)
    streamed = stream_apply(src, plan, tmp_path / "streamed")
    _assert_same(streamed, _in_memory(src, plan, tmp_path / "memory", torch.float32))
    config = json.loads((streamed / "config.json").read_text())
    assert config["per_layer_config"]["0"] == {"skip": ["attention"]}
    assert config["per_layer_config"]["1"] == {"skip": ["mlp"]}
    assert (streamed / "modeling_prunekit.py").is_file()
    model, _ = load_pretrained(streamed, attn_implementation="eager")
    with masked(dense := tiny_model(arch), plan):
        want = logits(dense, ids)
    torch.testing.assert_close(logits(model, ids), want, atol=1e-5, rtol=1e-5)
    again = PrunePlan(layers=[0], attention=[3], neurons={2: [1, 2]})  # layer 2 kept its MLP
    second = stream_apply(streamed, again, tmp_path / "second")
    model, tok = load_model(streamed)
    model.prunekit_plans = []  # the in-memory sidecar records only this round, like streaming
    _assert_same(second, save_pretrained(apply_plan(model, again), tmp_path / "memory2", tok))
