"""The ``pyro-vae`` command.

::

    pyro-vae train CONFIG [--set section.key=value ...] [--run-dir DIR] [--overwrite]
    pyro-vae evaluate RUN_DIR [--iw-samples K] [--split test] [--limit N] [--chunk-size C]
    pyro-vae list
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pyro_vae import registry
from pyro_vae.config import load_config
from pyro_vae.errors import PyroVAEError


def _train(args: argparse.Namespace) -> None:
    from pyro_vae.train import train_and_evaluate

    config = load_config(args.config, args.set)
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    report = train_and_evaluate(config, run_dir, overwrite=args.overwrite, progress=not args.quiet)
    ev = report["eval"]
    print(json.dumps({k: v for k, v in report.items() if k != "eval"}
                     | {"eval": {k: v for k, v in ev.items() if k != "kl_per_dim"}}, indent=2))
    print(f"{ev['split']} ELBO {ev['elbo']:.2f} nats, {ev['split']} IS NLL (K={ev['iw_samples']}) "
          f"{ev['iw_nll']:.2f} nats  ->  {run_dir}")


def _given(value, default):
    """The command-line value where one was given (0 included), else the config's."""
    return default if value is None else value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1, refused with a message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _evaluate(args: argparse.Namespace) -> None:
    from pyro_vae.rundir import RunDir
    from pyro_vae.train import evaluate_run

    run = RunDir(args.run_dir)
    experiment, state = run.load_trained()
    defaults = experiment.config.eval
    result = evaluate_run(
        experiment,
        split=_given(args.split, defaults.split),
        num_samples=_given(args.iw_samples, defaults.iw_samples),
        chunk_size=_given(args.chunk_size, defaults.chunk_size),
        batch_size=_given(args.batch_size, defaults.batch_size),
        limit=args.limit,
        progress=not args.quiet,
    )
    result.extra["epoch"] = state["epoch"]
    summary = result.summary()
    split = summary["split"]
    run.write_json(f"eval_{split}.json", summary)
    np.savez(run / f"eval_{split}_per_datapoint.npz", elbo=result.elbo,
             log_likelihood=result.log_likelihood, khat=result.khat)
    print(json.dumps(summary, indent=2))


def _list(args: argparse.Namespace) -> None:
    registry.load_catalogue()
    for section, table in registry.ALL.items():
        print(f"[{section}]")
        for entry in table.entries():
            print(f"  {entry.name:<18} {entry.description}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders in Pyro.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a config, then evaluate it")
    train.add_argument("config", help="TOML experiment file, e.g. configs/mnist_gaussian.toml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--run-dir", type=Path, help="where to write the run (default runs/<config name>)")
    train.add_argument("--overwrite", action="store_true", help="delete RUN_DIR first and train from scratch")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="evaluate a trained run: ELBO, IS NLL, KL, PSIS k-hat")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--iw-samples", type=positive_int,
                    help="K importance samples per datapoint (K=1 gives the ELBO; PSIS k-hat needs K >= 25)")
    ev.add_argument("--split", choices=["train", "valid", "test"])
    ev.add_argument("--limit", type=positive_int, help="only the first N datapoints")
    ev.add_argument("--chunk-size", type=positive_int, help="samples drawn at once (bounds memory)")
    ev.add_argument("--batch-size", type=positive_int, help="datapoints evaluated at once")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_evaluate)

    ls = sub.add_parser("list", help="list every registered dataset, model, prior, guide and objective")
    ls.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PyroVAEError as exc:
        print(f"pyro-vae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-vae: interrupted; finished epochs are in the run directory's checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
