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

from pyro_vae.traces import OBSERVED_SITE, guide_and_model_traces, latent_sites


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


def _save_labelled_grid(images: torch.Tensor, columns: int, path: str | Path, column_labels: Sequence[str],
                        row_labels: Sequence[str] = (), title: str = "", labels_on_top: bool = False) -> None:
    """``images`` ``[N, C, H, W]`` in a grid of ``columns``, each column (and
    row) labelled, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pad = 2
    grid = make_grid(images.clamp(0, 1).cpu(), nrow=columns, padding=pad, pad_value=1.0)
    height, width = grid.shape[1:]
    cell_h, cell_w = images.shape[-2] + pad, images.shape[-1] + pad
    fig, ax = plt.subplots(figsize=(width / 60 + (1.0 if row_labels else 0.2), height / 60 + 0.4), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([pad / 2 + cell_w * (c + 0.5) for c in range(columns)])
    ax.set_xticklabels(column_labels, fontsize=6)
    ax.set_yticks([pad / 2 + cell_h * (r + 0.5) for r in range(len(row_labels))])
    ax.set_yticklabels(row_labels, fontsize=7)
    if labels_on_top:
        ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path)
    plt.close(fig)


def save_reconstructions(model: Callable, guide: Callable, x: torch.Tensor, path: str | Path, pairs_per_row: int = 8) -> None:
    """Pairs (data, reconstruction) side by side, ``pairs_per_row`` pairs a
    row, each column headed "data" or "recon."."""
    pairs = torch.stack([x, reconstruction_means(model, guide, x)], dim=1).flatten(0, 1)
    _save_labelled_grid(pairs, 2 * pairs_per_row, path, ["data", "recon."] * pairs_per_row, labels_on_top=True)


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


@torch.no_grad()
def traversal_means(model: Callable, guide: Callable, x: torch.Tensor, dims: Sequence[int],
                    values: Sequence[float], event_shape: Sequence[int]) -> torch.Tensor:
    """``E[x | z]`` with ``z`` the guide's mean code of the single datapoint
    ``x`` and, row by row, latent ``dims[r]`` set to each of ``values``:
    ``[len(dims) * len(values), *event_shape]``."""
    from pyro_vae.aggregate import single_factorised_latent

    site, base = single_factorised_latent(poutine.trace(guide).get_trace(x), "latent traversals")
    name, code = site["name"], base.mean.reshape(1, -1)
    n = len(dims) * len(values)
    z = code.repeat(n, 1)
    for row, dim in enumerate(dims):
        z[row * len(values):(row + 1) * len(values), dim] = torch.as_tensor(values, dtype=z.dtype, device=z.device)
    trace = poutine.trace(poutine.condition(model, data={name: z})).get_trace(None, batch_size=n)
    return trace.nodes[OBSERVED_SITE]["fn"].mean.reshape(n, *event_shape)


def save_traversals(model: Callable, guide: Callable, x: torch.Tensor, kl_per_dim: Sequence[float],
                    event_shape: Sequence[int], path: str | Path, rows: int = 10,
                    values: Sequence[float] = tuple(torch.linspace(-2.5, 2.5, 9).tolist())) -> None:
    """Latent traversals: one row per latent dimension (the ``rows`` with the
    largest KL, labelled with it), each swept over ``values`` while the other
    dimensions keep the guide's mean code of ``x`` (one datapoint)."""
    order = sorted(range(len(kl_per_dim)), key=lambda d: -kl_per_dim[d])[:rows]
    _save_labelled_grid(traversal_means(model, guide, x, order, values, event_shape), len(values), path,
                        [f"{v:+.1f}" for v in values], [f"z{d} ({kl_per_dim[d]:.1f})" for d in order],
                        title="latent traversals (row: dimension, its KL in nats; column: its value)")


