"""The trace core: a model/guide pair turned into per-datapoint log-densities.

This module turns a model/guide pair into traces, Pyro's or (for the
contract's one-latent parts, :mod:`pyro_vae.contract`) the same traces built
directly, and reads the log-densities off them: the evaluator, the
objectives, the data check and the plots take their traces and per-datapoint
figures from it and spell no site name.

For datapoints ``x_b`` and latents ``z_kb ~ q(z | x_b)`` (``k`` indexing
particles, drawn at once inside a particle plate placed left of every plate
the model uses), each sample site contributes its log-density, masked and
never scaled, summed over every dimension but the particle and data
dimensions.  Grouped by role (:class:`Particles`), each of shape ``[K, B]``::

    log p(x_b | z_kb)                                   the model's observed sites
    log p(z_kb)                                         the model's latent sites
    log q(z_kb | x_b)                                   the guide's sites
    log w_kb = log p(x_b, z_kb) - log q(z_kb | x_b)     the log importance weights
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import am_i_wrapped
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, kl_divergence

from pyro_vae.contract import (DATA_PLATE, LATENT_SITE, OBSERVED_SITE, PARTICLE_PLATE, DistributionGuide,
                               LatentVariableModel)
from pyro_vae.errors import ConfigError


def sample_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    """The trace's sample sites (observed or not), without plate subsample sites."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def latent_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    """The trace's unobserved sample sites."""
    return ((name, site) for name, site in sample_sites(trace) if not site["is_observed"])


def is_reparameterized(site: dict) -> bool:
    """Whether the site's value was drawn by ``rsample`` (differentiable in the
    distribution's parameters); else gradients need the score function."""
    return bool(getattr(site["fn"], "has_rsample", False))


def guide_and_model_traces(model: Callable, guide: Callable, x: torch.Tensor, num_particles: Optional[int] = None,
                           nesting: int = 1) -> tuple[poutine.Trace, poutine.Trace]:
    """``z ~ q(.|x)`` (guide trace), then the model replayed on those ``z``;
    with ``num_particles = K``, ``K`` draws per datapoint at once, inside the
    particle plate at dim ``-(nesting + 1)``.

    Pyro records both by running the programs under its handlers.  Where
    :func:`builds_traces_directly` allows, the same traces are built from the
    parts' distributions instead (:func:`direct_traces`): the same sites,
    distributions, shapes and draws, without Pyro's per-site messages (about
    a millisecond of a training step)."""
    if builds_traces_directly(model, guide, nesting) and keeps_one_latent_site(model, guide, x):
        return direct_traces(model, guide, x, num_particles)
    if num_particles is None:
        return _pyro_traces(model, guide, x)
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nesting + 1)):
        return _pyro_traces(model, guide, x)


def _pyro_traces(model: Callable, guide: Callable, x: torch.Tensor) -> tuple[poutine.Trace, poutine.Trace]:
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return guide_trace, model_trace


def builds_traces_directly(model: Callable, guide: Callable, nesting: int = 1) -> bool:
    """Whether :func:`direct_traces` may stand in for Pyro here: a
    :class:`~pyro_vae.contract.LatentVariableModel` that allows it
    (``direct_traces``, the config's ``train.direct_traces``) and a
    :class:`~pyro_vae.contract.DistributionGuide`, neither with its own
    ``forward`` nor forward hooks, the data plate the only plate, and no Pyro
    handler active around the call (a ``poutine.scale`` or ``block`` must see
    the sites).  :func:`keeps_one_latent_site` checks the rest once."""
    return (isinstance(model, LatentVariableModel) and model.direct_traces and isinstance(guide, DistributionGuide)
            and type(model).forward is LatentVariableModel.forward
            and type(guide).forward is DistributionGuide.forward
            and not (model._forward_hooks or model._forward_pre_hooks or guide._forward_hooks
                     or guide._forward_pre_hooks)
            and nesting == 1 and not am_i_wrapped())


class _PairVerdict:
    """:func:`keeps_one_latent_site`'s answer for a guide and one model (held
    by a weak reference), kept on the guide.  A pickled or copied guide
    carries none (a weak reference cannot be pickled) and checks its pair again."""

    def __init__(self, model: LatentVariableModel, keeps: bool):
        self.model, self.keeps = weakref.ref(model), keeps

    def __reduce__(self):
        return type(None), ()


_VERDICT = "_keeps_one_latent_site"  # the guide's attribute holding a _PairVerdict


