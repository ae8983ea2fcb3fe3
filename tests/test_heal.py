"""Training-free healing by block linearization (ReplaceMe): fit, fold, select, save."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, logits, tiny_config, tiny_model

import prunekit
from prunekit import PrunePlan, PruningPlanError, apply_plan, save_pretrained
from prunekit.core.heal import (
    accumulate_run_stats,
    apply_linear_heal,
    fit_linear_heal,
    heal_and_remove,
    layer_runs,
)
from prunekit.core.heal_select import select_block_by_heal_residual


@pytest.fixture
def calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (6, 16), generator=g)


def linear_block_model() -> torch.nn.Module:
    """A float64 Llama whose layers 2..3 add to the stream only a linear function of layer 1's
    MLP output ``M_1`` -- exactly the quantity ReplaceMe regresses on -- so healing run (2, 3)
    must reproduce the dense model.

    The residual stream is split in two halves: everything up to layer 1's attention writes
    only to features [0, 32) (embeddings, o_proj and down_proj rows), layer 1's down_proj only
    to [32, 64), so ``h_1`` and ``M_1`` live in disjoint halves. In layers 2 and 3 attention is
    off (o_proj = 0), the gate is a constant (weight 0, bias c), up_proj reads only features
    [32, 64), and the post-attention RMSNorm is made linear (eps 1e30 dominates the mean square,
    weight 1e15 = sqrt(eps) undoes the scale): the MLP is ``x[32:] -> W_d (silu(c) * W_u x)``.
    """
    import transformers as tf

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.mlp_bias, config.tie_word_embeddings = True, False
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config).double().eval()
    half = 32
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
        model.model.embed_tokens.weight[:, half:] = 0
        layers = model.model.layers
        for i in (0, 1):
            layers[i].self_attn.o_proj.weight[half:] = 0
        layers[0].mlp.down_proj.weight[half:] = 0
        layers[0].mlp.down_proj.bias[half:] = 0
        layers[1].mlp.down_proj.weight[:half] = 0
        layers[1].mlp.down_proj.bias[:half] = 0
        for i in (2, 3):
            layer = layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.gate_proj.weight.zero_()
            layer.mlp.up_proj.weight[:, :half] = 0
            layer.mlp.up_proj.bias.zero_()
            layer.mlp.down_proj.bias.zero_()
            layer.post_attention_layernorm.variance_epsilon = 1e30
            layer.post_attention_layernorm.weight.fill_(1e15)
    return model


def test_layer_runs():
    assert layer_runs([7, 3, 4, 4]) == [(3, 4), (7, 7)]
    assert layer_runs([]) == []


def test_exactly_linear_block_heals_to_dense(calib):
    model = linear_block_model()
    dense = logits(model, calib)
    plain = logits(apply_plan(linear_block_model(), PrunePlan(layers=[2, 3])), calib)
    assert (plain - dense).abs().max() > 1e-2  # removal alone changes the model
    heal_and_remove(model, calib, [2, 3], ridge=1e-12, batch_size=2)
    assert model.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(model, calib), dense, atol=1e-5, rtol=1e-5)


def test_selector_finds_the_linear_block(calib):
    model = linear_block_model()
    layers, scores = select_block_by_heal_residual(model, calib, 2, ridge=1e-12)
    assert layers == [2, 3]
    assert scores[2] < 1e-12 < scores[1]
    assert torch.isinf(scores[0]) and torch.isinf(scores[3])  # layer 0 and last layer kept


def _kl_to_dense(model, dense_logits, ids) -> float:
    logp = torch.log_softmax(logits(model, ids), -1)
    p_dense = torch.softmax(dense_logits, -1)
    return float((p_dense * (torch.log(p_dense) - logp)).sum(-1).mean())


def _lm_loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("removed", [[2, 3], [1, 3]])
def test_healing_lowers_calibration_loss(calib, removed):
    dense = tiny_model("llama").double()
    dense_logits = logits(dense, calib)
    plain = apply_plan(tiny_model("llama").double(), PrunePlan(layers=removed))
    healed = heal_and_remove(tiny_model("llama").double(), calib, removed)
    assert _kl_to_dense(healed, dense_logits, calib) < 0.5 * _kl_to_dense(
        plain, dense_logits, calib
    )
    assert _lm_loss(healed, calib) < _lm_loss(plain, calib)


def test_accumulated_fit_equals_lstsq_on_all_activations(calib):
    model = tiny_model("llama").double()
    captured = {}
    hook = model.model.layers[1].mlp.register_forward_hook(
        lambda m, a, out: captured.setdefault("m", out)
    )
    with torch.no_grad():
        hidden = model(input_ids=calib, output_hidden_states=True).hidden_states
    hook.remove()
    m = captured["m"].reshape(-1, 64)
    h = hidden[2].reshape(-1, 64) - m  # input of layer 2 minus layer 1's MLP output
    y = hidden[4].reshape(-1, 64)  # output of layer 3
    direct = torch.linalg.lstsq(m, y - h).solution
    maps = fit_linear_heal(model, calib, [2, 3], ridge=0.0, batch_size=4)
    torch.testing.assert_close(maps[(2, 3)], direct, atol=1e-8, rtol=1e-8)
    stats = accumulate_run_stats(model, calib, [(2, 3)], batch_size=4)[(2, 3)]
    direct_residual = float(((m @ direct - (y - h)) ** 2).sum())
    assert stats.residual(direct) == pytest.approx(direct_residual, rel=1e-6)


def test_cosine_objective_improves_cosine_over_lstsq(calib):
    model = tiny_model("llama")
    ls = fit_linear_heal(model, calib, [2, 3])
    cos = fit_linear_heal(model, calib, [2, 3], objective="cosine", cosine_steps=30)
    stats = accumulate_run_stats(model, calib, [(2, 3)], sample_tokens=10**6)[(2, 3)]
    m, h, y = (torch.cat(p).double() for p in zip(*stats.sample, strict=True))

    def cos_loss(t):
        return float(1 - torch.nn.functional.cosine_similarity(h + m @ t, y, dim=-1).mean())

    assert cos_loss(cos[(2, 3)]) < cos_loss(ls[(2, 3)])


def test_healed_model_reloads_in_stock_transformers(calib, tmp_path):
    import transformers as tf

    model = heal_and_remove(tiny_model("llama"), calib, [2, 3])
    assert model.dtype == torch.float32
    save_pretrained(model, tmp_path / "healed")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "healed", attn_implementation="eager"
    ).eval()
    assert reloaded.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(reloaded, calib), logits(model, calib), atol=0, rtol=0)


def test_refusals(calib):
    with pytest.raises(PruningPlanError, match="kept layer before it"):
        fit_linear_heal(tiny_model("llama"), calib, [0, 1])
    with pytest.raises(PruningPlanError, match="post-norm"):
        fit_linear_heal(tiny_model("bert"), calib, [2])
    pruned = apply_plan(tiny_model("llama"), PrunePlan(layers=[4]))
    with pytest.raises(PruningPlanError, match="already pruned"):
        apply_linear_heal(pruned, {(2, 2): torch.eye(64, dtype=torch.float64)})
    with pytest.raises(ValueError, match="objective"):
        fit_linear_heal(tiny_model("llama"), calib, [2], objective="l1")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sequential_fit_targets_the_healed_model(calib):
    """With ``sequential=True`` the second run's map is the least-squares fit on the model
    whose first run is already healed and removed; the model is left unchanged."""
    model = tiny_model("llama").double()
    before = _state(model)
    maps = fit_linear_heal(model, calib, [1, 3], ridge=0.0, sequential=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    parallel = fit_linear_heal(model, calib, [1, 3], ridge=0.0, sequential=False)
    torch.testing.assert_close(maps[(1, 1)], parallel[(1, 1)], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(maps[(3, 3)], parallel[(3, 3)])

    healed = apply_linear_heal(tiny_model("llama").double(), {(1, 1): maps[(1, 1)]})
    captured = {}
    hook = healed.model.layers[2].mlp.register_forward_hook(
        lambda m, a, out: captured.setdefault("m", out)
    )
    with torch.no_grad(), prunekit.masked(healed, PrunePlan(layers=[1])):
        hidden = healed(input_ids=calib, output_hidden_states=True).hidden_states
    hook.remove()
    m = captured["m"].reshape(-1, 64)
    h = hidden[3].reshape(-1, 64) - m
    direct = torch.linalg.lstsq(m, hidden[4].reshape(-1, 64) - h).solution
    torch.testing.assert_close(maps[(3, 3)], direct, atol=1e-8, rtol=1e-8)


def test_heal_residual_scorer_selects_the_linear_block(calib):
    model = linear_block_model()
    s = prunekit.score(
        model, calib, ["heal_residual"], configs={"heal_residual": {"ridge": 1e-12}}, progress=False
    )
    d = s["heal_residual"]
    assert d.shape == (5, 5) and torch.isnan(d[:, 0]).all()
    _, block2 = select_block_by_heal_residual(model, calib, 2, ridge=1e-12)
    torch.testing.assert_close(d[1, 1:3].double(), block2[1:3], rtol=1e-5, atol=1e-12)
    plan, _ = prunekit.plan_for(
        model,
        calib,
        prunekit.Targets(layers=2, layer_scorer="heal_residual", mode="uniform"),
        progress=False,
        configs={"heal_residual": {"ridge": 1e-12}},
    )
    assert sorted(plan.layers) == [2, 3]
    with pytest.raises(ValueError, match="pre-norm"):
        prunekit.score(tiny_model("bert"), calib, ["heal_residual"], progress=False)
    with pytest.raises(ValueError, match="max_block"):
        prunekit.score(model, calib, ["heal_residual"], configs={"heal_residual": {"max_block": 0}})


STOCK_RELOAD = """
import sys, torch, transformers
from safetensors.torch import load_file
path = {path!r}
probe = load_file(path + "/probe/probe.safetensors")
model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
with torch.no_grad():
    out = model(input_ids=probe["input_ids"]).logits
