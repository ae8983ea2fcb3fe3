"""Recovery: each method lowers held-out loss of a pruned tiny model; LoRA merges exactly;
distillation against an identical teacher is zero; keep-best, budgets, early stopping;
recovered models save and reload; QLoRA says what it needs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import FAST_RECOVERY, PATTERN_TEXT, VOCAB, logits, run_python, tiny_model

from prunekit import PrunePlan, apply_plan, get_plugins, load_pretrained, save_pretrained
from prunekit.core.recovery import (
    RecoveryConfig,
    RecoveryResult,
    RecoveryUnavailableError,
    distill_kl,
    lm_loss,
    lr_factor,
    pack,
    recover,
    split_data,
)
from prunekit.core.training import budget_lr_factor
from prunekit.recoveries import (
    attach_lora,
    has_lora_modules,
    layers_near_pruning,
    lora_target_names,
    merge_lora,
)
from prunekit.recoveries import lora as lora_module

TEXT, FAST = PATTERN_TEXT, FAST_RECOVERY
pytestmark = pytest.mark.usefixtures("one_thread")


def pruned(arch: str = "llama", plan: PrunePlan | None = None):
    dense = tiny_model(arch)
    student = apply_plan(copy.deepcopy(dense), plan or PrunePlan(layers=[1, 3]))
    return dense, student


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(steps=0), "steps"),
        (dict(steps=None, minutes=None), "steps"),
        (dict(minutes=-1.0), "minutes"),
        (dict(lr=0.0), "lr"),
        (dict(warmup_steps=1.5), "warmup_steps"),
        (dict(warmup_steps=0.1, steps=None, minutes=1.0), "warmup_steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(grad_accum=0), "grad_accum"),
        (dict(seq_len=1), "seq_len"),
        (dict(patience=0), "patience"),
        (dict(lora_r=0), "lora_r"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(temperature=0.0), "temperature"),
        (dict(alpha_kl=0.0, alpha_lm=0.0), "alpha_kl"),
        (dict(distill_base="qlora"), "distill_base"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"RecoveryConfig\.{field}\b"):
        RecoveryConfig(**kwargs)


def test_config_round_trips_and_rejects_unknown_keys():
    config = RecoveryConfig(method="distill", steps=None, minutes=2.5, distill_base="full")
    data = json.loads(json.dumps(config.to_dict()))
    assert RecoveryConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown recovery option.*learning_rate"):
        RecoveryConfig.from_dict({"learning_rate": 1e-3})


def test_warmup_fraction_and_cap():
    assert RecoveryConfig(steps=200, warmup_steps=0.1).warmup == 20
    assert RecoveryConfig(steps=10, warmup_steps=20).warmup == 5  # at most half the steps
    assert RecoveryConfig(steps=None, minutes=1.0, warmup_steps=7).warmup == 7
    assert RecoveryConfig(steps=200).warmup == 10  # default: 5% of the step budget
    assert RecoveryConfig(steps=None, minutes=1.0).warmup == 0  # time-based instead
    with pytest.raises(ValueError, match=r"RecoveryConfig\.warmup_fraction\b"):
        RecoveryConfig(warmup_fraction=0.8)


def test_builtin_methods_are_registered_plugins():
    recoveries = get_plugins().recoveries
    assert {"lora", "full", "distill", "qlora"} <= set(recoveries.names())
    for name in ("lora", "full", "distill"):
        assert recoveries.get(name).available()[0] is True
    assert recoveries.origin("lora") == "prunekit.recoveries"
    with pytest.raises(KeyError, match="valid recovery methods: .*distill.*lora"):
        recover(tiny_model("llama"), TEXT, RecoveryConfig(method="sgd", steps=1, **FAST))


def test_methods_follow_the_plugin_contract_and_take_generic_options():
    import dataclasses

    from prunekit.core.recovery import recovery_config

    recoveries = get_plugins().recoveries
    for name in recoveries.names():
        method = recoveries.get(name)
        assert dataclasses.is_dataclass(method.config_class)
        ok, why = method.available()
        assert isinstance(ok, bool) and isinstance(why, str) and (ok or why)
    full = recoveries.get("full")
    # --recover-opt strings are coerced to the field types; the method is the plugin's.
    config = recovery_config(full, {"lr": "1e-3", "steps": "5", "minutes": "none"})
    assert config == RecoveryConfig(method="full", lr=1e-3, steps=5)
    with pytest.raises(ValueError, match=r"recovery.options: unknown option.*lora_rank.*lora_r"):
        recovery_config(full, {"lora_rank": "8"})
    with pytest.raises(ValueError, match="differs"):
        recovery_config(full, {"method": "lora"})
    _, model = pruned()
    with pytest.raises(ValueError, match="'lora' but the method passed is 'full'"):
        recover(model, TEXT, RecoveryConfig(steps=1, **FAST), method=full, progress=False)


# ---- pieces --------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine():
    assert [lr_factor(s, 4, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 0.0) == 1.0
    assert lr_factor(10, 4, 0.5) == pytest.approx(0.5)
    assert lr_factor(10, 4, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(10, 0, 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("budget_s", [60.0, 180.0, 600.0])
@pytest.mark.parametrize("step_s", [0.05, 0.7, 3.0, 7.0, 25.0])
def test_time_budget_schedule_peaks_in_the_first_tenth(step_s, budget_s):
    """Simulated clock: an initial evaluation, then one update every ``step_s`` seconds, each
    LR computed at the update from the elapsed fraction. The peak comes within the first 10%
    of the budget (or at the first update when one step alone is longer than that), the LR
    climbs before it and only falls after it."""
    eval_s = 0.01 * budget_s
    times = [eval_s + (k + 1) * step_s for k in range(int((budget_s - eval_s) // step_s) + 1)]
    times = [t for t in times if t - step_s < budget_s]  # a step starts only within budget
    lrs = [budget_lr_factor(t / budget_s, 0.05) for t in times]
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert times[peak] <= max(0.1 * budget_s, times[0])
    assert lrs[peak] > 0.9 or len(lrs) < 20
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
    if len(lrs) >= 20:
        assert lrs[-1] < 0.1  # decayed by the end of the budget


def test_budget_lr_factor_formula():
    assert budget_lr_factor(0.0, 0.05) == 0.0
    assert budget_lr_factor(0.025, 0.05) == pytest.approx(0.5)
    assert budget_lr_factor(0.05, 0.05) == pytest.approx(1.0)
    assert budget_lr_factor(0.525, 0.05) == pytest.approx(0.5)
    assert budget_lr_factor(1.0, 0.05) == pytest.approx(0.0, abs=1e-12)
    assert budget_lr_factor(1.7, 0.05) == pytest.approx(0.0, abs=1e-12)  # clamped
    assert budget_lr_factor(0.0, 0.0) == 1.0  # no warm-up: peak at once


def test_time_budget_run_peaks_early_and_records_throughput(monkeypatch):
    """A real run on a fake clock (a shared machine's speed must not decide the test): each
    training step costs 20 ms, each held-out evaluation 30 ms of a 3 s budget."""
    from prunekit.core import recovery_loop

    now = [0.0]
    monkeypatch.setattr(recovery_loop, "clock", lambda: now[0])
    real_accumulate, real_evaluate = recovery_loop.Run.accumulate, recovery_loop.Run.evaluate

    def accumulate(self, stream):
        now[0] += 0.02
        return real_accumulate(self, stream)

    def evaluate(self, rows):
        now[0] += 0.03
        return real_evaluate(self, rows)

    monkeypatch.setattr(recovery_loop.Run, "accumulate", accumulate)
    monkeypatch.setattr(recovery_loop.Run, "evaluate", evaluate)
    _, model = pruned()
    config = RecoveryConfig(
        steps=None, minutes=0.05, lr=1e-3, **{**FAST, "warmup_steps": None, "eval_every": 50}
    )
    result = recover(model, TEXT, config, progress=False)
    assert result.stop_reason == "time" and result.budget == "time"
    rows = result.history[1:]
    assert 140 <= len(rows) <= 147  # (3 s - 3 or 4 evaluations) / 20 ms
    assert rows[0]["lr"] == pytest.approx(config.lr * (0.05 / 3) / 0.05)  # warming up
    lrs = [h["lr"] for h in rows]
    peak = max(range(len(rows)), key=lrs.__getitem__)
    # the LR of each update is computed from the elapsed time, which the row records
    assert rows[peak]["seconds"] <= 0.1 * result.seconds + (rows[1]["seconds"] - rows[0]["seconds"])
    assert lrs[peak] > 0.9 * config.lr and lrs[-1] < 0.1 * config.lr
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
    assert result.tokens == result.steps * config.batch_size * config.seq_len
    assert [h["tokens"] for h in rows] == [
        k * config.batch_size * config.seq_len for k in range(1, len(rows) + 1)
    ]
    assert result.steps_per_s == pytest.approx(result.steps / result.seconds)
    assert result.tokens_per_s == pytest.approx(result.tokens / result.seconds)
    assert f"{result.steps} steps" in result.summary()


def test_time_budget_progress_bar_counts_seconds(monkeypatch):
    """The bar counts seconds against a 3-minute budget: never a 10,000-step total."""
    from prunekit.core import recovery_loop

    now = [0.0]
    monkeypatch.setattr(recovery_loop, "clock", lambda: now[0])
    budget = recovery_loop.Budget(steps=10_000, seconds=180.0)
    bar = recovery_loop.Bar(budget, "recover", enabled=False)
    assert bar.timed and bar.bar.total == 180.0
    now[0] = 2.0  # the initial evaluation
    bar.start()
    for step in range(1, 5):
        now[0] += 7.0
        bar.update(step)
    assert bar.bar.n == pytest.approx(30.0) and bar.bar.total == 180.0
    assert bar.bar.postfix == f"step=4/~{4 + math.ceil(150 / 7)}"
    # a step budget that ends first: the total is re-estimated in seconds
    short = recovery_loop.Bar(recovery_loop.Budget(steps=6, seconds=180.0), "r", enabled=False)
    short.start()
    now[0] += 10.0
    short.update(1)
    assert short.bar.total == pytest.approx(60.0)


def test_pack_and_held_out_split_are_disjoint():
    stream = torch.arange(103)
    rows = pack(stream, 10)
    assert rows.shape == (10, 10) and torch.equal(rows.reshape(-1), torch.arange(100))
    assert pack(rows, 10) is not None and torch.equal(pack(rows, 10), rows)
    assert torch.equal(pack(rows, 25), torch.arange(100).reshape(4, 25))
    with pytest.raises(TypeError, match="integer"):
        pack(torch.rand(4, 10), 10)
    with pytest.raises(ValueError, match="seq_len"):
        pack(torch.arange(5), 10)
    train, held = split_data(stream, None, RecoveryConfig(seq_len=10, eval_samples=2, steps=1))
    assert held.shape == (2, 10) and train.shape == (8, 10)
    train_tokens = set(train.reshape(-1).tolist())
    assert not train_tokens & set(held.reshape(-1).tolist())
    train, held = split_data(stream, torch.arange(50), RecoveryConfig(seq_len=10, n_samples=3))
    assert train.shape == (3, 10) and held.shape == (5, 10)


def test_lm_loss_matches_transformers_shifted_loss():
    model, ids = tiny_model("qwen3"), TEXT[:48].reshape(2, 24)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(lm_loss(out.logits, ids), out.loss, atol=1e-6, rtol=0)


def test_distill_kl_against_hand_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    temp = 2.0
    p = torch.softmax(t / temp, -1)
    expected = (p * (p.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    torch.testing.assert_close(distill_kl(s, t, temp), expected, atol=1e-6, rtol=1e-6)
    assert distill_kl(s, s, temp).item() == pytest.approx(0.0, abs=1e-7)
    assert distill_kl(s, t, temp) > 0
    with pytest.raises(ValueError, match="vocabulary"):
        distill_kl(s, t[..., :10], temp)


# ---- LoRA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_targets_come_from_the_adapter(arch):
    model = tiny_model(arch)
    names = lora_target_names(model)
    n_layers = model.config.num_hidden_layers
    assert len(names) == 7 * n_layers  # q, k, v, o, gate, up, down
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_lora_near_removed_layers_only():
    _, model = pruned("llama", PrunePlan(layers=[3], heads={0: [0, 1, 2, 3]}))
    assert layers_near_pruning(model, radius=1) == [0, 2, 3]  # orig 2 and 4 (now 3), head-pruned 0
    assert layers_near_pruning(model, radius=2) == [0, 1, 2, 3]
    assert layers_near_pruning(tiny_model("llama"), radius=1) == []  # no plan applied
    config = RecoveryConfig(steps=15, lr=3e-3, lora_layers="near_removed", lora_radius=1, **FAST)
    seen = []
    real_attach = lora_module.attach_lora

    def spy(*args, **kwargs):
        wrapped = real_attach(*args, **kwargs)
        seen.append(
            sorted(
                {
                    n.split(".layers.")[1].split(".")[0]
                    for n, _ in wrapped.named_parameters()
                    if "lora_A" in n
                }
            )
        )
        return wrapped

    lora_module.attach_lora = spy
    try:
        result = recover(model, TEXT, config, progress=False)
    finally:
        lora_module.attach_lora = real_attach
    assert seen == [["0", "2", "3"]]
    assert result.best_eval_loss < result.initial_eval_loss and not has_lora_modules(model)
    with pytest.raises(ValueError, match=r"RecoveryConfig\.lora_layers\b"):
        RecoveryConfig(lora_layers="first")


def test_lora_merge_equals_adapter_outputs_and_leaves_no_adapter():
    _, model = pruned("llama", PrunePlan(layers=[2], heads={0: [0, 1, 2, 3]}, neurons={1: [5]}))
    shapes_before = {k: v.shape for k, v in model.state_dict().items()}
    ids = TEXT[:26].reshape(2, 13)
    base = logits(model, ids)
    wrapped = attach_lora(model, r=4, alpha=8)
    assert has_lora_modules(model)
    torch.manual_seed(3)
    with torch.no_grad():  # B starts at 0; make the adapters do something
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    with_adapter = logits(wrapped, ids)
    assert (with_adapter - base).abs().max() > 1e-2  # the adapters change the outputs
    merged = merge_lora(wrapped)
    assert merged is model and not has_lora_modules(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes_before
    torch.testing.assert_close(logits(model, ids), with_adapter, atol=1e-5, rtol=0)


# ---- each method lowers held-out loss ------------------------------------------------------
@pytest.mark.parametrize(
    "method, extra",
    [
        ("lora", dict(lr=3e-3)),
        ("full", dict(lr=1e-3)),
        ("distill", dict(lr=3e-3, alpha_lm=0.5)),
        ("distill", dict(lr=1e-3, distill_base="full")),
    ],
    ids=["lora", "full", "distill-lora", "distill-full"],
)
def test_method_lowers_held_out_loss(method, extra):
    dense, model = pruned()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = RecoveryConfig(method=method, steps=40, **FAST, **extra)
    result = recover(model, TEXT, config, teacher=dense, progress=False)
    assert result.steps == 40 and result.stop_reason == "steps"
    assert result.best_eval_loss < 0.9 * result.initial_eval_loss
    assert result.improved and result.best_step > 0
    assert not has_lora_modules(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training
    # the model really is in the reported best state
    _, held = split_data(TEXT, None, config)
    with torch.no_grad():
        if method == "distill":
            ref = distill_kl(logits(model, held), logits(dense, held), config.temperature)
            ref = config.alpha_kl * ref + config.alpha_lm * lm_loss(logits(model, held), held)
        else:
            ref = lm_loss(logits(model, held), held)
    assert ref.item() == pytest.approx(result.best_eval_loss, rel=1e-4)


def test_lora_on_per_layer_pruned_qwen3_keeps_shapes():
    plan = PrunePlan(heads={0: [0, 1, 2, 3], 3: [1, 5]}, neurons={2: list(range(40))})
    _, model = pruned("qwen3", plan)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    result = recover(model, TEXT, RecoveryConfig(steps=20, lr=3e-3, **FAST), progress=False)
    assert result.best_eval_loss < result.initial_eval_loss
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_full_recovery_keeps_tied_embeddings_tied():
    _, model = pruned()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    recover(model, TEXT, RecoveryConfig(method="full", steps=5, lr=1e-3, **FAST), progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- dtype ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_model_trains_with_fp32_optimizer_state_and_stays_bf16(method, monkeypatch):
    from prunekit.core import recovery_loop

    seen = []

    class Spy(recovery_loop.MasterOptimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(recovery_loop, "MasterOptimizer", Spy)
    _, model = pruned()
    model.to(torch.bfloat16)
    config = RecoveryConfig(method=method, steps=30, lr=3e-3 if method == "lora" else 1e-3, **FAST)
    result = recover(model, TEXT, config, progress=False)
    assert result.best_eval_loss < 0.9 * result.initial_eval_loss
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    (opt,) = seen
    assert all(m.dtype == torch.float32 for m in opt.masters)
    states = list(opt.optimizer.state.values())
    assert states and all(
        st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32 for st in states
    )
    if method == "full":  # the masters are fp32 copies, written back rounded to bf16
        assert all(m is not p for m, p in zip(opt.masters, opt.params, strict=True))
    else:  # peft keeps LoRA adapters in fp32 on a bf16 base: optimised directly
        assert all(m is p for m, p in zip(opt.masters, opt.params, strict=True))


def test_master_weights_keep_updates_bf16_would_round_away():
    """An update of 1e-4 on a weight of 1.0 is below bf16's resolution (2^-7 = 0.0078): a
    bf16 optimizer loses all 50 of them; the fp32 master accumulates them to 0.005, and the
    bf16 weight moves when the master has moved far enough."""
    from prunekit.core.recovery_loop import MasterOptimizer

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    config = RecoveryConfig(lr=1e-4, max_grad_norm=None)
    opt = MasterOptimizer([p], config)
    for _ in range(50):
        opt.zero_grad()
        p.grad = torch.full_like(p, -1.0)  # Adam's step is ~lr whatever the gradient scale
        opt.step(1e-4)
    assert opt.masters[0].dtype == torch.float32
    assert float(opt.masters[0].detach()[0]) == pytest.approx(1.005, abs=2e-4)
    assert float(p[0]) == float(opt.masters[0].detach()[0].to(torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    adam = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(50):
        plain.grad = torch.full_like(plain, -1.0)
        adam.step()
    assert float(plain[0]) == 1.0  # every update rounded away


# ---- distillation --------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["lora", "full"])
def test_distill_from_identical_teacher_is_zero(base):
    student = tiny_model("mistral")
    teacher = copy.deepcopy(student)
    before = state(student)
    config = RecoveryConfig(method="distill", distill_base=base, steps=3, **FAST)
    result = recover(student, TEXT, config, teacher=teacher, progress=False)
    assert result.initial_eval_loss == pytest.approx(0.0, abs=1e-6)
    assert result.history[1]["train_loss"] == pytest.approx(0.0, abs=1e-6)  # before 1st update
    assert result.best_step == 0  # nothing beats zero, so the initial weights are kept
    for k, v in state(student).items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def _first_step_loss(dense, config, teacher_kind: str, k: int | None = None) -> float:
    from prunekit.core.teacher_cache import TeacherCache

    student = apply_plan(copy.deepcopy(dense), PrunePlan(layers=[1, 3]))
    if teacher_kind == "cache":
        teacher = TeacherCache.build(dense, TEXT, config, k=k, dtype=torch.float32)
    else:
        teacher = dense
    result = recover(student, TEXT, config, teacher=teacher, progress=False)
    return result.history[1]["train_loss"], result.initial_eval_loss


def test_distill_from_full_vocab_cache_equals_live_teacher():
    dense = tiny_model("llama")
    config = RecoveryConfig(method="distill", steps=1, alpha_lm=0.3, **FAST)
    live = _first_step_loss(dense, config, "live")
    cached = _first_step_loss(dense, config, "cache", k=VOCAB)
    assert cached == pytest.approx(live, rel=1e-5)
    top16 = _first_step_loss(dense, config, "cache", k=16)  # top-k truncation: a lower bound
    assert top16[0] < live[0] and top16[0] == pytest.approx(live[0], rel=0.35)


def test_topk_kl_equals_full_kl_at_full_k_and_bounds_it_below():
    from prunekit.core.training import LOG_ZERO, TeacherTopK, distill_topk_kl

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), 3 * torch.randn(2, 5, 11, generator=g)
    temp = 2.0
    logp = torch.log_softmax(t / temp, -1)

    def topk(k):
        top, index = logp.topk(k, -1)
        rest = logp.scatter(-1, index, LOG_ZERO).logsumexp(-1).clamp_min(LOG_ZERO)
        return TeacherTopK(top, index, rest, temp)

    full = distill_kl(s, t, temp)
    torch.testing.assert_close(distill_topk_kl(s, topk(11), temp), full, atol=1e-6, rtol=1e-6)
    for k in (1, 3, 6):
        assert distill_topk_kl(s, topk(k), temp) <= full + 1e-6
    assert distill_topk_kl(t, topk(4), temp).item() == pytest.approx(0.0, abs=1e-6)
    student = s.clone().requires_grad_(True)
    distill_topk_kl(student, topk(11), temp).backward()
    assert torch.isfinite(student.grad).all()  # no NaN from the empty rest bucket
    with pytest.raises(ValueError, match="temperature"):
        distill_topk_kl(s, topk(3), 1.0)


def test_cache_is_small_on_disk_checks_its_rows_and_is_removed():
    import gc

    from prunekit.core.teacher_cache import TeacherCache

    dense, student = pruned()
    config = RecoveryConfig(method="distill", steps=2, **FAST)
    cache = TeacherCache.build(dense, TEXT, config, k=8)
    train, held = split_data(TEXT, None, config)
    n_tokens = (train.shape[0] + held.shape[0]) * config.seq_len
    assert cache.nbytes == n_tokens * (8 * (2 + 4) + 4)  # fp16 values, int32 indices, rest
    assert cache.index.dtype == np.int32 and cache.logp.dtype == np.float16
    directory = cache.directory
    assert sorted(p.name for p in directory.iterdir()) == ["index.bin", "logp.bin", "rest.bin"]
    with pytest.raises(ValueError, match="other token rows"):
        recover(student, TEXT[12:], config, teacher=cache, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        other = RecoveryConfig(method="distill", steps=2, temperature=1.0, **FAST)
        recover(student, TEXT, other, teacher=cache, progress=False)
    result = recover(student, TEXT, config, teacher=cache, progress=False)
    assert result.steps == 2
    del cache
    gc.collect()
    assert not directory.exists()


def test_distill_from_cache_lowers_held_out_loss_without_a_teacher_copy(monkeypatch):
    from prunekit.core.teacher_cache import TeacherCache

    dense = tiny_model("llama")
    config = RecoveryConfig(method="distill", steps=40, lr=3e-3, alpha_lm=0.5, **FAST)
    cache = TeacherCache.build(dense, TEXT, config)  # before pruning
    apply_plan(dense, PrunePlan(layers=[1, 3]))  # the same model object is now the student

    real_deepcopy = copy.deepcopy

    def no_model_copy(obj, *args, **kwargs):  # configs and dicts may still be copied
        if isinstance(obj, torch.nn.Module):
            raise AssertionError(f"copy.deepcopy of a {type(obj).__name__}")
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copy)
    result = recover(dense, cache.ids, config, teacher=cache, progress=False)
    assert result.best_eval_loss < 0.9 * result.initial_eval_loss


def test_compress_distils_from_a_cache_built_before_pruning(tmp_path, monkeypatch):
    """compress with distill: the dense model's top-k outputs are cached before pruning and
    no copy of the model is made; the recovery trains on the rows the cache holds."""
    from conftest import brown_text, tiny_tokenizer

    from prunekit.core import teacher_cache
    from prunekit.core.pipeline import compress

    (tmp_path / "calib.txt").write_text(brown_text()[:40_000], encoding="utf-8")
    recipe = {
        "targets": {"layers": 1, "mode": "uniform"},
        "calibration": {"source": str(tmp_path / "calib.txt"), "n_samples": 8, "seq_len": 32},
        "evaluation": {"text": "none", "latency": False},
        "recovery": {"method": "distill", "steps": 3, "options": {"distill_topk": 8}},
    }
    built = []
    real_build = teacher_cache.TeacherCache.build.__func__

    def spy_build(cls, teacher, ids, config, **kwargs):
        assert teacher.config.num_hidden_layers == 5  # still the dense model
        built.append(real_build(cls, teacher, ids, config, **kwargs))
        return built[-1]

    monkeypatch.setattr(teacher_cache.TeacherCache, "build", classmethod(spy_build))
    real_deepcopy = copy.deepcopy

    def no_model_copy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError(f"copy.deepcopy of a {type(obj).__name__}")
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copy)
    model = tiny_model("llama")
    result = compress(model, recipe, tmp_path / "out", tokenizer=tiny_tokenizer(), progress=False)
    assert model.config.num_hidden_layers == 4
    (cache,) = built
    assert cache.k == 8 and result.recovery[0]["steps"] == 3
    assert "teacher cache" in result.timings


def test_distill_needs_a_separate_teacher():
    dense, model = pruned()
    config = RecoveryConfig(method="distill", steps=1, **FAST)
    with pytest.raises(ValueError, match="needs teacher="):
        recover(model, TEXT, config, progress=False)
    with pytest.raises(ValueError, match="separate copy"):
        recover(model, TEXT, config, teacher=model, progress=False)


# ---- keep-best, budgets, early stopping ----------------------------------------------------
def test_diverging_run_restores_initial_weights_and_stops_early():
    _, model = pruned()
    # First learn the pattern: a wrecked model predicts ~uniformly (loss ~ ln 128), which
    # must count as worse, not better, than the starting point.
    recover(model, TEXT, RecoveryConfig(method="full", steps=30, lr=1e-3, **FAST), progress=False)
    before = state(model)
    config = RecoveryConfig(
        method="full",
        steps=50,
        lr=1e3,
        warmup_steps=0,
        patience=2,
        max_grad_norm=None,
        **{k: v for k, v in FAST.items() if k not in ("eval_every", "warmup_steps")},
        eval_every=1,
    )
    result = recover(model, TEXT, config, progress=False)
    assert result.initial_eval_loss < 4.0  # learned the pattern: well below ln 128 = 4.85
    assert result.stop_reason == "early stopping" and result.steps == 2
    assert result.best_step == 0 and not result.improved
    assert result.best_eval_loss == result.initial_eval_loss
    assert all(h["eval_loss"] > result.initial_eval_loss for h in result.history[1:])
    for k, v in state(model).items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_step_budget_schedule_and_history():
    _, model = pruned()
    config = RecoveryConfig(steps=12, lr=1e-3, **{**FAST, "eval_every": 5, "warmup_steps": 4})
    result = recover(model, TEXT, config, progress=False)
    assert [h["step"] for h in result.history] == list(range(13))
    assert [h["step"] for h in result.history if h["eval_loss"] is not None] == [0, 5, 10, 12]
    lrs = [h["lr"] for h in result.history[1:]]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and all(
        a >= b for a, b in zip(lrs[4:-1], lrs[5:], strict=True)
    )
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_time_budget_ends_training():
    _, model = pruned()
    config = RecoveryConfig(steps=None, minutes=0.6 / 60, lr=1e-3, **FAST)
    result = recover(model, TEXT, config, progress=False)
    assert result.stop_reason == "time"
    assert 1 <= result.steps and result.history[-1]["eval_loss"] is not None
    assert result.history[-1]["seconds"] < 0.6 + 5.0  # one step + the final evaluation


def test_gradient_accumulation_matches_a_large_batch():
    runs = []
    for batch_size, accum in ((4, 1), (2, 2)):
        _, model = pruned()
        config = RecoveryConfig(
            method="full",
            steps=3,
            lr=1e-3,
            batch_size=batch_size,
            grad_accum=accum,
            seq_len=24,
            eval_samples=4,
            warmup_steps=0,
            eval_every=100,
            patience=None,
        )
        result = recover(model, TEXT[:2400], config, progress=False)
        runs.append(([h["train_loss"] for h in result.history[1:]], state(model)))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for k in state_a:
        torch.testing.assert_close(state_a[k], state_b[k], atol=1e-5, rtol=1e-5)


# ---- results, saving, errors ---------------------------------------------------------------
STOCK = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model(input_ids=torch.load(sys.argv[2])).logits
torch.save(out, sys.argv[3])
assert "prunekit" not in sys.modules and "peft" not in sys.modules
"""


def test_recovered_model_saves_and_reloads_same_logits(tmp_path):
    dense, model = pruned(
        "llama", PrunePlan(layers=[0, 4], heads={i: [4, 5, 6, 7] for i in (1, 2, 3)})
    )
    config = RecoveryConfig(method="distill", steps=10, lr=3e-3, **FAST)
    result = recover(model, TEXT, config, teacher=dense, progress=False)
    assert result.improved
    ids = TEXT[:26].reshape(2, 13)
    expected = logits(model, ids)
    out = save_pretrained(model, tmp_path / "m", extra={"recovery": result.to_dict()})
    torch.save(ids, tmp_path / "ids.pt")
    code = STOCK.replace("sys.argv[1]", repr(str(out))).replace(
        "sys.argv[2]", repr(str(tmp_path / "ids.pt"))
    )
    proc = run_python(code.replace("sys.argv[3]", repr(str(tmp_path / "out.pt"))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=0)
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["recovery"]["best_step"] == result.best_step


def test_per_layer_recovered_model_reloads_with_prunekit(tmp_path):
    plan = PrunePlan(layers=[1], heads={0: [0, 1, 2, 3]}, neurons={2: list(range(30))})
    _, model = pruned("qwen2", plan)
    recover(model, TEXT, RecoveryConfig(method="lora", steps=10, lr=3e-3, **FAST), progress=False)
    ids = TEXT[:26].reshape(2, 13)
    expected = logits(model, ids)
    save_pretrained(model, tmp_path / "m")
    reloaded, _ = load_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded.eval(), ids), expected, atol=1e-5, rtol=0)


