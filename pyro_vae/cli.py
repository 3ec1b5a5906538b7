"""The ``pyro-vae`` command.

::

    pyro-vae train CONFIG [--set section.key=value ...] [--run-dir DIR] [--overwrite] [--no-eval]
                          [--from-previous-checkpoint]
    pyro-vae evaluate RUN_DIR [--iw-samples K] [--split test] [--limit N] [--chunk-size C|auto] [--device D]
                              [--compile] [--matmul-precision P] [--decompose] [--sample-quality [--samples N]]
    pyro-vae sample RUN_DIR [-n N] [--mode greedy|sample|beam] [--interpolate A B] [--reconstruct S ...]
    pyro-vae classifier train [--epochs E]
    pyro-vae list

Exit codes: 0 done; 2 bad input (config, data, checkpoint, run directory:
the message names the problem and the fix); 3 training diverged; 130 / 143
stopped by SIGINT / SIGTERM after writing a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import get_args

from pyro_vae import registry
from pyro_vae.allocator import keep_freed_memory
from pyro_vae.config import MatmulPrecision, load_config
from pyro_vae.errors import ConfigError, PyroVAEError, TrainingInterrupted


def _train(args: argparse.Namespace) -> None:
    from pyro_vae.train import train_and_evaluate

    config = load_config(args.config, args.set)
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    report = train_and_evaluate(config, run_dir, overwrite=args.overwrite, progress=not args.quiet,
                                evaluate_after=not args.no_eval, from_previous=args.from_previous_checkpoint)
    if not report:  # a rank other than 0 of a torchrun job: rank 0 reports
        return
    if args.no_eval or config.eval.iw_samples == 0:
        print(json.dumps({k: v for k, v in report.items() if k not in ("eval", "evaluations")}, indent=2))
        return
    ev = report["eval"]
    print(json.dumps({k: v for k, v in report.items() if k not in ("eval", "evaluations")}
                     | {"eval": {k: v for k, v in ev.items() if k != "kl_per_dim"}}, indent=2))
    print(f"{ev['split']} ELBO {ev['elbo']:.2f} nats, {ev['split']} IS NLL (K={ev['iw_samples']}) "
          f"{ev['iw_nll']:.2f} nats  ->  {run_dir}")


def _given(value, default):
    """The command-line value where one was given (0 included), else the config's."""
    return default if value is None else value


def chunk_size(text: str) -> int | str:
    """An argparse type: ``auto`` or an integer >= 1."""
    return text if text == "auto" else positive_int(text)


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
    from pyro_vae.experiment import resolve_device
    from pyro_vae.rundir import RunDir, checkpoint_tag
    from pyro_vae.train import evaluate_run, record, save_latent_pictures

    run = RunDir(args.run_dir)
    device = resolve_device(args.device) if args.device else None
    experiment, state = run.load_trained(device, from_previous=args.from_previous_checkpoint)
    defaults = experiment.config.eval
    num_samples = _given(args.iw_samples, defaults.iw_samples)
    if args.sample_quality:
        _sample_quality(run, experiment, args.samples)
        if args.iw_samples is None:  # scoring samples alone; --iw-samples K asks for the IS evaluation too
            return
    if num_samples == 0:
        if not args.sample_quality:
            raise ConfigError(f"nothing to evaluate: {run.config_file} sets eval.iw_samples = 0 (a point-estimate "
                              f"guide has no density to importance-sample); pass --sample-quality to score samples, "
                              f"or --iw-samples K for a guide with a density")
        return
    result = evaluate_run(
        experiment,
        split=_given(args.split, defaults.split),
        num_samples=num_samples,
        chunk_size=_given(args.chunk_size, defaults.chunk_size),
        batch_size=_given(args.batch_size, defaults.batch_size),
        limit=args.limit,  # (the whole split by default: eval.limit bounds the evaluation after training)
        progress=not args.quiet,
        decompose=args.decompose or defaults.decompose,
        compile=args.compile or defaults.compile,
        matmul_precision=_given(args.matmul_precision, defaults.matmul_precision),
    )
    result.extra.update(epoch=state["epoch"], step_in_epoch=state.get("step_in_epoch", 0),
                        checkpoint=checkpoint_tag(state))
    summary = record(run, result)
    if args.decompose:
        save_latent_pictures(run, experiment, summary["kl_per_dim"])
    print(json.dumps(summary, indent=2))


