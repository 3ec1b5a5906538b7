"""Assemble the parts a config names: data, prior, model, guide, objective."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule

from pyro_vae import registry
from pyro_vae.config import ExperimentConfig
from pyro_vae.contract import LatentVariableModel
from pyro_vae.data import ImageDataset
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.objectives import Objective
from pyro_vae.traces import OBSERVED_SITE, guide_and_model_traces, latent_sites


def _kind(d: torch.distributions.Distribution) -> str:
    """``"continuous Normal"``, ``"discrete Bernoulli"``: a distribution's kind and family."""
    family = type(getattr(d, "base_dist", d)).__name__
    return f"{'discrete' if d.support.is_discrete else 'continuous'} {family}"


def is_point_mass(d: torch.distributions.Distribution) -> bool:
    """Whether ``d`` is a ``Delta`` (possibly reshaped with ``to_event``/``expand``): a point estimate, no density."""
    while isinstance(d, (torch.distributions.Independent, pyro.distributions.ExpandedDistribution)):
        d = d.base_dist
    return isinstance(d, pyro.distributions.Delta)


def require_guide_density(guide_trace, guide_name: str, num_samples: int) -> None:
    """Refuse an importance-sampled evaluation (``num_samples`` > 0) of a guide
    with a point mass at a latent site: ``log w = log p(x, z) - log q(z | x)``
    needs ``q``'s density, and a point mass has none (its entropy is minus
    infinity), so the ELBO and ``L_K`` would be numbers without a meaning."""
    point_masses = [name for name, site in latent_sites(guide_trace) if is_point_mass(site["fn"])]
    if point_masses and num_samples > 0:
        raise ConfigError(
            f"guide {guide_name!r} is a point estimate at latent {point_masses[0]!r} (a Delta, no density "
            f"q(z|x)), but the importance-sampled evaluation (eval.iw_samples = {num_samples}) divides by that "
            f"density: the ELBO and the IS log-likelihood are undefined for it. Set eval.iw_samples = 0 (train "
            f"without it; score samples with `pyro-vae evaluate RUN --sample-quality`), or use a guide with a "
            f"density ('normal', 'lowrank_normal', 'iaf')."
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def build_model_and_guide(config: ExperimentConfig, data_spec: dict[str, Any]) -> tuple[PyroModule, PyroModule]:
    """The prior, model and guide ``config`` names, for data of ``data_spec``
    (:data:`pyro_vae.registry.DATA_SPEC`: ``{"event_shape": (1, 28, 28)}`` for
    MNIST; each part gets the keys it declares), on the CPU, parameters drawn
    from the current RNG state."""
    registry.load_catalogue(config.imports)
    latent_dim = config.model.options.get("latent_dim")
    if latent_dim is None:
        raise ConfigError(f"model {config.model.name!r} has no `latent_dim` option; the engine passes it to the prior and guide")
    def build_guide():
        return registry.GUIDES.build(config.guide.name, config.guide.options, latent_dim=latent_dim, **data_spec)

    # a prior built on the guide (the VampPrior) gets it; other priors are built first, as they always were,
    # so a seed initialises the same parameters
    guide = build_guide() if registry.PRIORS.accepts(config.prior.name, "guide") else None
    prior = registry.PRIORS.build(config.prior.name, config.prior.options, latent_dim=latent_dim,
                                  guide=guide, **data_spec)
    model = registry.MODELS.build(config.model.name, config.model.options, prior=prior, **data_spec)
    if isinstance(model, LatentVariableModel):
        model.direct_traces = config.train.direct_traces
    return model, guide if guide is not None else build_guide()


@dataclass
class Experiment:
    config: ExperimentConfig
    device: torch.device
    data: ImageDataset
    model: PyroModule
    guide: PyroModule
    objective: Objective

    @classmethod
    def build(cls, config: ExperimentConfig, device: torch.device | None = None) -> "Experiment":
        """Build every part on ``device`` (default: ``config.train.device``).
        Parameters are initialised from ``config.train.seed``."""
        device = device or resolve_device(config.train.device)
        registry.load_catalogue(config.imports)
        data = registry.DATASETS.build(config.data.name, config.data.options, device=device)
        pyro.set_rng_seed(config.train.seed)
        model, guide = build_model_and_guide(config, data.spec)
        model, guide = model.to(device), guide.to(device)
        objective = registry.OBJECTIVES.build(config.objective.name, config.objective.options)(model, guide)
        experiment = cls(config, device, data, model, guide, objective.to(device))
        experiment.check_guide_fits_prior()
        experiment.check_guide_density(config.eval.iw_samples)
        experiment.check_data_fits_model()
        return experiment

    def check_guide_fits_prior(self) -> None:
        """At every latent site the guide must propose values the prior can
        score, with a density of the same kind: both discrete (probabilities)
        or both continuous (densities), and the guide's samples inside the
        prior's support.  A Normal guide for Bernoulli latents, or a Bernoulli
        guide for Gaussian ones, is refused here, naming both parts."""
        x = self.data["train"].batch(slice(0, 2))
        with torch.no_grad(), pyro.validation_enabled(False):
            guide_trace, model_trace = guide_and_model_traces(self.model, self.guide, x)
        for name, q_site in latent_sites(guide_trace):
            q, p = q_site["fn"], model_trace.nodes[name]["fn"]
            if q.support.is_discrete != p.support.is_discrete or not bool(p.support.check(q_site["value"]).all()):
                raise ConfigError(
                    f"guide {self.config.guide.name!r} draws latent {name!r} from a {_kind(q)}, but prior "
                    f"{self.config.prior.name!r} is a {_kind(p)}: the guide must propose values the prior "
                    f"scores, with the same kind of density. Pair prior 'bernoulli' with guide 'bernoulli', and "
                    f"continuous priors with a continuous guide ('normal', 'lowrank_normal', 'iaf')."
                )

    def check_guide_density(self, num_samples: int) -> None:
        """An IS evaluation with ``num_samples`` needs the guide's density (:func:`require_guide_density`)."""
        with torch.no_grad(), pyro.validation_enabled(False):
            guide_trace, _ = guide_and_model_traces(self.model, self.guide, self.data["train"].batch(slice(0, 2)))
        require_guide_density(guide_trace, self.config.guide.name, num_samples)

    def check_data_fits_model(self) -> None:
        """Every value of every split must lie in the support of the model's
        likelihood at the observed site (e.g. {0, 1} for Bernoulli pixels)."""
        check_size = 10_000  # datapoints at a time, to bound memory
        for name, split in self.data.splits.items():
            with torch.no_grad():
                _, model_trace = guide_and_model_traces(self.model, self.guide, split.batch(slice(0, 2)))
            likelihood = model_trace.nodes[OBSERVED_SITE]["fn"]
            if not all(
                bool(likelihood.support.check(x.reshape(x.shape[0], -1)).all())  # every value, flat
                for x in split.batches(check_size)
            ):
                raise DataError(
                    f"the {name} split has values outside the support of model {self.config.model.name!r}'s "
                    f"likelihood ({type(likelihood).__name__}, support {likelihood.support}): the data are gray "
                    f"levels but the likelihood needs 0/1. Set data.binarization to 'dynamic', 'static' or "
                    f"'threshold' (it is {self.data.binarization!r})."
                )
