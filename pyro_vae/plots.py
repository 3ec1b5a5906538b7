"""Pictures of a trained model: prior samples, reconstructions, training curves.

Images are read off the site contract alone: the mean of the model's
likelihood at the observed site (for Bernoulli pixels, ``sigmoid(logits)``), from
the prior (``model(None, batch_size=n)``) or from latents drawn by the guide.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pyro.poutine as poutine
import torch
from torchvision.utils import make_grid, save_image

from pyro_vae.traces import OBSERVED_SITE, guide_and_model_traces


@torch.no_grad()
def prior_means(model: Callable, n: int, event_shape: Sequence[int]) -> torch.Tensor:
    """``E[x | z]`` for ``z ~ p(z)``: ``[n, *event_shape]``."""
    trace = poutine.trace(model).get_trace(None, batch_size=n)
    return trace.nodes[OBSERVED_SITE]["fn"].mean.reshape(n, *event_shape)


@torch.no_grad()
def reconstruction_means(model: Callable, guide: Callable, x: torch.Tensor) -> torch.Tensor:
    """``E[x | z]`` for ``z ~ q(z | x)``, shaped like ``x``."""
    _, model_trace = guide_and_model_traces(model, guide, x)
    return model_trace.nodes[OBSERVED_SITE]["fn"].mean.reshape(x.shape)


def save_samples(model: Callable, event_shape: Sequence[int], path: str | Path, n: int = 64) -> None:
    """A square grid of ``n`` samples from the prior."""
    save_image(prior_means(model, n, event_shape).clamp(0, 1), path, nrow=int(n**0.5), padding=2, pad_value=1.0)


def save_reconstructions(model: Callable, guide: Callable, x: torch.Tensor, path: str | Path, pairs_per_row: int = 8) -> None:
    """Pairs (data, reconstruction) side by side, ``pairs_per_row`` pairs a
    row, each column headed "data" or "recon."."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = torch.stack([x, reconstruction_means(model, guide, x)], dim=1).flatten(0, 1).clamp(0, 1)
    pad = 2
    grid = make_grid(pairs.cpu(), nrow=2 * pairs_per_row, padding=pad, pad_value=1.0)
    height, width = grid.shape[1:]
    cell = x.shape[-1] + pad
    fig, ax = plt.subplots(figsize=(width / 40, height / 40 + 0.35), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([pad / 2 + cell * (c + 0.5) for c in range(2 * pairs_per_row)])
    ax.set_xticklabels(["data", "recon."] * pairs_per_row, fontsize=6)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout(pad=0.1)
    fig.savefig(path)
    plt.close(fig)


def save_curves(history: list[dict], path: str | Path) -> None:
    """Train and valid ELBO per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    curves = {"train ELBO": [row["train_elbo"] for row in history],
              "valid ELBO": [row["valid_elbo"] for row in history]}
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for label, values in curves.items():
        ax.plot(epochs, values, label=label)
    if len(history) >= 20:  # zoom past the first 5% of epochs, whose ELBO dwarfs later progress
        late = [v for values in curves.values() for v in values[len(history) // 20:]]
        spread = max(late) - min(late)
        ax.set_ylim(min(late) - 0.1 * spread, max(late) + 0.1 * spread)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
