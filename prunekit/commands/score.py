"""``prunekit score``: importance scores of a model on calibration text, as JSON and plots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prunekit.commands.apply import add_allow_pickle
from prunekit.commands.placement import add_device_args, device_kwargs
from prunekit.errors import DeviceError


def _amount(text: str) -> float | int:
    from prunekit.core.targets import parse_amount

    try:
        return parse_amount(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="score layers / heads / neurons on calibration text; write JSON and PNG plots",
        description="Run importance scorers on calibration samples. All forward-only scorers "
        "share one pass over the model (or one layer at a time with --sequential).",
    )
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL")
    add_allow_pickle(p)
    p.add_argument(
        "--calib",
        default=None,
        help="calibration text: file, folder of .txt, 'self', or datasets 'name[:config[:split]]'"
        " (default: the offline Brown corpus)",
    )
    p.add_argument(
        "--scorers",
        default="block_influence,angular_distance,taylor",
        help="comma-separated scorer names (see `prunekit plugins`)",
    )
    p.add_argument(
        "--scorer-opt",
        action="append",
        default=[],
        metavar="[SCORER.]KEY=VALUE",
        help="a scorer option (repeatable): 'SCORER.KEY=VALUE' sets it for that scorer, a plain "
        "'KEY=VALUE' for every requested scorer that has the option, e.g. "
        "--scorer-opt token=all or --scorer-opt taylor.granularity=vector "
        "(options: `prunekit plugins`)",
    )
    p.add_argument("-o", "--output", help="write the scores as JSON here")
    p.add_argument("--plots", help="write PNG plots into this directory")
    p.add_argument("--plan", help="write the plan drawn in the plots (JSON) here")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="seed of the window choice")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--sequential",
        action="store_true",
        help="score one layer at a time (a model directory is then read layer by layer)",
    )
    p.add_argument(
        "--layers",
        type=_amount,
        default=None,
        help="layers the drawn plan removes (fraction or count; default 0.25 when a layer "
        "scorer runs)",
    )
    p.add_argument("--heads", type=_amount, default=0, help="query heads the plan removes")
    p.add_argument("--neurons", type=_amount, default=0, help="MLP neurons the plan removes")
    p.add_argument("--mode", choices=("uniform", "per_layer"), default="uniform")
    p.add_argument("--protect-first", type=int, default=1)
    p.add_argument("--protect-last", type=int, default=1)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_device_args(p)
    p.set_defaults(func=run)


def _targets(args: argparse.Namespace, scorers: list) -> tuple[Any, dict[str, Any]]:
    """The targets of the plan drawn in the plots (the first requested scorer of each unit)
    and the scorer objects they use."""
    from prunekit.core.select import Targets

    by_unit: dict[str, Any] = {}
    for s in scorers:
        by_unit.setdefault(s.unit, s)
    layers = args.layers if args.layers is not None else (0.25 if "layers" in by_unit else 0)
    for unit, amount in (("layers", layers), ("heads", args.heads), ("neurons", args.neurons)):
        if amount and unit not in by_unit:
            raise ValueError(f"--{unit} needs a {unit} scorer in --scorers")
    names = {unit: s.name for unit, s in by_unit.items()}
    targets = Targets(
        layers=layers,
        heads=args.heads,
        neurons=args.neurons,
        layer_scorer=names.get("layers", "block_influence"),
        head_scorer=names.get("heads", "taylor"),
        neuron_scorer=names.get("neurons", "activation_frequency"),
        mode=args.mode,
        protect_first=args.protect_first,
        protect_last=args.protect_last,
    )
    used = {unit: s for unit, s in by_unit.items() if getattr(targets, unit)}
    return targets, used


def run(args: argparse.Namespace) -> int:
    from prunekit.contracts import build_config
    from prunekit.core.io import check_output_dir
    from prunekit.core.scores import get_scorer, score, scorer_options
    from prunekit.core.select import select

    placement = device_kwargs(args)  # a bad --device / --dtype fails before any loading
    if args.sequential and placement["device_map"] is not None:
        raise DeviceError(
            "--device-map", args.device_map, "--sequential loads one layer at a time; drop one"
        )
    # unknown scorers and options fail before any loading
    scorers = [get_scorer(n.strip()) for n in args.scorers.split(",") if n.strip()]
    configs = scorer_options(args.scorer_opt, scorers)
    for s in scorers:
        build_config(s, configs.get(s.name), section=f"--scorer-opt for {s.name}")
    if args.output and Path(args.output).is_dir():
        raise ValueError(f"-o {args.output} is a directory; give a JSON file path")
    if args.plots:
        check_output_dir(args.plots, overwrite=True)
    targets, used = _targets(args, scorers)
    _preflight(args, targets, used)
    model, samples = _load(args, placement)
    lazy = isinstance(model, str)  # a directory read layer by layer onto the device
    scores = score(
        model,
        samples,
        scorers,
        batch_size=args.batch_size,
        sequential=args.sequential,
        progress=not args.no_progress,
        configs=configs,
        **({"device": placement["device"], "dtype": placement["dtype"]} if lazy else {}),
    )
    scores.meta["calibration"] = {
        "source": args.calib or "brown",
        "n_samples": args.calib_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
    }
    scores.meta["model"] = str(args.model)
    removes = targets.layers or targets.heads or targets.neurons
    plan = select(scores, targets, scorers=used) if removes else None
    _report(args, scores, plan, targets, samples)
    return 0


def _preflight(args: argparse.Namespace, targets, used: dict[str, Any]) -> None:
    """From the config and the calibration source alone (no weights read): the model, the
    drawn plan's targets and --seq-len fit, the calibration text exists and is not empty."""
    from prunekit.core.data import check_source
    from prunekit.core.preflight import check_model_input

    check_model_input(
        args.model,
        targets=targets,
        scorers=used,
        seq_lens={"--seq-len": args.seq_len},
        gguf_file=args.gguf_file,
    )
    check_source(args.calib, "calibration")