def _sample_quality(run, experiment, num_samples: int) -> None:
    """Score the run's samples with the cached digit classifier; writes
    ``sample_quality.json`` and ``sample_quality.png`` into the run."""
    from pyro_vae.classifier import load_classifier, save_class_histogram, score_model_samples

    if experiment.config.data.name != "mnist":
        raise ConfigError(f"--sample-quality scores digits with the MNIST classifier; this run's data are "
                          f"{experiment.config.data.name!r}")
    classifier, info = load_classifier()
    reference = _gray_mnist()["test"]
    quality = score_model_samples(experiment.model, experiment.data.event_shape, classifier,
                                  reference.batch(slice(None)), num_samples)
    summary = {**quality.summary(), "classifier_test_accuracy": info["test_accuracy"]}
    run.write_json("sample_quality.json", summary)
    with run.atomic("sample_quality.png") as path:
        save_class_histogram(quality, path, f"{num_samples} samples of {run.path.name}")
    report = run.read_report()
    run.write_json("report.json", {**report, "sample_quality": summary})
    print(json.dumps({"sample_quality": summary}, indent=2))


def _gray_mnist():
    """MNIST as gray levels v / 255 on the CPU: what the classifier reads."""
    import torch

    registry.load_catalogue()
    return registry.DATASETS.build("mnist", {"binarization": "none"}, device=torch.device("cpu"))


def _classifier_train(args: argparse.Namespace) -> None:
    import torch

    from pyro_vae.classifier import classifier_path, save_classifier, score_images, train_classifier

    data = _gray_mnist()
    classifier, info = train_classifier(data, epochs=args.epochs, limit=args.limit, progress=not args.quiet)
    with torch.no_grad():
        test_features = classifier.features(data["test"].batch(slice(None)))
        real = score_images(classifier, data["valid"].batch(slice(None)), test_features)
    info["valid_images_scored"] = real.summary()  # what real digits score: the floor of the sample scores
    save_classifier(classifier, info, classifier_path())
    print(json.dumps(info, indent=2))
    print(f"test accuracy {info['test_accuracy']:.4f} (binarized {info['test_accuracy_binarized']:.4f})  ->  "
          f"{classifier_path()}")