def save_kl_bars(kl_per_dim: Sequence[float], path: str | Path) -> None:
    """The KL(q(z_u|x) || p(z_u)) of each latent dimension, averaged over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.0, 0.25 * len(kl_per_dim) + 1), 2.6), dpi=120)
    ax.bar(range(len(kl_per_dim)), kl_per_dim, color="tab:blue")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def latent_codes(guide: Callable, batches, sample: bool = False) -> torch.Tensor:
    """The guide's code of each datapoint: the mean of ``q(z | x)`` at its one
    continuous latent site (a sample where the mean has no closed form, as
    for a flow), or with ``sample`` a draw ``z ~ q(z | x)`` (together, draws
    from the aggregate posterior): ``[N, D]``."""
    codes = []
    for x in batches:
        site = next(s for _, s in latent_sites(poutine.trace(guide).get_trace(x)))
        try:
            code = site["value"] if sample else site["fn"].mean
        except NotImplementedError:
            code = site["value"]
        codes.append(code.reshape(x.shape[0], -1).cpu())
    return torch.cat(codes)


def save_latent_scatter(codes: torch.Tensor, labels: torch.Tensor, path: str | Path,
                        mixture: dict[str, torch.Tensor] | None = None) -> None:
    """The codes scattered, coloured by label: the two coordinates themselves
    for a 2-D latent, else the first two principal components (scikit-learn's
    PCA, with the variance each explains on its axis).  ``mixture`` (a fitted
    Gaussian mixture's ``weights``, ``means``, ``scale_tril``) adds each
    component's 2-sigma ellipse in the same plane: with ``P`` the plane's
    projection and ``c`` its centre, ``N(m, S)`` projects to ``N(P(m - c), P S P^T)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Ellipse

    codes, labels = codes.double().numpy(), labels.cpu().numpy()
    if codes.shape[1] == 2:
        centre, projection, axes = np.zeros(2), np.eye(2), ("z0", "z1")
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(codes)
        centre, projection = pca.mean_, pca.components_
        axes = tuple(f"PC{i + 1} ({100 * r:.0f}% of the variance)" for i, r in enumerate(pca.explained_variance_ratio_))
    points = (codes - centre) @ projection.T
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    for label in sorted(set(labels.tolist())):
        chosen = labels == label
        ax.scatter(points[chosen, 0], points[chosen, 1], s=3, alpha=0.6, label=str(label), color=plt.cm.tab10(label % 10))
    title = f"codes of {len(points)} test images (the guide's means), by label"
    if mixture is not None:
        weights, means = mixture["weights"].double().numpy(), mixture["means"].double().numpy()
        tril = mixture["scale_tril"].double().numpy()
        for weight, mean, scale_tril in zip(weights, means, tril):
            cov = projection @ scale_tril @ scale_tril.T @ projection.T
            eigenvalues, eigenvectors = np.linalg.eigh(cov)
            angle = np.degrees(np.arctan2(eigenvectors[1, 1], eigenvectors[0, 1]))
            width, height = 2 * 2 * np.sqrt(eigenvalues[::-1])
            ax.add_patch(Ellipse(projection @ (mean - centre), width, height, angle=angle, fill=False,
                                 edgecolor="black", linewidth=0.6 + 6 * weight))
        title += f";\n2-sigma ellipses of the fitted {len(weights)}-component mixture (line width ~ weight)"
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title, fontsize=8)
    ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def save_manifold(model: Callable, site: str, event_shape: Sequence[int], path: str | Path, n: int = 20) -> None:
    """A 2-D latent's decoded manifold: ``E[x | z]`` on an ``n x n`` grid of
    ``z = (Phi^-1(u), Phi^-1(v))`` for ``u, v`` evenly spaced in (0.05, 0.95),
    so the grid covers the bulk of a standard-normal prior evenly in probability."""
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    z = torch.cartesian_prod(quantiles.flip(0), quantiles)[:, [1, 0]]  # rows: z1 from high to low; columns: z0
    device = next(model.parameters()).device
    trace = poutine.trace(poutine.condition(model, data={site: z.to(device)})).get_trace(None, batch_size=n * n)
    images = trace.nodes[OBSERVED_SITE]["fn"].mean.reshape(n * n, *event_shape)
    save_image(images.clamp(0, 1), path, nrow=n, padding=1, pad_value=1.0)