def _load(args: argparse.Namespace, placement: dict[str, Any]):
    """The model (loaded with ``placement``; for lazy sequential scoring, its directory) and
    the calibration ids."""
    from prunekit.core.calibration import load_calibration

    progress = not args.no_progress
    path = Path(args.model)
    lazy = args.sequential and args.gguf_file is None and (path / "config.json").is_file()
    if lazy:
        from prunekit.core.io import _load_tokenizer

        model, tokenizer = str(path), _load_tokenizer(path)
    else:
        from prunekit.core.io import load_model

        model, tokenizer = load_model(
            args.model, gguf_file=args.gguf_file, allow_pickle=args.allow_pickle, **placement
        )
    if args.calib == "self" and lazy:
        raise ValueError("--calib self generates text with the model: drop --sequential")
    samples = load_calibration(
        args.calib,
        tokenizer,
        n_samples=args.calib_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        model=None if lazy else model,
        progress=progress,
    )
    return model, samples


def _report(args, scores, plan, targets, samples) -> None:
    names = scores.names()
    print(
        f"scored {', '.join(names)} on {samples.shape[0]} x {samples.shape[1]} tokens "
        f"in {scores.meta['seconds']:.1f} s"
    )
    for n in names:
        if scores.unit(n) == "layers":
            v = scores[n]
            v = v[0] if v.dim() == 2 else v
            order = v.argsort().tolist()
            print(
                f"{n}: lowest layers {order[:6]} (values "
                f"{', '.join(f'{float(v[i]):.4f}' for i in order[:6])})"
            )
    if plan is not None:
        print(f"plan ({targets.mode}): removes {plan.summary()}; layers {plan.layers}")
    if args.output:
        scores.to_json(args.output)
        print(f"wrote {args.output}")
    if args.plan and plan is not None:
        plan.to_json(args.plan)
        print(f"wrote {args.plan}")
    if args.plots:
        from prunekit.core.plots import plot_scores

        for p in plot_scores(scores, plan, args.plots, targets=targets):
            print(f"wrote {p}")