torch.testing.assert_close(out, probe["output"], atol=1e-5, rtol=0)
assert "prunekit" not in sys.modules
print("OK", model.config.num_hidden_layers)
"""


def test_compress_cli_heal_linear_reloads_in_stock_transformers(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import brown_text, run_python, save_tiny, wiki_text
    from safetensors.torch import load_file

    (tmp_path / "calib.txt").write_text(brown_text()[:40_000], encoding="utf-8")
    (tmp_path / "eval.txt").write_text(wiki_text()[:4_000], encoding="utf-8")
    src = save_tiny("llama", tmp_path / "dense")
    common = ["--layers", "1", "--calib", tmp_path / "calib.txt", "--calib-samples", "8"]
    common += ["--seq-len", "32", "--eval-text", tmp_path / "eval.txt", "--no-latency"]

    def compress(out: str, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "prunekit", "compress", src, "-o", tmp_path / out]
        res = subprocess.run([*map(str, args + common), *extra], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    res = compress("healed", "--heal", "linear", "--heal-opt", "ridge=1e-3")
    compress("plain")
    assert "healing layers" in res.stdout + res.stderr
    healed = tmp_path / "healed"
    sidecar = json.loads((healed / "prunekit.json").read_text())
    assert sidecar["recipe"]["heal"]["method"] == "linear"
    assert float(sidecar["recipe"]["heal"]["options"]["ridge"]) == 1e-3
    weights = load_file(healed / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    differ = [k for k in weights if not torch.equal(weights[k], plain[k])]
    assert differ and all(k.endswith("mlp.down_proj.weight") for k in differ)
    reload = run_python(STOCK_RELOAD.format(path=str(healed)))
    assert reload.returncode == 0, reload.stderr[-3000:]
    assert reload.stdout.strip().endswith("OK 4")


def test_recipe_heal_section():
    from prunekit.core.heal import HealConfig, get_healer
    from prunekit.core.recipe import Recipe

    recipe = Recipe.from_dict(
        {"targets": {"layers": 1}, "heal": {"method": "linear", "options": {"ridge": 0.01}}}
    )
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    config = recipe.heal.config(get_healer("linear"))
    assert config == HealConfig(ridge=0.01)
    with pytest.raises(ValueError, match="heal.options"):
        Recipe.from_dict({"heal": {"method": "linear", "options": {"lamda": 1}}}).heal.config(
            get_healer("linear")
        )
    with pytest.raises(ValueError, match="iterative: 1"):
        Recipe.from_dict({"iterative": 2, "heal": {"method": "linear"}})
    with pytest.raises(ValueError, match="heal.method"):
        get_healer("quadratic")
    with pytest.raises(ValueError, match="objective"):
        HealConfig(objective="l1")


# ---- fit="down_proj": refit the whole down_proj weight of the layer before the run --------


@pytest.fixture
def calib_long() -> torch.Tensor:
    """More tokens (256) than the tiny MLP has neurons (96 + a bias), so the down_proj fit is
    determined."""
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (16, 16), generator=g)


def test_down_proj_fit_heals_an_exactly_linear_block_to_dense(calib_long):
    model = linear_block_model()
    dense = logits(model, calib_long)
    heal_and_remove(model, calib_long, [2, 3], ridge=0.0, fit="down_proj", batch_size=4)
    torch.testing.assert_close(logits(model, calib_long), dense, atol=1e-5, rtol=1e-5)


def test_down_proj_fit_equals_lstsq_on_all_activations(calib_long):
    """The accumulated fit equals ``lstsq([a, 1], Y − h)`` on every token at once, and its
    calibration residual is never above ReplaceMe's map (a superset of what a map can do)."""
    model = linear_block_model()
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.normal_(0, 0.3)  # a non-linear block now
    captured = {}
    mlp = model.model.layers[1].mlp
    hooks = [
        mlp.register_forward_hook(lambda m, a, out: captured.setdefault("m", out)),
        mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("a", a[0])),
    ]
    with torch.no_grad():
        hidden = model(input_ids=calib_long, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    m, a = captured["m"].reshape(-1, 64), captured["a"].reshape(-1, 96)
    a1 = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    target = hidden[4].reshape(-1, 64) - (hidden[2].reshape(-1, 64) - m)
    direct = torch.linalg.lstsq(a1, target).solution
    fitted = fit_linear_heal(model, calib_long, [2, 3], ridge=0.0, fit="down_proj", batch_size=4)
    torch.testing.assert_close(fitted[(2, 3)], direct, atol=1e-7, rtol=1e-7)
    stats = {
        f: accumulate_run_stats(model, calib_long, [(2, 3)], fit=f, batch_size=4)[(2, 3)]
        for f in ("map", "down_proj")
    }
    res = {f: st.residual(st.solve(0.0)) for f, st in stats.items()}
    assert res["down_proj"] == pytest.approx(float(((a1 @ direct - target) ** 2).sum()), rel=1e-6)
    assert res["down_proj"] < res["map"]
    down = apply_linear_heal(model, fitted, "down_proj").model.layers[1].mlp.down_proj
    torch.testing.assert_close(down.weight, direct[:96].T)
    torch.testing.assert_close(down.bias, direct[96])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_down_proj_fit_lowers_calibration_loss_on_every_decoder(calib_long, arch, tmp_path):
    import transformers as tf

    ids = calib_long[:8]
    dense_logits = logits(tiny_model(arch), ids)
    plain = apply_plan(tiny_model(arch), PrunePlan(layers=[2, 3]))
    healed = heal_and_remove(tiny_model(arch), ids, [2, 3], fit="down_proj")
    # a random model's next-token loss is near log(vocab) either way: compare with the dense
    assert _kl_to_dense(healed, dense_logits, ids) < 0.5 * _kl_to_dense(plain, dense_logits, ids)
    save_pretrained(healed, tmp_path / "healed")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "healed", attn_implementation="eager"
    ).eval()
    assert reloaded.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(reloaded, ids), logits(healed, ids), atol=1e-5, rtol=0)