def _sample(args: argparse.Namespace) -> None:
    from pyro_vae.rundir import RunDir
    from pyro_vae.sentences import SentenceVAE

    experiment, _ = RunDir(args.run_dir).load_trained()
    try:
        vae = SentenceVAE(experiment)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = {"temperature": args.temperature} if args.mode == "sample" else \
        {"beam_size": args.beam_size} if args.mode == "beam" else {}
    if args.seed is not None:
        import pyro

        pyro.set_rng_seed(args.seed)
    if args.interpolate:
        lines = vae.interpolate(*args.interpolate, steps=args.steps, mode=args.mode, **options)
    elif args.reconstruct:
        lines = [f"{s}\n> {r}" for s, r in zip(args.reconstruct, vae.reconstruct(args.reconstruct, args.mode, **options))]
    else:
        lines = vae.sample(args.n, args.mode, **options)
    print("\n".join(lines))


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
    train.add_argument("--overwrite", action="store_true",
                       help="delete RUN_DIR (its checkpoint included; each removed item is listed) and train from scratch")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.add_argument("--from-previous-checkpoint", action="store_true",
                       help="the newest checkpoint is corrupt: set it aside and resume from the previous one")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="evaluate a trained run: ELBO, IS NLL, KL, PSIS k-hat")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--iw-samples", type=positive_int,
                    help="K importance samples per datapoint (K=1 gives the ELBO; PSIS k-hat needs K >= 25)")
    ev.add_argument("--split", choices=["train", "valid", "test"])
    ev.add_argument("--limit", type=positive_int,
                    help="only the first N datapoints (default: the whole split; the run's eval.limit bounds "
                         "only the evaluation after training)")
    ev.add_argument("--chunk-size", type=chunk_size,
                    help='samples drawn at once (bounds memory); "auto": sized for the device')
    ev.add_argument("--batch-size", type=positive_int, help="datapoints evaluated at once")
    ev.add_argument("--compile", action="store_true",
                    help="compile each chunk's log weights with torch.compile (7-20 s for the first chunk shape, "
                         "once more for any other; faster on long evaluations, e.g. K=5000; the config's "
                         "eval.compile)")
    ev.add_argument("--matmul-precision", choices=get_args(MatmulPrecision),
                    help='the float32 matrix products\' operands: "ieee" float32 (default); "bf16" (CPUs) rounded '
                         'to bfloat16, about twice the throughput with AMX (the IS NLL moves by ~0.01 nats); '
                         '"tf32" (GPUs) rounded to TF32 (the config\'s eval.matmul_precision)')
    ev.add_argument("--decompose", action="store_true",
                    help="split the KL into index-code MI, total correlation and dimension-wise KL over the split "
                         "(and the MIG where the data have known factors); draws traversals.png and kl_per_dim.png")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to evaluate (default: the config's train.device)")
    ev.add_argument("--from-previous-checkpoint", action="store_true",
                    help="the newest checkpoint is corrupt: set it aside and use the previous one")
    ev.add_argument("--sample-quality", action="store_true",
                    help="score samples from the prior with the cached digit classifier (`pyro-vae classifier "
                         "train`): class histogram, mean confidence, entropy of the mean class distribution, "
                         "Frechet distance of classifier features to the test set (alone, unless --iw-samples "
                         "is given too)")
    ev.add_argument("--samples", type=positive_int, default=10_000, help="samples scored by --sample-quality")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_evaluate)

    sample = sub.add_parser("sample", help="decode sentences from a trained text run: samples from the prior, "
                                           "reconstructions, or an interpolation between two sentences")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("-n", type=positive_int, default=10, help="sentences drawn from the prior")
    sample.add_argument("--mode", choices=["greedy", "sample", "beam"], default="greedy",
                        help="decoding: the most probable word each step, a draw, or beam search")
    sample.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of --mode sample")
    sample.add_argument("--beam-size", type=positive_int, default=5)
    sample.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                        help="decode --steps codes evenly spaced between the codes of sentences A and B")
    sample.add_argument("--steps", type=positive_int, default=8)
    sample.add_argument("--reconstruct", nargs="+", metavar="SENTENCE", help="encode and decode these sentences")
    sample.add_argument("--seed", type=int, help="seed the prior draws and sampled words")
    sample.set_defaults(func=_sample)

    classifier = sub.add_parser("classifier", help="the MNIST digit classifier that scores samples")
    classifier_sub = classifier.add_subparsers(dest="action", required=True)
    ct = classifier_sub.add_parser("train", help="train it (MLP 784-512-10 with dropout) and store it in the cache")
    ct.add_argument("--epochs", type=positive_int, default=15)
    ct.add_argument("--limit", type=positive_int, help="train on the first N training images only")
    ct.add_argument("--quiet", action="store_true", help="no progress bar")
    ct.set_defaults(func=_classifier_train)

    ls = sub.add_parser("list", help="list every registered dataset, model, prior, guide and objective")
    ls.set_defaults(func=_list)
    return parser


class _Messages(logging.Handler):
    """The library's log records (resuming, skipped batches, removals) as
    ``pyro-vae: ...`` lines on stderr, clear of the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"pyro-vae: {record.getMessage()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logger = logging.getLogger("pyro_vae")
    handler = _Messages()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        args.func(args)
    except TrainingInterrupted as exc:
        print(f"pyro-vae: {exc}", file=sys.stderr)
        return exc.exit_code
    except PyroVAEError as exc:
        print(f"pyro-vae: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pyro-vae: interrupted; the run directory holds the last checkpoint", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
