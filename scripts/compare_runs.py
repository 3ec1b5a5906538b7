"""Several trained runs side by side: a markdown table and training curves.

For each run directory (after ``pyro-vae train``), reads ``metrics.csv`` and
``report.json`` and reports the steps and training time, the final and the
highest training ELBO (the one-sample ELBO averaged over an epoch's
minibatches), the final valid ELBO, and the headline evaluation (ELBO, IS NLL
and PSIS k-hat; see :func:`headline_evaluation`), and, for runs evaluated
with ``--decompose``, a second table of the ELBO's decomposition, the active
units and the MIG; the curves are the training ELBO per
optimizer step, one line per run::

    python scripts/compare_runs.py runs/mnist_sbn_linear_score runs/mnist_sbn_linear_nvil runs/mnist_sbn_linear \\
        --labels "score function" NVIL DisARM --out docs/sbn_training
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from pyro_vae import registry
from pyro_vae.rundir import RunDir, float32_products


def summarise(run: RunDir) -> dict:
    history = list(csv.DictReader(open(run / "metrics.csv")))
    report = json.loads((run / "report.json").read_text())
    config = run.load_config()
    registry.load_catalogue(config.imports)
    train_size = len(registry.DATASETS.build(config.data.name, config.data.options, device=torch.device("cpu"))["train"])
    steps_per_epoch = -(-min(train_size, config.train.limit or train_size) // config.train.batch_size)
    train = [float(row["train_elbo"]) for row in history]
    return {
        "objective": config.objective.name,
        "epochs": len(history),
        "steps": len(history) * steps_per_epoch,
        "hours": sum(float(row["seconds"]) for row in history) / 3600,
        "final_train_elbo": train[-1],
        "best_train_elbo": max(train),
        "valid_elbo": float(history[-1]["valid_elbo"]),
        "eval": headline_evaluation(report),
        "curve": ([(i + 1) * steps_per_epoch for i in range(len(train))], train),
    }


def headline_evaluation(report: dict) -> dict:
    """The run's evaluation to compare: of the latest checkpoint's
    evaluations over a whole split, the test split's with float32 products
    (not ``eval.matmul_precision`` bf16 or tf32) and the largest K, the newest of equals
    (reports written before evaluations were kept have only ``eval``)."""
    evaluations = report.get("evaluations") or [report["eval"]]
    latest = max(e.get("epoch", 0) for e in evaluations)
    whole = [e for e in evaluations if not e.get("limit") and e.get("epoch", 0) == latest] or evaluations
    order = {id(e): i for i, e in enumerate(evaluations)}  # later in the list = newer (the clock has seconds only)
    return max(whole, key=lambda e: (e["split"] == "test", float32_products(e), e["iw_samples"], order[id(e)]))


def table(rows: list[dict], labels: list[str]) -> str:
    split = rows[0]["eval"]["split"]
    k = rows[0]["eval"]["iw_samples"]
    lines = [f"| estimator | steps | training time | train ELBO (final / best) | valid ELBO | {split} ELBO | "
             f"{split} IS NLL (K={k}) | PSIS k-hat (mean / >0.7) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in zip(labels, rows):
        ev = r["eval"]
        khat = (f"{ev['psis_khat']:.2f} / {100 * ev['psis_khat_frac_above_0.7']:.0f}%"
                if ev.get("psis_khat") is not None else "n/a")
        lines.append(f"| {label} (`{r['objective']}`) | {r['steps']:,} | {r['hours']:.2f} h | "
                     f"{r['final_train_elbo']:.2f} / {r['best_train_elbo']:.2f} | {r['valid_elbo']:.2f} | "
                     f"{ev['elbo']:.2f} | {ev['iw_nll']:.2f} | {khat} |")
    return "\n".join(lines)


def decomposition_table(rows: list[dict], labels: list[str]) -> str:
    """The headline evaluations' ELBO decomposition (``--decompose``), active
    units and MIG, one row per run; ``n/a`` where a run has none."""
    first = rows[0]["eval"]
    lines = [f"| run | {first['split']} ELBO | IS NLL (K={first['iw_samples']}) | reconstruction | index-code MI | "
             "total correlation | dimension-wise KL | KL | active units | MIG |", "|---" * 10 + "|"]
    for label, r in zip(labels, rows):
        ev, parts = r["eval"], r["eval"].get("decomposition")
        cells = ["n/a"] * 5 if parts is None else [
            f"{parts[k]['mean']:.2f} ± {parts[k]['se']:.2f}"
            for k in ("reconstruction", "mutual_information", "total_correlation", "dimensionwise_kl", "kl")]
        units = parts["active_units"] if parts else "n/a"
        mig = f"{ev['mig']['mig']:.3f}" if "mig" in ev else "n/a"
        lines.append(f"| {label} (`{r['objective']}`) | {ev['elbo']:.2f} | {ev['iw_nll']:.2f} | "
                     f"{' | '.join(cells)} | {units} | {mig} |")
    return "\n".join(lines)


def plot(rows: list[dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for label, r in zip(labels, rows):
        steps, elbo = r["curve"]
        ax.plot(steps, elbo, label=label)
    late = [v for r in rows for v in r["curve"][1][len(r["curve"][1]) // 20:]]
    ax.set_ylim(min(late) - 2, max(late) + 2)  # past the first 5% of training
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("train ELBO (nats, epoch mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", help="one per run (default: the directory names)")
    parser.add_argument("--out", type=Path, default=Path("comparison"), help="writes OUT.md and OUT.png")
    args = parser.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    rows = [summarise(RunDir(run)) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = table(rows, labels)
    if any("decomposition" in r["eval"] for r in rows):
        text += "\n\n" + decomposition_table(rows, labels)
    args.out.with_suffix(".md").write_text(text + "\n")
    plot(rows, labels, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
