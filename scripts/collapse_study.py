"""The posterior-collapse study: the sentence VAE trained with each remedy,
beside the plain LSTM language model of the same size.

Each run is ``pyro-vae train CONFIG`` with the remedy's overrides, in its own
run directory under ``--out`` (so a stopped study resumes where it was: a run
already evaluated at the study's epochs is read, not retrained), with
``train.latent_diagnostics`` on, so every epoch records the valid KL, the
mutual information I(x; z) and the active units, and ``eval.decompose`` on,
so the final evaluation has them too.  Written: ``OUT/study.csv``,
``OUT/study.md`` (test IS NLL, per-word perplexity, KL, MI, AU, ELBO, train
time) and ``OUT/study.png`` (KL, MI and AU over training, one line per run)::

    python scripts/collapse_study.py --out runs/collapse_study --parallel 2
    python scripts/collapse_study.py --runs vanilla cyclical free_bits cyclical+free_bits lm --quick

Remedies (names combine with ``+``): ``vanilla``, ``linear`` and ``sigmoid``
KL annealing (over the first ``--anneal-epochs``), ``cyclical`` (Fu et al.
2019: 4 cycles over all the epochs' steps), ``word_dropout`` (0.3 of the
decoder's inputs), ``free_bits`` (0.25 nats per dimension), ``kl_weight``
(0.5), ``aggressive`` (He et al. 2019, the phase's I(x; z) checked every
tenth of an epoch: a phase step costs min(inner_steps, 20) + 1 ordinary
ones or more, so an epoch-long phase would cost the study that many
epochs); ``lm`` is the decoder with z ignored.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REMEDIES = {
    "vanilla": [],
    "linear": ["objective.kl_annealing=linear", "objective.anneal_steps={anneal}"],
    "sigmoid": ["objective.kl_annealing=sigmoid", "objective.anneal_steps={anneal}"],
    "cyclical": ["objective.kl_annealing=cyclical", "objective.anneal_steps={total}", "objective.cycles=4"],
    "word_dropout": ["model.word_dropout=0.3"],
    "free_bits": ["objective.free_bits=0.25"],
    "kl_weight": ["objective.kl_weight=0.5"],
    "aggressive": ["objective.aggressive=true", "objective.mi_every={tenth}"],
    "lm": ["model.condition=none"],
}
DEFAULT_RUNS = ["lm", "vanilla", "linear", "cyclical", "word_dropout", "free_bits", "aggressive", "cyclical+free_bits"]
QUICK = ["data.limit=300", "model.embedding=16", "model.hidden=32", "guide.embedding=16", "guide.hidden=32",
         "eval.iw_samples=10", "eval.limit=50", "train.latent_diagnostics=50", "train.device=cpu",
         "objective.inner_steps=10"]
COLUMNS = ["run", "test_is_nll", "perplexity", "kl", "mutual_information", "active_units", "elbo", "train_minutes"]


def overrides(name: str, epochs: int, anneal_epochs: int, steps_per_epoch: int) -> list[str]:
    """The ``--set`` overrides of a remedy or a ``+`` combination of them."""
    out = []
    for part in name.split("+"):
        if part not in REMEDIES:
            raise SystemExit(f"unknown remedy {part!r}; choose from {', '.join(REMEDIES)} (combine with +)")
        out += [o.format(anneal=anneal_epochs * steps_per_epoch, total=epochs * steps_per_epoch,
                         tenth=max(1, steps_per_epoch // 10)) for o in REMEDIES[part]]
    return out


def finished(run: Path, epochs: int) -> bool:
    report = run / "report.json"
    return report.is_file() and json.loads(report.read_text()).get("eval", {}).get("epoch") == epochs


def train(name: str, args, steps_per_epoch: int) -> Path:
    run = args.out / name.replace("+", "_and_")
    if finished(run, args.epochs):
        return run
    command = [sys.executable, "-m", "pyro_vae.cli", "train", str(args.config), "--run-dir", str(run), "--quiet",
               "--set", f"train.epochs={args.epochs}", "--set", f"train.latent_diagnostics={args.diagnostics}",
               "--set", "eval.decompose=true"]
    for o in (QUICK if args.quick else []) + args.set + overrides(name, args.epochs, args.anneal_epochs,
                                                                  steps_per_epoch):
        command += ["--set", o]
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "study.log", "a") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"run {name} failed; see {run / 'study.log'}")
    return run


def summary(name: str, run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    ev = report["eval"]
    parts = ev.get("decomposition", {})
    return {"run": name, "test_is_nll": ev["iw_nll"], "perplexity": ev.get("perplexity"), "kl": ev["kl"],
            "mutual_information": parts.get("mutual_information", {}).get("mean"),
            "active_units": parts.get("active_units"), "elbo": ev["elbo"],
            "train_minutes": report["train_seconds"] / 60, "iw_samples": ev["iw_samples"]}


def history(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def markdown(rows: list[dict]) -> str:
    k = rows[0]["iw_samples"]
    lines = [f"| run | test IS NLL (K={k}) | perplexity | KL | MI | AU | ELBO | train time |", "|---" * 8 + "|"]
    for r in rows:
        # (the MI estimate is a Monte-Carlo difference, a hair below 0 for a collapsed run: shown as 0.00, not -0.00)
        mi = f"{round(r['mutual_information'], 2) + 0.0:.2f}" if r["mutual_information"] is not None else "n/a"
        lines.append(f"| {r['run']} | {r['test_is_nll']:.2f} | {r['perplexity']:.1f} | {r['kl']:.2f} | {mi} | "
                     f"{r['active_units']} | {r['elbo']:.2f} | {r['train_minutes']:.1f} min |")
    return "\n".join(lines)


def plot(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
    for name, run in runs.items():
        rows = history(run)
        epochs = [int(r["epoch"]) for r in rows]
        for ax, key in zip(axes, ("valid_kl", "valid_mutual_information", "valid_active_units")):
            ax.plot(epochs, [float(r[key]) for r in rows], marker="o", markersize=3, label=name)
    for ax, title in zip(axes, ("KL(q(z|x) || p(z)), nats", "mutual information I(x; z), nats", "active units")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/ptb_sentence.toml"))
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="remedies, or combinations joined by +")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--anneal-epochs", type=int, default=4, help="length of linear and sigmoid annealing")
    parser.add_argument("--diagnostics", type=int, default=1000, help="valid datapoints for the per-epoch MI / AU")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once, each its own process")
    parser.add_argument("--quick", action="store_true", help="300 sentences a split, small widths: minutes in all")
    parser.add_argument("--out", type=Path, default=Path("runs/collapse_study"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. model.hidden=128), before the remedy's own")
    args = parser.parse_args()
    if args.quick:
        args.diagnostics = min(args.diagnostics, 50)
    steps_per_epoch = _steps_per_epoch(args)
    for name in args.runs:
        overrides(name, args.epochs, args.anneal_epochs, steps_per_epoch)  # unknown names fail before any training
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = dict(zip(args.runs, pool.map(lambda n: train(n, args, steps_per_epoch), args.runs)))
    rows = [summary(name, run) for name, run in runs.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (args.out / "study.md").write_text(table + "\n")
    plot(runs, args.out / "study.png")
    print(table)


def _steps_per_epoch(args) -> int:
    """Optimizer steps in an epoch of the study's config (for the annealing lengths)."""
    import math

    import torch

    from pyro_vae import registry
    from pyro_vae.config import load_config

    config = load_config(args.config, (QUICK if args.quick else []) + args.set)
    registry.load_catalogue(config.imports)
    data = registry.DATASETS.build(config.data.name, config.data.options, device=torch.device("cpu"))
    return math.ceil(len(data["train"]) / config.train.batch_size)


if __name__ == "__main__":
    main()