def keeps_one_latent_site(model: LatentVariableModel, guide: DistributionGuide, x: torch.Tensor) -> bool:
    """Whether Pyro's traces of the pair hold the contract's sample sites
    alone (the guide's ``"z"``, the model's ``"z"`` and ``"x"``): a prior,
    likelihood or guide distribution that makes sites of its own (a
    ``PyroSample`` attribute, a ``pyro.sample`` inside ``observation``) must
    be traced by Pyro.  Found on the first two datapoints, with the random
    number generators put back, and kept on the guide for its latest model
    (a plain attribute, which ``torch.compile`` reads without re-checking;
    a guide switched between models checks again at each switch)."""
    kept = guide.__dict__.get(_VERDICT)
    if kept is not None and kept.model() is model:
        return kept.keeps
    devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        guide_trace, model_trace = _pyro_traces(model, guide, x[:2])
    keeps = ([name for name, _ in sample_sites(guide_trace)] == [LATENT_SITE]
             and [name for name, _ in sample_sites(model_trace)] == [LATENT_SITE, OBSERVED_SITE])
    guide.__dict__[_VERDICT] = _PairVerdict(model, keeps)
    return keeps


def _expanded(fn, batch_shape):
    """``fn.expand(batch_shape)``, with each new instance made by
    ``object.__new__(cls)`` rather than torch's ``self.__new__(type(self))``,
    which TorchDynamo before torch 2.14 cannot trace (so ``train.compile``
    fell back to eager there); an ``Independent`` that keeps torch's
    ``expand`` is rebuilt around its expanded base, as that ``expand`` does.
    The same distribution, draws and densities as ``fn.expand`` (tested);
    ``fn`` itself where it has that batch shape already (an equal copy)."""
    batch_shape = torch.Size(batch_shape)
    if fn.batch_shape == batch_shape:
        return fn
    cls = type(fn)
    if isinstance(fn, Independent) and cls.expand is Independent.expand:
        n = fn.reinterpreted_batch_ndims
        new = cls(_expanded(fn.base_dist, batch_shape + fn.event_shape[:n]), n, validate_args=False)
        new._validate_args = fn._validate_args
        return new
    if cls.__new__ is object.__new__:
        return fn.expand(batch_shape, _instance=object.__new__(cls))
    return fn.expand(batch_shape)


def _broadcast(fn, frames: tuple[CondIndepStackFrame, ...]):
    """``fn`` expanded to the plates' batch shape, as Pyro's plates expand a
    site's distribution (``BroadcastMessenger``)."""
    shape = list(fn.batch_shape)
    for frame in reversed(frames):  # the innermost plate first, as Pyro's messages meet them
        if len(fn.batch_shape) >= -frame.dim and fn.batch_shape[frame.dim] not in (1, frame.size):
            raise ValueError(f"Shape mismatch inside plate({frame.name!r}) at dim {frame.dim}: the distribution's "
                             f"batch shape is {tuple(fn.batch_shape)}, the plate's size {frame.size}")
        shape = [1] * (-frame.dim - len(shape)) + shape
        shape[frame.dim] = frame.size
    expanded = _expanded(fn, shape)
    if expanded.has_rsample != fn.has_rsample:
        expanded.has_rsample = fn.has_rsample  # (a guide's custom attribute, as Pyro copies it)
    return expanded


def _site(name: str, fn, value: torch.Tensor, frames: tuple[CondIndepStackFrame, ...], observed: bool) -> dict:
    """A sample site as Pyro's trace records it."""
    return dict(type="sample", name=name, fn=fn, is_observed=observed, args=(), kwargs={}, value=value, infer={},
                scale=1.0, mask=None, cond_indep_stack=frames, done=True, stop=False, continuation=None)


def direct_traces(model: LatentVariableModel, guide: DistributionGuide, x: torch.Tensor,
                  num_particles: Optional[int] = None) -> tuple[poutine.Trace, poutine.Trace]:
    """The guide's and the replayed model's traces that Pyro would record for
    this pair (see :func:`guide_and_model_traces`), built directly::

        q = guide.distribution(x), expanded to [K, B];  z = q()   (rsample, or sample without one)
        p = model.prior(B)                                   (the replayed site: batch [B], as Pyro leaves it)
        p(x | z) = model.observation(z, x), expanded to [K, B], at the value model.observed(x)

    in Pyro's order (the guide, then the prior, then the decoder), so the
    random draws are Pyro's too.  Sample sites only: the plates' subsample
    sites and the traces' input and return nodes are left out."""
    batch = x.shape[0]
    data = CondIndepStackFrame(DATA_PLATE, -1, batch, 0, batch)
    frames = (data,) if num_particles is None else (
        CondIndepStackFrame(PARTICLE_PLATE, -2, num_particles, 0, num_particles), data)
    q = _broadcast(guide.distribution(x), frames)
    z = q()
    guide_trace = poutine.Trace()
    guide_trace.add_node(LATENT_SITE, **_site(LATENT_SITE, q, z, frames, observed=False))
    model_trace = poutine.Trace()
    model_trace.add_node(LATENT_SITE, **_site(LATENT_SITE, _broadcast(model.prior(batch), (data,)), z, frames,
                                              observed=False))
    likelihood = _broadcast(model.observation(z, x), frames)
    model_trace.add_node(OBSERVED_SITE, **_site(OBSERVED_SITE, likelihood, model.observed(x), frames, observed=True))
    return guide_trace, model_trace


