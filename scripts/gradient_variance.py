"""How noisy is each gradient estimator?  Measured on real MNIST.

For a trained run (``--run-dir``) or a config at initialisation
(``--config``), draw ``--draws`` independent estimates ``g_1..g_G`` of the
gradient of the objective with respect to the *encoder's* parameters ``phi``,
all on the same minibatch ``x`` (fixed binarization), for each estimator, and
report:

- ``variance``: the trace of the covariance, ``sum_p Var[g_p]`` (per
  datapoint of the minibatch: the minibatch gradient is divided by ``B``);
- ``snr``: ``|E[g]| / sqrt(tr Cov[g])``, one draw's signal-to-noise ratio;
- ``bias``: ``|mean(g) - g_ref| / |g_ref|`` against a high-sample reference
  ``g_ref`` (the mean of ``--reference-draws`` draws of an unbiased
  estimator of the ELBO gradient), beside ``noise``, the same ratio that
  Monte-Carlo error alone would give, ``sqrt((tr Cov / G) + (tr Cov_ref / R)) / |g_ref|``:
  an unbiased estimator has ``bias`` of the order of ``noise``;
- ``ms``: milliseconds per estimate.

NVIL's encoder gradient is multiplied back by its normaliser ``max(1, sd)``
so that every row estimates the same gradient.  Estimators with state of their own (a neural baseline, running moments) are
warmed up first: ``--warmup`` steps that train only that state, the model
and guide held fixed.  An estimator is named as in ``[objective]``, with
options after a colon (``vimco:num_particles=5``); a trailing ``@score``
draws the guide's latents without ``rsample`` (``trace_elbo@score``: the
score-function estimator on a Gaussian-latent model).

Writes ``<out>.csv``, ``<out>.md`` (a markdown table) and ``<out>.png``::

    python scripts/gradient_variance.py --run-dir runs/mnist_sbn_linear --out docs/gradient_variance_sbn
    python scripts/gradient_variance.py --config configs/mnist_gaussian.toml --reference meanfield_elbo \\
        --estimators trace_elbo meanfield_elbo trace_elbo@score nvil@score --out docs/gradient_variance_gaussian
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae import registry
from pyro_vae.config import load_config, parse_override
from pyro_vae.distributions import ScoreFunctionOnly
from pyro_vae.experiment import Experiment
from pyro_vae.objectives import Objective
from pyro_vae.rundir import RunDir
from pyro_vae.train import make_optimizer

BERNOULLI_ESTIMATORS = [
    "trace_elbo", "tracegraph_elbo:baseline=decaying_avg", "tracegraph_elbo:baseline=neural",
    "meanfield_elbo", "nvil", "vimco:num_particles=5", "disarm", "relaxed", "straight_through",
]


@dataclass
class Spec:
    """An estimator as named on the command line."""

    text: str
    name: str
    options: dict
    score_only: bool

    @classmethod
    def parse(cls, text: str) -> "Spec":
        body, _, flag = text.partition("@")
        name, _, rest = body.partition(":")
        options = {}
        for item in filter(None, rest.split(",")):
            key, value = parse_override(item)
            options[key[0]] = value
        return cls(text, name, options, flag == "score")


def build_objective(spec: Spec, experiment: Experiment) -> Objective:
    guide = ScoreFunctionOnly()(experiment.guide) if spec.score_only else experiment.guide
    objective = registry.OBJECTIVES.build(spec.name, spec.options)(experiment.model, guide)
    return objective.to(experiment.device)


def warm_up(objective: Objective, experiment: Experiment, steps: int, batch_size: int, lr: float) -> None:
    """Train the objective's own parameters and running state for ``steps``
    batches, the model and guide held fixed."""
    own = [p for name, p in objective.named_parameters() if not name.startswith(("model.", "guide."))]
    if not objective.own_state_dict() or steps == 0:  # own parameters and buffers
        return
    optimizer = make_optimizer([{"params": own}], lr) if own else None
    train = experiment.data["train"]
    generator = torch.Generator(device=experiment.device).manual_seed(0)
    objective.train()
    batches = iter(())
    for _ in tqdm(range(steps), desc=f"warm-up {objective.__class__.__name__}", leave=False):
        x = next(batches, None)
        if x is None:
            batches = train.batches(batch_size, shuffle=True, generator=generator)
            x = next(batches)
        loss = objective(x)  # in train mode: running averages update
        if optimizer is not None:
            for p, g in zip(own, torch.autograd.grad(loss, own)):
                p.grad = g
            optimizer.step()


def gradient(objective: Objective, params: list[torch.Tensor], x: torch.Tensor, replicas: int = 1) -> torch.Tensor:
    """One estimate of the gradient of the objective (``-loss``) with respect
    to ``params``, per datapoint of ``x``, flattened; with ``replicas > 1``
    the mean of that many independent estimates (the batch repeated)."""
    batch = x.repeat(replicas, *([1] * (x.dim() - 1))) if replicas > 1 else x
    grads = torch.autograd.grad(-objective(batch), params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return flat.double() / batch.shape[0] * _encoder_scale(objective)


def _encoder_scale(objective: Objective) -> float:
    """NVIL divides the encoder's gradient by ``max(1, sd)`` (an adaptive step
    size); undone here, so that every row estimates the same gradient."""
    return float(objective.signal_scale()) if hasattr(objective, "signal_scale") else 1.0


def moments(objective: Objective, params, x, draws: int, replicas: int = 1, desc: str = "") -> dict:
    """Mean, trace of the covariance, and seconds per estimate over ``draws`` estimates."""
    total = square = None
    start = time.perf_counter()
    for _ in tqdm(range(draws), desc=desc, leave=False):
        g = gradient(objective, params, x, replicas)
        total = g if total is None else total + g
        square = g * g if square is None else square + g * g
    seconds = (time.perf_counter() - start) / draws
    mean = total / draws
    variance = (square / draws - mean * mean).clamp(min=0).sum().item() * draws / (draws - 1)
    return {"mean": mean, "variance": variance, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a trained run: its checkpoint's model and guide")
    source.add_argument("--config", type=Path, help="a config: its model and guide at initialisation")
    parser.add_argument("--estimators", nargs="+", default=BERNOULLI_ESTIMATORS)
    parser.add_argument("--reference", default="disarm", help="unbiased estimator of the ELBO gradient for the reference")
    parser.add_argument("--reference-draws", type=int, default=20_000)
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2000, help="steps that train an estimator's own baseline")
    parser.add_argument("--warmup-lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("gradient_variance"))
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.run_dir:
        experiment, state = RunDir(args.run_dir).load_trained(device)
        where = f"{args.run_dir} (epoch {state['epoch']})"
    else:
        experiment = Experiment.build(load_config(args.config, ["train.device=" + args.device]), device)
        where = f"{args.config} at initialisation"
    pyro.set_rng_seed(args.seed)
    x = experiment.data["train"].batch(slice(0, args.batch_size), torch.Generator(device=device).manual_seed(args.seed))
    params = list(experiment.guide.parameters())
    for p in experiment.model.parameters():
        p.requires_grad_(False)  # only the encoder's gradient is measured

    reference_spec = Spec.parse(args.reference)
    reference = build_objective(reference_spec, experiment)
    reference.prepare(x[:2])
    warm_up(reference, experiment, args.warmup, args.batch_size, args.warmup_lr)
    reference.eval()
    replicas = 50  # one backward pass averages this many independent draws
    reference_passes = max(2, args.reference_draws // replicas)
    ref = moments(reference, params, x, reference_passes, replicas, desc=f"reference {args.reference}")
    ref_norm = ref["mean"].norm().item()
    ref_noise = ref["variance"] / reference_passes  # squared error of the reference mean

    rows = []
    for text in args.estimators:
        spec = Spec.parse(text)
        objective = build_objective(spec, experiment)
        objective.prepare(x[:2])
        warm_up(objective, experiment, args.warmup, args.batch_size, args.warmup_lr)
        objective.eval()
        stats = moments(objective, params, x, args.draws, desc=text)
        rows.append({
            "estimator": text,
            "variance": stats["variance"],
            "snr": stats["mean"].norm().item() / math.sqrt(stats["variance"]),
            "bias": (stats["mean"] - ref["mean"]).norm().item() / ref_norm,
            "noise": math.sqrt(stats["variance"] / args.draws + ref_noise) / ref_norm,
            "ms": 1000 * stats["seconds"],
        })
        tqdm.write(f"{text:<40} variance {rows[-1]['variance']:.4g}  snr {rows[-1]['snr']:.3g}  "
                   f"bias {rows[-1]['bias']:.3f} (noise {rows[-1]['noise']:.3f})  {rows[-1]['ms']:.1f} ms")
    write_outputs(rows, args, where)


def write_outputs(rows: list[dict], args, where: str) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Encoder-gradient estimators on {where}: {args.draws} draws each on one minibatch of "
        f"{args.batch_size} training images; reference: {args.reference} over {args.reference_draws} draws.",
        "",
        "| estimator | variance (tr Cov) | SNR | bias / noise floor | ms per estimate |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| `{r['estimator']}` | {r['variance']:.3g} | {r['snr']:.3g} | {r['bias']:.3f} / {r['noise']:.3f} "
              f"| {r['ms']:.1f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out.with_suffix(".png"), where)
    print("\n".join(lines))


def plot(rows: list[dict], path: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.4), dpi=120)
    names = [r["estimator"] for r in rows]
    biased = [r["bias"] > 3 * r["noise"] for r in rows]  # further from the reference than noise explains
    ax.barh(names, [r["variance"] for r in rows], color=["tab:orange" if b else "tab:blue" for b in biased])
    ax.set_xscale("log")
    ax.set_xlim(right=10 * max(r["variance"] for r in rows))  # room for the labels
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        ax.text(r["variance"], i, f"  {r['ms']:.1f} ms" + ("  (biased)" if biased[i] else ""), va="center", fontsize=8)
    ax.set_xlabel("variance of the encoder gradient (trace of covariance, log scale)")
    ax.set_title(f"gradient estimators on {where}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