def test_result_serialises_and_plots(tmp_path):
    _, model = pruned()
    result = recover(model, TEXT, RecoveryConfig(steps=6, lr=1e-3, **FAST), progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["method"] == "lora" and data["config"]["steps"] == 6
    assert RecoveryResult(**data).best_eval_loss == result.best_eval_loss
    png = result.plot(tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_qlora_says_what_it_needs():
    method = get_plugins().recoveries.get("qlora")
    if method.available()[0]:  # pragma: no cover - only on a CUDA machine with bitsandbytes
        pytest.skip("bitsandbytes and CUDA are available here")
    _, model = pruned()
    before = state(model)
    with pytest.raises(RecoveryUnavailableError, match="bitsandbytes.*CUDA.*method='lora'"):
        recover(model, TEXT, RecoveryConfig(method="qlora", steps=1, **FAST), progress=False)
    for k, v in state(model).items():  # nothing was touched
        assert torch.equal(v, before[k])


def test_encoders_and_bad_ids_are_rejected():
    with pytest.raises(ValueError, match="causal language models"):
        recover(tiny_model("bert"), TEXT, RecoveryConfig(steps=1, **FAST), progress=False)
    with pytest.raises(TypeError, match="integer"):
        recover(tiny_model("llama"), TEXT.float(), RecoveryConfig(steps=1, **FAST))


# ---- real model (slow) ---------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_lora_recovery_on_brown_keeps_best_and_shapes():
    from prunekit.core.calibration import load_calibration
    from prunekit.core.data import brown_path
    from prunekit.core.models import default_model_dir

    model, tokenizer = load_pretrained(default_model_dir())
    apply_plan(model, PrunePlan(layers=[13, 14]))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ids = load_calibration(brown_path(), tokenizer, n_samples=10, seq_len=32, seed=0)
    config = RecoveryConfig(
        steps=3, lr=1e-3, seq_len=32, batch_size=2, eval_every=1, eval_samples=2, warmup_steps=1
    )
    result = recover(model, ids, config, progress=False)
    assert result.steps == 3 and 2.0 < result.initial_eval_loss < 8.0
    assert result.best_eval_loss <= result.initial_eval_loss
    assert not has_lora_modules(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert model.config.num_hidden_layers == 28