def max_plate_nesting(model: Callable, guide: Callable, x: torch.Tensor) -> int:
    """How many batch dims the model and guide's plates use (1 for a plain VAE)."""
    with torch.no_grad():
        traces = guide_and_model_traces(model, guide, x)
    return max(
        (-frame.dim for trace in traces for _, site in sample_sites(trace)
         for frame in site["cond_indep_stack"] if frame.vectorized),
        default=0,
    )


def per_datapoint(name: str, site: dict, values: torch.Tensor, nesting: int) -> torch.Tensor:
    """A site's batch-shaped ``values`` (its log-density, a KL) per (particle,
    datapoint): shape ``[K or 1, B]``.

    The site's mask applies (its scale does not: a subsampling or annealing
    scale must not leak into a per-datapoint figure); batch dims are
    right-aligned to ``nesting + 1`` dims, the particle dim leftmost, and every
    dim but the particle dim and the data plate's is summed out."""
    data_frames = [f for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    if not data_frames:
        raise ValueError(
            f"sample site {name!r} is outside pyro.plate({DATA_PLATE!r}): its log-density cannot be "
            "split per datapoint. Sample every latent inside the data plate."
        )
    values = scale_and_mask(values, mask=site["mask"])
    values = values.reshape((1,) * (nesting + 1 - values.dim()) + values.shape)
    data_axis = nesting + 1 + data_frames[0].dim
    other = [d for d in range(1, nesting + 1) if d != data_axis]
    return values.sum(other) if other else values


def site_log_prob(name: str, site: dict, nesting: int) -> torch.Tensor:
    """``log p(site)`` per (particle, datapoint): ``[K or 1, B]``."""
    return per_datapoint(name, site, site["fn"].log_prob(site["value"]), nesting)


def _factors(d):
    while isinstance(d, Independent):
        d = d.base_dist
    return d


def _kl_pair(q_site: dict, p_site: dict):
    """The distributions whose KL is taken, and whether it is per dimension:
    the factors where both densities factorise, else the whole densities,
    expanded to one batch shape (some of torch's KLs do not broadcast)."""
    q, p, factorised = _factors(q_site["fn"]), _factors(p_site["fn"]), True
    if q.event_shape or p.event_shape:
        q, p, factorised = q_site["fn"], p_site["fn"], False
    shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    return _expanded(q, shape), _expanded(p, shape), factorised


def has_analytic_kl(q_site: dict, p_site: dict) -> bool:
    """Whether torch registers the KL between the site's guide and prior."""
    q, p, _ = _kl_pair(q_site, p_site)
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


def site_kl(q_site: dict, p_site: dict) -> torch.Tensor:
    """``KL(q(z | x) || p(z))`` at one latent site, per latent dimension: shape
    ``[*batch, D]`` where both densities factorise over the latent's ``D``
    dimensions (diagonal guides, i.i.d. priors), else the site's total KL as
    one column, ``[*batch, 1]``.

    Analytic where torch registers the pair, else the one-sample estimate
    ``log q(z) - log p(z)`` at the guide's sample ``z`` (unbiased, and
    differentiable along ``z`` where it was reparameterized)."""
    q, p, factorised = _kl_pair(q_site, p_site)
    try:
        kl = kl_divergence(q, p)
    except NotImplementedError:
        z = q_site["value"]
        kl = q.log_prob(z) - p.log_prob(z)
    event_dims = len(q_site["fn"].event_shape)
    if factorised and event_dims:
        return kl.flatten(-event_dims)
    return kl.unsqueeze(-1)


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log (1/K) sum_k exp(log_w_k)`` over ``dim`` (of size ``K``), stably.
    On log importance weights this is the bound ``L_K`` (Burda et al. 2015)."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


@dataclass
class Particles:
    """``K`` guide samples per datapoint and the model replayed on them.

    Each site's per-datapoint log-density is computed once, on first use.

    :param guide_trace: the guide's trace (``K`` samples per datapoint).
    :param model_trace: the model's trace on those samples.
    :param nesting: how many plate dims the model uses besides the particle plate.
    """

    guide_trace: poutine.Trace
    model_trace: poutine.Trace
    nesting: int
    _cache: dict = field(default_factory=dict, repr=False)

    def _log_prob(self, trace: poutine.Trace, name: str, site: dict) -> torch.Tensor:
        key = (id(trace), name)
        if key not in self._cache:
            self._cache[key] = site_log_prob(name, site, self.nesting)
        return self._cache[key]

    def _sum(self, terms) -> torch.Tensor:
        total = None
        for term in terms:
            total = term if total is None else total + term
        if total is None:  # no such site: a zero on the data's device
            _, site = next(sample_sites(self.model_trace))
            total = site["value"].new_zeros(1, 1)
        return total

    def log_likelihood(self) -> torch.Tensor:
        """``log p(x_b | z_kb)``, the model's observed sites: ``[K, B]``."""
        return self._sum(self._log_prob(self.model_trace, n, s)
                         for n, s in sample_sites(self.model_trace) if s["is_observed"])

    def log_prior(self) -> torch.Tensor:
        """``log p(z_kb)``, the model's latent sites: ``[K, B]``."""
        return self._sum(self._log_prob(self.model_trace, n, s) for n, s in latent_sites(self.model_trace))

    def log_guide(self, reparameterized: Optional[bool] = None) -> torch.Tensor:
        """``log q(z_kb | x_b)`` over the guide's sites: all of them, or only the
        reparameterized (``True``) or score-function (``False``) ones.

        Over the score-function sites, whose values carry no gradient, this is
        the score-function term: its gradient is ``grad_phi log q(z | x)`` at
        the drawn ``z``."""
        return self._sum(self._log_prob(self.guide_trace, n, s) for n, s in sample_sites(self.guide_trace)
                         if reparameterized is None or is_reparameterized(s) == reparameterized)

    def log_weights(self) -> torch.Tensor:
        """``log w_kb = log p(x_b, z_kb) - log q(z_kb | x_b)``: ``[K, B]``."""
        return self.log_likelihood() + self.log_prior() - self.log_guide()

    def kl_per_dimension(self) -> torch.Tensor:
        """``KL(q(z_d | x_b) || p(z_d))`` per (particle, datapoint, latent
        dimension), the dimensions of every site side by side (a site that
        does not factorise counts as one): ``[K or 1, B, D]``.  For latent
        sites in the data plate alone."""
        columns = []
        for name, site in sample_sites(self.guide_trace):
            kl = site_kl(site, self.model_trace.nodes[name])
            if kl.dim() != 3:
                raise ConfigError(f"a per-dimension KL needs latent site {name!r} in the data plate alone "
                                  f"(its KL has shape {tuple(kl.shape)}, not [particles, batch, dimensions])")
            columns.append(kl)
        return torch.cat(columns, -1)

    def kl(self) -> torch.Tensor:
        """``sum_sites KL(q(z | x_b) || p(z))`` per (particle, datapoint), analytic
        where torch registers the pair (see :func:`site_kl`): ``[K or 1, B]``."""
        return self._sum(
            per_datapoint(name, self.model_trace.nodes[name], site_kl(site, self.model_trace.nodes[name]).sum(-1),
                          self.nesting)
            for name, site in sample_sites(self.guide_trace)
        )


def draw_particles(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, nesting: int) -> Particles:
    """``z_kb ~ q(z | x_b)`` for ``k < num_particles``, drawn at once in the
    particle plate, and the model replayed on them."""
    return Particles(*guide_and_model_traces(model, guide, x, num_particles, nesting), nesting)


def replay_particles(model: Callable, guide_trace: poutine.Trace, x: torch.Tensor,
                     values: Mapping[str, torch.Tensor], nesting: int) -> Particles:
    """The model replayed on latent values the caller chose (antithetic pairs,
    relaxed samples), ``values[site]`` of shape ``[K, *site batch, *event]``.

    ``guide_trace`` is a trace of the guide without the particle plate; its
    sites' distributions are kept and their values replaced (in a copy), so
    the guide's log-density is evaluated at the chosen values."""
    guide_trace = guide_trace.copy()
    for name, value in values.items():
        guide_trace.nodes[name] = {**guide_trace.nodes[name], "value": value}
    num_particles = next(iter(values.values())).shape[0]
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(nesting + 1)):
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return Particles(guide_trace, model_trace, nesting)


def log_importance_weights(
    model: Callable, guide: Callable, x: torch.Tensor, num_samples: int, nesting: int
) -> torch.Tensor:
    """``log w[k, b] = log p(x_b, z_kb) - log q(z_kb | x_b)``, ``z_kb ~ q(.|x_b)``,
    for ``k < num_samples`` drawn at once: shape ``[num_samples, B]``."""
    return draw_particles(model, guide, x, num_samples, nesting).log_weights().expand(num_samples, x.shape[0])
