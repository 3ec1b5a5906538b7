"""Priors p(z): modules returning a distribution with batch shape ``[B]`` and
the latent as event shape, so a model does ``pyro.sample("z", self.prior(B))``.

- ``standard_normal``: ``N(0, I)``;
- ``learned_normal``: ``N(m, diag s^2)``, ``m`` and ``s = softplus(r)`` learned;
- ``mog``: ``sum_c pi_c N(m_c, diag s_c^2)``, a learned mixture of ``C``
  diagonal Gaussians (``pi = softmax(a)``);
- ``vamp``: the VampPrior (Tomczak & Welling 2018), ``(1/C) sum_c q(z | u_c)``,
  the guide's posteriors at ``C`` learned pseudo-inputs;
- ``gmm_ex_post``: ``N(0, I)`` while training; afterwards a Gaussian mixture
  fitted by scikit-learn to the guide's codes of the training set, used for
  sampling and evaluation (Ghosh et al. 2020's ex-post density estimation);
- ``bernoulli``: independent Bernoullis, fair or learned.

No KL to a mixture is registered: ``meanfield_elbo`` then uses the
one-sample estimate ``log q(z|x) - log p(z)`` (see ``pyro_vae.traces.site_kl``).
"""
from __future__ import annotations

from typing import Literal

import pyro.distributions as dist
import torch
from torch.nn.functional import softplus

from pyro_vae.distributions import DiagonalNormalMixture, mixture
from pyro_vae.errors import ConfigError
from pyro_vae.nn import PartModule
from pyro_vae.registry import PRIORS


def diagonal_normal(loc: torch.Tensor, scale: torch.Tensor, batch_size: int) -> dist.TorchDistribution:
    """``N(loc, diag scale^2)`` for each of ``batch_size`` datapoints (batch
    ``[batch_size]``, event ``[D]``): the parameters expanded, as
    ``Normal.expand`` would, without a distribution's ``expand``, which
    TorchDynamo before torch 2.14 cannot trace (``train.compile``)."""
    shape = (batch_size, loc.shape[-1])
    return dist.Normal(loc.expand(shape), scale.expand(shape)).to_event(1)


@PRIORS.register("standard_normal")
class StandardNormalPrior(PartModule):
    """Isotropic Gaussian p(z) = N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        # buffers, so the prior follows the model with `.to(device)`
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        return diagonal_normal(self.loc, self.scale, batch_size)


@PRIORS.register("learned_normal")
class LearnedNormalPrior(PartModule):
    """Learned diagonal Gaussian p(z) = N(m, diag softplus(r)^2), starting at N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = torch.nn.Parameter(torch.full((latent_dim,), _SOFTPLUS_INVERSE_OF_1))

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        return diagonal_normal(self.loc, softplus(self.raw_scale), batch_size)


_SOFTPLUS_INVERSE_OF_1 = 0.5413248546129181  # log(e - 1)


@PRIORS.register("mog")
class MixtureOfGaussiansPrior(PartModule):
    """Learned mixture of C diagonal Gaussians p(z) = sum_c pi_c N(m_c, diag s_c^2)."""

    def __init__(self, latent_dim: int, components: int = 10, init_spread: float = 1.0):
        """
        :param components: ``C``, the number of Gaussians.
        :param init_spread: the standard deviation of the initial means
            (drawn from ``N(0, init_spread^2)``; scales start at 1, weights equal).
        """
        super().__init__()
        self.locs = torch.nn.Parameter(init_spread * torch.randn(components, latent_dim))
        self.raw_scales = torch.nn.Parameter(torch.full((components, latent_dim), _SOFTPLUS_INVERSE_OF_1))
        self.logits = torch.nn.Parameter(torch.zeros(components))

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        return DiagonalNormalMixture(self.logits, self.locs, softplus(self.raw_scales)).expand([batch_size])


@PRIORS.register("vamp")
class VampPrior(PartModule):
    """VampPrior (Tomczak & Welling 2018): p(z) = (1/C) sum_c q(z | u_c), the guide at C learned pseudo-inputs."""

    def __init__(self, latent_dim: int, guide: torch.nn.Module, event_shape: tuple[int, ...],
                 pseudo_inputs: int = 500, init_mean: float = 0.13, init_sd: float = 0.01):
        """
        :param pseudo_inputs: ``C``.
        :param init_mean: the pseudo-inputs start at ``N(init_mean, init_sd^2)``
            per pixel, clamped to ``[0, 1]`` when used (as Tomczak & Welling's
            hard-tanh does); 0.13 is MNIST's mean pixel.
        :param init_sd: see ``init_mean``.

        The guide must offer ``distribution(x)`` returning a distribution whose
        batch shape is ``x``'s first dimension (``normal``, ``lowrank_normal``)
        and, like every guide, is held apart from the model's modules: its
        parameters are the guide's, trained through both the guide and the prior.
        """
        super().__init__()
        if not hasattr(guide, "distribution"):
            raise ConfigError(f"prior 'vamp' needs a guide with a distribution(x) method (the guide's posterior "
                              f"at the pseudo-inputs); {type(guide).__name__} has none: use guide 'normal' or "
                              f"'lowrank_normal'")
        self.pseudo_inputs = torch.nn.Parameter(init_mean + init_sd * torch.randn(pseudo_inputs, *event_shape))
        self.__dict__["guide"] = guide  # not a submodule: the guide's parameters stay the guide's
        try:  # the mixture evaluates every component at every z: q(. | u) must broadcast over the u
            with torch.no_grad():
                component = guide.distribution(self.pseudo_inputs[:2])
                component.log_prob(torch.zeros(3, 1, latent_dim))
        except RuntimeError as exc:
            raise ConfigError(f"prior 'vamp' needs a guide whose q(z|x) broadcasts over a batch of pseudo-inputs; "
                              f"{type(guide).__name__}'s does not ({str(exc).splitlines()[0]}): use guide 'normal' "
                              f"or 'lowrank_normal'") from None
        while isinstance(component, dist.Independent):
            component = component.base_dist
        if isinstance(component, dist.Delta) or component.support.is_discrete:
            kind = "a point mass" if isinstance(component, dist.Delta) else "discrete"
            raise ConfigError(f"prior 'vamp' needs a guide whose q(z|x) is a density over continuous latents; "
                              f"{type(guide).__name__}'s is {kind}: use guide 'normal' or 'lowrank_normal'")

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        components = self.guide.distribution(self.pseudo_inputs.clamp(0.0, 1.0))
        return mixture(self.pseudo_inputs.new_zeros(self.pseudo_inputs.shape[0]), components).expand([batch_size])


