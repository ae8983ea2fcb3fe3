"""``prunekit score``: importance scores of a model on calibration text, as JSON and plots."""

from __future__ import annotations

import argparse


def _amount(text: str) -> float | int:
    value = float(text)
    if value >= 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"{text}: a count must be an integer")
        return int(value)
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="score layers / heads / neurons on calibration text; write JSON and PNG plots",
        description="Run importance scorers on calibration samples. All forward-only scorers "
        "share one pass over the model (or one layer at a time with --sequential).",
    )
    p.add_argument("model", help="model directory, hub id, or .gguf file")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prunekit.core.calibration import load_calibration
    from prunekit.core.io import check_output_dir
    from prunekit.core.scores import get_scorer, score
    from prunekit.core.select import Targets, select

    names = [s.strip() for s in args.scorers.split(",") if s.strip()]
    scorers = {n: get_scorer(n) for n in names}  # unknown names fail before any loading
    if args.output and Path(args.output).is_dir():
        raise ValueError(f"-o {args.output} is a directory; give a JSON file path")
    if args.plots:
        check_output_dir(args.plots, overwrite=True)
    by_unit: dict[str, str] = {}
    for n, s in scorers.items():
        by_unit.setdefault(s.unit, n)
    layers = args.layers if args.layers is not None else (0.25 if "layers" in by_unit else 0)
    targets = Targets(
        layers=layers,
        heads=args.heads,
        neurons=args.neurons,
        layer_scorer=by_unit.get("layers", "block_influence"),
        head_scorer=by_unit.get("heads", "taylor"),
        neuron_scorer=by_unit.get("neurons", "activation_frequency"),
        mode=args.mode,
        protect_first=args.protect_first,
        protect_last=args.protect_last,
    )
    for unit, amount in (("layers", layers), ("heads", args.heads), ("neurons", args.neurons)):
        if amount and unit not in by_unit:
            raise ValueError(f"--{unit} needs a {unit} scorer in --scorers")

    progress = not args.no_progress
    path = Path(args.model)
    lazy = args.sequential and args.gguf_file is None and (path / "config.json").is_file()
    if lazy:
        from prunekit.core.io import _load_tokenizer

        model, tokenizer = str(path), _load_tokenizer(path)
    else:
        from prunekit.core.io import load_model

        model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
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
    scores = score(
        model,
        samples,
        names,
        batch_size=args.batch_size,
        sequential=args.sequential,
        progress=progress,
    )
    scores.meta["calibration"] = {
        "source": args.calib or "brown",
        "n_samples": args.calib_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
    }
    scores.meta["model"] = str(args.model)
    plan = select(scores, targets) if (layers or args.heads or args.neurons) else None
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
    return 0