def test_down_proj_fit_config_and_refusals(calib):
    from prunekit.core.heal import HealConfig

    assert HealConfig(fit="down_proj").to_dict()["fit"] == "down_proj"
    with pytest.raises(ValueError, match="fit must be one of"):
        HealConfig(fit="weights")
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_linear_heal(tiny_model("llama"), calib, [2], fit="weights")
    with pytest.raises(ValueError, match="does not fit layer 1"):
        apply_linear_heal(tiny_model("llama"), {(2, 2): torch.eye(64)}, "down_proj")


# ---- heal_loss: select the block by the healed model's held-out calibration loss ----------


def test_healed_block_losses_equal_the_healed_model_loss(calib_long):
    """The cached engine (stand-ins below the folded layer) gives the loss of the model
    healed and cut for real; the model is left unchanged."""
    from prunekit.plugins import get_adapter
    from prunekit.scorers.heal_loss import healed_block_losses

    model = tiny_model("llama").double()
    before = _state(model)
    fit_ids, held = calib_long[:12], calib_long[12:]
    runs = [(1, 2), (2, 3), (3, 3)]
    got = healed_block_losses(
        model, get_adapter(model), fit_ids, held, runs, fit="down_proj", ridge=1e-4, batch_size=3
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for first, last in runs:
        layers = list(range(first, last + 1))
        healed = heal_and_remove(
            tiny_model("llama").double(), fit_ids, layers, fit="down_proj", ridge=1e-4
        )
        assert got[(first, last)] == pytest.approx(_lm_loss(healed, held), rel=1e-6)


def test_heal_loss_scorer_takes_the_block_size_from_the_target(calib_long):
    model = linear_block_model()
    targets = prunekit.Targets(layers=2, layer_scorer="heal_loss", mode="uniform")
    opts = {"heal_loss": {"ridge": 0.0, "candidates": 2}}
    plan, scores = prunekit.plan_for(model, calib_long, targets, progress=False, configs=opts)
    assert sorted(plan.layers) == [2, 3]
    d = scores["heal_loss"]
    assert d.shape == (5, 5)
    assert torch.isfinite(d[1]).sum() == 2 and torch.isnan(d[[0, 2, 3, 4]]).all()
    held = calib_long[-4:]  # holdout 0.25 of 16 samples
    assert float(d[1, 2]) == pytest.approx(_lm_loss(linear_block_model(), held), rel=1e-6)
    with pytest.raises(ValueError, match="pre-norm"):
        prunekit.score(tiny_model("bert"), calib_long, ["heal_loss"], progress=False)
    with pytest.raises(ValueError, match="holdout"):
        prunekit.score(model, calib_long, ["heal_loss"], configs={"heal_loss": {"holdout": 1}})


def test_demo_recipe_runs_heal_loss_and_heal_through_compress(tmp_path):
    """The demo recipe's selection (heal_loss), healing (down_proj refit) and recovery (distill
    from a teacher cache, LoRA near the removed block), scaled down to a tiny Llama: one contiguous
    block of the target's size goes, the saved model reloads in stock transformers."""
    import transformers as tf
    from conftest import brown_text, tiny_tokenizer, wiki_text

    from prunekit.commands.compress import DEMO_RECIPE
    from prunekit.core.pipeline import compress
    from prunekit.core.recipe import Recipe

    (tmp_path / "calib.txt").write_text(brown_text()[:40_000], encoding="utf-8")
    (tmp_path / "eval.txt").write_text(wiki_text()[:3_000], encoding="utf-8")
    spec = Recipe.from_file(DEMO_RECIPE).to_dict()
    assert spec["targets"]["layer_scorer"] == "heal_loss"
    assert spec["heal"]["options"]["fit"] == "down_proj"
    assert spec["recovery"]["method"] == "distill"
    spec["targets"]["layers"] = 2
    spec["calibration"].update(source=str(tmp_path / "calib.txt"), n_samples=8, seq_len=32)
    spec["recovery"].update(minutes=None, steps=2)
    spec["recovery"]["options"].update(seq_len=32, n_samples=8, eval_every=1, eval_samples=2)
    spec["evaluation"].update(text=str(tmp_path / "eval.txt"), max_chars=3000, latency=False)
    model = tiny_model("llama")
    result = compress(
        model, Recipe.from_dict(spec), tmp_path / "out", tokenizer=tiny_tokenizer(), progress=False
    )
    (plan,) = result.plans
    first = min(plan.layers)
    assert sorted(plan.layers) == [first, first + 1] and 1 <= first <= 2
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == 3