@PRIORS.register("gmm_ex_post")
class GaussianMixtureExPostPrior(PartModule):
    """N(0, I) while training; after it, a Gaussian mixture fitted to the guide's codes (samples or means) of the training set."""

    def __init__(self, latent_dim: int, components: int = 10, covariance: Literal["full", "diag"] = "full",
                 codes: Literal["sample", "mean"] = "sample"):
        """
        :param components: ``C``, the Gaussians of the mixture fitted after training.
        :param covariance: their covariance matrices, ``full`` or ``diag``.
        :param codes: what the mixture is fitted to, per training datapoint:
            ``sample``, one ``z ~ q(z | x)`` (the aggregate posterior, which the
            decoder was trained on; the guide then stays a good importance
            proposal for it), or ``mean``, the mean of ``q(z | x)`` (pythae's
            GMM sampler).  Means leave the unused dimensions nearly constant,
            so the mixture is far narrower there than ``q(z | x)``: fine for
            sampling, useless for the IS evaluation (measured: an IS NLL of
            22,027 nats with PSIS k-hat = inf).  A ``delta`` guide's codes are
            the same either way.

        Until :meth:`fit_codes` is called, ``p(z) = N(0, I)``: training sees
        this prior, whose log-density is the codes' L2 penalty for a point-
        estimate guide.  The fitted mixture is held in buffers outside the
        ``state_dict`` (a resumed run trains against ``N(0, I)`` again); the
        engine saves and restores it beside the checkpoint
        (:mod:`pyro_vae.ex_post`).
        """
        super().__init__()
        self.components, self.covariance, self.codes = components, covariance, codes
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        for name in ("mixture_weights", "mixture_means", "mixture_scale_tril"):
            self.register_buffer(name, None, persistent=False)

    @property
    def fitted(self) -> bool:
        return self.mixture_weights is not None

    def fit_codes(self, codes: torch.Tensor, seed: int = 0) -> dict[str, float]:
        """Fit ``sum_c pi_c N(m_c, S_c)`` to ``codes`` ``[N, D]`` by EM
        (scikit-learn's ``GaussianMixture``, k-means start); returns the
        mean log-density of the codes under it and the iterations EM took."""
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(self.components, covariance_type=self.covariance, random_state=seed, max_iter=500)
        data = codes.double().cpu().numpy()
        gmm.fit(data)
        covariances = torch.as_tensor(gmm.covariances_)
        if self.covariance == "diag":
            covariances = torch.diag_embed(covariances)
        self.load_mixture({"weights": torch.as_tensor(gmm.weights_), "means": torch.as_tensor(gmm.means_),
                           "scale_tril": torch.linalg.cholesky(covariances)})
        return {"mean_code_log_density": float(gmm.score(data)), "em_iterations": int(gmm.n_iter_),
                "converged": bool(gmm.converged_)}

    def mixture_state(self) -> dict[str, torch.Tensor]:
        """The fitted mixture's ``weights`` ``[C]``, ``means`` ``[C, D]`` and ``scale_tril`` ``[C, D, D]``."""
        return {"weights": self.mixture_weights.cpu(), "means": self.mixture_means.cpu(),
                "scale_tril": self.mixture_scale_tril.cpu()}

    def load_mixture(self, state: dict[str, torch.Tensor]) -> None:
        """Use the mixture ``state`` (see :meth:`mixture_state`) from now on."""
        expected = {"weights": (self.components,), "means": (self.components, self.loc.shape[0]),
                    "scale_tril": (self.components, self.loc.shape[0], self.loc.shape[0])}
        for key, shape in expected.items():
            if key not in state or tuple(state[key].shape) != shape:
                raise ValueError(f"the mixture's {key!r} should have shape {shape}")
        self.mixture_weights = state["weights"].to(self.loc)
        self.mixture_means = state["means"].to(self.loc)
        self.mixture_scale_tril = state["scale_tril"].to(self.loc)

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        if not self.fitted:
            return diagonal_normal(self.loc, self.scale, batch_size)
        components = dist.MultivariateNormal(self.mixture_means, scale_tril=self.mixture_scale_tril)
        return dist.MixtureSameFamily(dist.Categorical(probs=self.mixture_weights), components).expand([batch_size])


@PRIORS.register("bernoulli")
class BernoulliPrior(PartModule):
    """Independent Bernoullis p(z) = prod_i Ber(z_i; sigmoid(a_i)); a = 0 (fair coins) or learned."""

    def __init__(self, latent_dim: int, learned: bool = False):
        super().__init__()
        logits = torch.zeros(latent_dim)
        if learned:
            self.logits = torch.nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def forward(self, batch_size: int) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=self.logits).expand([batch_size, self.logits.shape[-1]]).to_event(1)
