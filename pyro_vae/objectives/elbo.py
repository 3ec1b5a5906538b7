"""The ELBO, ``E_q[log p(x, z) - log q(z | x)]``, with three gradient estimators.

For a reparameterized guide site the gradient flows through the sample; for
a site without ``rsample`` (binary latents) it needs the score function::

    grad_phi E_q[f(z)] = E_q[f(z) grad_phi log q(z | x)]   (+ E_q[grad_phi f], when f depends on phi)

The term ``-E_q[grad_phi log q(z | x)]`` that ``f = log p - log q`` adds is
zero in expectation and is dropped, as Pyro does.  Each datapoint's score is
multiplied by its own learning signal (the data plate makes them
independent).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch
from pyro.infer import TraceGraph_ELBO

from pyro_vae.errors import ConfigError
from pyro_vae.objectives.base import Objective
from pyro_vae.objectives.baselines import NeuralBaseline, RunningMoments
from pyro_vae.registry import OBJECTIVES
from pyro_vae.schedules import Annealing, kl_annealing
from pyro_vae.traces import draw_particles, has_analytic_kl, is_reparameterized, latent_sites


def score_term(signal: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``signal * (log q - stop(log q))``: zero in value, and in gradient the
    score-function term ``signal * grad_phi log q(z | x)`` (``signal`` is
    detached)."""
    return signal.detach() * (log_q - log_q.detach())


@OBJECTIVES.register("trace_elbo")
class TraceELBO(Objective):
    """Pyro Trace_ELBO's estimator: Monte-Carlo E_q[log p(x,z) - log q(z|x)], score function on discrete sites, no baseline."""

    def __init__(self, model, guide, num_particles: int = 1):
        super().__init__(model, guide)
        self.num_particles = num_particles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pyro's ``Trace_ELBO`` surrogate, on the trace core's particles
        (built directly where the parts allow, so the loss compiles)::

            f_kb = log p(x_b, z_kb) - log q(z_kb | x_b)
            s_kb = f_kb + (1 + stop(f_kb)) (log q_score(z_kb | x_b) - stop(log q_score(z_kb | x_b)))
            loss = -(1/K) sum_kb s_kb

        ``q_score``: the guide's sites without ``rsample``.  ``s`` equals
        ``f`` in value, so the loss is ``-ELBO`` summed over the batch; its
        gradient is the pathwise gradient of ``f`` through the other sites,
        without the ``-grad log q_score`` term (zero in expectation; Pyro
        drops it), plus the score function ``stop(f_kb) grad log q_score``
        with each datapoint's own signal: Pyro's (tested against
        ``Trace_ELBO`` on the same draws)."""
        particles = draw_particles(self.model, self.guide, x, self.num_particles, self.nesting(x))
        surrogate = particles.log_weights()  # [K, B]
        log_q_score = particles.log_guide(reparameterized=False)
        if log_q_score.requires_grad:  # (a constant 0 when every site is reparameterized)
            surrogate = surrogate + score_term(1 + surrogate, log_q_score)
        elbo = surrogate.detach().mean(0)  # [B]
        return self.report(-surrogate.mean(0).sum(), x.shape[0], elbo=elbo)


class _TraceGraphSurrogate(TraceGraph_ELBO):
    """Pyro's TraceGraph_ELBO, whose surrogate loss pyro 1.9 builds only
    inside ``loss_and_grads``: this returns it, as a loss whose value is
    ``-ELBO`` and whose gradient is the estimator."""

    def loss_and_elbo(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss, the ELBO estimate summed over the batch)."""
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -elbo.detach() + (surrogate_loss - surrogate_loss.detach()), elbo.detach()


@OBJECTIVES.register("tracegraph_elbo")
class TraceGraphELBO(Objective):
    """Pyro TraceGraph_ELBO: score function with Rao-Blackwellisation and a baseline declared on each discrete guide site."""

    def __init__(
        self,
        model,
        guide,
        baseline: Literal["none", "decaying_avg", "neural"] = "decaying_avg",
        baseline_beta: float = 0.9,
        baseline_hidden: list[int] = [100],
        baseline_lr: Optional[float] = None,
        num_particles: int = 1,
    ):
        """
        :param baseline: ``decaying_avg``: ``b = c``, a decaying average of
            the batch-mean ELBO (one number for every datapoint); ``neural``:
            ``b = c + b_psi(x)``, an MLP of the datapoint fitted to what the
            average leaves, ``(f - c - b_psi(x))^2`` (Pyro's baseline loss);
            ``none``.
        :param baseline_beta: decay of the average (Pyro's ``baseline_beta``).
        :param baseline_hidden: hidden widths of the neural baseline.
        :param baseline_lr: the neural baseline's learning rate (default: ``train.lr``).
        """
        super().__init__(model, guide)
        self.num_particles = num_particles
        self.baseline_kind = baseline
        self.baseline_lr = baseline_lr
        self.average = RunningMoments(baseline_beta) if baseline != "none" else None
        self.baseline = NeuralBaseline(baseline_hidden) if baseline == "neural" else None
        self._elbo: Optional[_TraceGraphSurrogate] = None

    def _baseline_value(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``b`` in the shape of Pyro's downstream cost with vectorized
        particles: ``[K, B]``, or ``[B]`` when ``K = 1``."""
        shape = (self.num_particles, x.shape[0]) if self.num_particles > 1 else (x.shape[0],)
        if self.average is None:
            return None
        if self.baseline is None:
            return self.average.mean.expand(shape)
        return (self.average.mean + self.baseline(x)).expand(shape)

    @staticmethod
    def _declare(msg: dict, value: torch.Tensor, batch_size: int) -> dict:
        """``infer={"baseline": ...}`` for a score-function latent site."""
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg) or is_reparameterized(msg):
            return {}
        if tuple(msg["fn"].batch_shape) != (batch_size,):
            raise ConfigError(f"tracegraph_elbo's baselines take latent sites in the data plate alone (batch shape "
                              f"[{batch_size}]); site {msg['name']!r} has {list(msg['fn'].batch_shape)}")
        return {"baseline": {"baseline_value": value}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._elbo is None:
            self._elbo = _TraceGraphSurrogate(num_particles=self.num_particles, vectorize_particles=True,
                                              max_plate_nesting=self.nesting(x))
        value = self._baseline_value(x)
        guide = self.guide
        if value is not None:  # declared on every score-function site of the guide
            guide = poutine.infer_config(self.guide, lambda msg: self._declare(msg, value, x.shape[0]))
        loss, elbo = self._elbo.loss_and_elbo(self.model, guide, x)
        batch_mean_elbo = elbo / x.shape[0]
        if self.average is not None and self.training:
            self.average.update(batch_mean_elbo)
        return self.report(loss, x.shape[0], elbo=batch_mean_elbo)


@OBJECTIVES.register("meanfield_elbo")
class MeanFieldELBO(Objective):
    """E_q[log p(x|z)] - KL(q(z|x) || p(z)), KL analytic where registered; KL weight, annealing and free bits as options."""

    def __init__(self, model, guide, num_particles: int = 1, kl_weight: float = 1.0, kl_annealing: Annealing = "none",
                 anneal_steps: int = 10_000, cycles: int = 4, cycle_ratio: float = 0.5, free_bits: float = 0.0,
                 free_bits_per: Literal["dimension", "total"] = "dimension", aggressive: bool = False,
                 inner_steps: int = 100, mi_datapoints: int = 2000, mi_every: int = 0):
        """As Pyro's ``TraceMeanField_ELBO`` (the same loss and gradients for
        reparameterized guides, tested), and also for score-function sites,
        which Pyro's refuses: their learning signal is ``log p(x | z)`` alone,
        the KL's gradient being exact.  Like Pyro's, it assumes each site's KL
        does not depend on another site's sample (a mean-field guide, a prior
        without latent parents).

        The remedies for posterior collapse change the KL term of the loss
        (never the reported ELBO) over a minibatch of ``B``::

            loss = -sum_b E_q[log p(x_b | z)] + w(t) * B * F(KL),
            w(t) = kl_weight * annealing(t)     (:func:`pyro_vae.schedules.kl_annealing`)
            F = sum_d max(free_bits, (1/B) sum_b KL_bd)   (free_bits_per = "dimension", Kingma et al. 2016)
            F = max(free_bits, (1/B) sum_b KL_b)          (free_bits_per = "total")

        with ``free_bits = 0``, ``w = 1`` the plain ELBO.

        :param kl_weight: the KL's weight (below 1: a weaker pull to the prior).
        :param kl_annealing: ``none``, ``linear``, ``sigmoid`` or ``cyclical``, over ``anneal_steps`` optimizer steps.
        :param cycles: the cyclical schedule's periods; :param cycle_ratio: the rising fraction of each.
        :param free_bits: ``lambda``, nats of KL (per dimension or in total) the loss does not penalise.
        :param aggressive: He et al. (2019)'s aggressive encoder updates: while
            the phase lasts, each step first updates the guide alone on fresh
            training minibatches, up to ``inner_steps`` of them, until the loss
            summed over 10 of them stops falling, then the model alone on the
            step's batch; after each epoch (or every ``mi_every`` steps) the
            mutual information I(x; z) of the first ``mi_datapoints`` valid
            datapoints (:mod:`pyro_vae.decompose`) is measured and the phase
            ends when it no longer rises.  Then steps are the usual joint
            ones.  One process only.
        :param mi_every: steps between the phase's I(x; z) checks; ``0``:
            after each epoch, as He et al.'s text experiments.  A phase step
            costs ``min(inner_steps, 20) + 1`` ordinary ones or more, so on a
            long epoch checks every few hundred steps end the phase before it
            costs many epochs.  The epoch's row reports the latest check as
            ``phase_mutual_information`` with the phase flag ``aggressive``.
        """
        super().__init__(model, guide)
        if (kl_weight < 0 or free_bits < 0 or anneal_steps < 1 or cycles < 1 or not 0 < cycle_ratio <= 1
                or mi_every < 0):
            raise ConfigError("meanfield_elbo needs kl_weight >= 0, free_bits >= 0, anneal_steps >= 1, cycles >= 1, "
                              "0 < cycle_ratio <= 1 and mi_every >= 0")
        if mi_every and not aggressive:
            raise ConfigError("meanfield_elbo's mi_every paces the aggressive phase's checks: set aggressive = true, "
                              "or leave mi_every at 0")
        self.num_particles = num_particles
        self.kl_weight, self.kl_annealing, self.anneal_steps = kl_weight, kl_annealing, anneal_steps
        self.cycles, self.cycle_ratio, self.free_bits, self.free_bits_per = cycles, cycle_ratio, free_bits, free_bits_per
        self.aggressive, self.inner_steps, self.mi_datapoints = aggressive, inner_steps, mi_datapoints
        self.mi_every = mi_every
        if aggressive:  # the phase, the best MI so far and the latest check's unreported MI (NaN: none),
            # checkpointed with the objective's state and restored with it after a skipped bad step
            self.register_buffer("aggressive_phase", torch.tensor(True))
            self.register_buffer("best_mutual_information", torch.tensor(float("-inf")))
            self.register_buffer("unreported_mutual_information", torch.tensor(float("nan")))
        self._checked = False

    def step(self, x: torch.Tensor, optimizer) -> torch.Tensor:
        """A joint step, or during the aggressive phase the guide's inner steps then the model's step."""
        if self.takes_plain_step():
            return super().step(x, optimizer)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ConfigError("meanfield_elbo's aggressive encoder updates run in one process only (torchrun: 1)")
        if self.context.draw_batch is None:
            raise ConfigError("aggressive encoder updates draw their own minibatches: train through the trainer")
        checks = self.mi_every and (self.context.step + 1) % self.mi_every == 0
        if checks and self.context.valid is None:
            raise ConfigError("meanfield_elbo's mi_every checks the valid split: train through the trainer")
        previous, window = float("inf"), 0.0
        for inner in range(1, self.inner_steps + 1):
            window += float(self._partial_step(self.context.draw_batch(), optimizer, self.guide))
            if inner % 10 == 0:
                if window > previous:
                    break
                previous, window = window, 0.0
        loss = self._partial_step(x, optimizer, self.model)
        if checks:
            self._check_phase(self.context.valid)
        return loss

    def takes_plain_step(self) -> bool:
        """Plain once the aggressive phase is over (or without one)."""
        return not (self.aggressive and bool(self.aggressive_phase))

    def load_own_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.aggressive and "unreported_mutual_information" not in state:  # a checkpoint from before mi_every
            state = {**state, "unreported_mutual_information": torch.tensor(float("nan"))}
        super().load_own_state_dict(state)

    def _partial_step(self, x: torch.Tensor, optimizer, part: torch.nn.Module) -> torch.Tensor:
        """An optimizer step on ``part``'s parameters alone: the others' gradients
        are unset, so Adam leaves them and their moments untouched."""
        loss = self(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trained = {id(p) for p in part.parameters()}
        for p in self.parameters():
            if id(p) not in trained:
                p.grad = None
        optimizer.step()
        return loss.detach()

    def end_epoch(self, valid) -> dict[str, float]:
        """During the aggressive phase: I(x; z) on the valid datapoints, and the
        phase's end once it stops rising (or, with ``mi_every``, the epoch's last check)."""
        if not self.aggressive:
            return {}
        if not self.mi_every and bool(self.aggressive_phase):
            self._check_phase(valid)
        mutual_information = float(self.unreported_mutual_information)
        if math.isnan(mutual_information):
            return {}
        self.unreported_mutual_information.fill_(float("nan"))
        return {"phase_mutual_information": mutual_information, "aggressive": float(bool(self.aggressive_phase))}

    def _check_phase(self, valid) -> None:
        """I(x; z) on the first ``mi_datapoints`` of ``valid`` (kept until
        :meth:`end_epoch` reports it); the phase ends unless it beats the best so far."""
        from pyro_vae.decompose import decompose

        data = valid.head(self.mi_datapoints) if len(valid) > self.mi_datapoints else valid
        was_training = self.training
        self.eval()
        mutual_information = decompose(self.model, self.guide, data.batches(100), progress=False) \
            .summary()["mutual_information"]["mean"]
        self.train(was_training)
        if mutual_information <= float(self.best_mutual_information):
            self.aggressive_phase.fill_(False)
        else:
            self.best_mutual_information.fill_(mutual_information)
        self.unreported_mutual_information.fill_(mutual_information)

    def _check(self, particles) -> None:
        for name, site in latent_sites(particles.guide_trace):
            if not is_reparameterized(site) and not has_analytic_kl(site, particles.model_trace.nodes[name]):
                raise ConfigError(
                    f"meanfield_elbo needs an analytic KL at the score-function site {name!r} "
                    f"({type(site['fn']).__name__} against the prior's); use trace_elbo or tracegraph_elbo"
                )
        self._checked = True

    def penalty(self, kl: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What the objective subtracts from ``E_q[log p(x|z)]`` given the
        per-datapoint KL ``[K, B]``, and any metrics of its own: here the KL."""
        return kl, {}

    def kl_weight_now(self) -> float:
        """``w(t)`` at the context's step."""
        return self.kl_weight * kl_annealing(self.kl_annealing, self.context.step, self.anneal_steps, self.cycles,
                                             self.cycle_ratio)

    def free_bits_penalty(self, particles) -> torch.Tensor:
        """``B * F(KL)`` (see :meth:`__init__`), the KL averaged over particles first."""
        if self.free_bits_per == "dimension":
            kl = particles.kl_per_dimension().mean(0)  # [B, D]
            return kl.shape[0] * kl.mean(0).clamp_min(self.free_bits).sum()
        kl = particles.kl().mean(0)  # [B]
        return kl.shape[0] * kl.mean().clamp_min(self.free_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        particles = draw_particles(self.model, self.guide, x, self.num_particles, self.nesting(x))
        if not self._checked:
            self._check(particles)
        log_likelihood, kl = particles.log_likelihood(), particles.kl()
        signal = log_likelihood
        if not all(is_reparameterized(site) for _, site in latent_sites(particles.guide_trace)):
            signal = signal + score_term(log_likelihood, particles.log_guide(reparameterized=False))
        if self.free_bits > 0 or self.kl_weight != 1 or self.kl_annealing != "none":
            weight = self.kl_weight_now()
            loss = -signal.mean(0).sum() + weight * self.free_bits_penalty(particles)
            metrics = {"kl_weight": torch.tensor(weight)}
        else:
            penalty, metrics = self.penalty(kl)
            loss = -(signal - penalty).mean(0).sum()
        return self.report(loss, x.shape[0], elbo=log_likelihood - kl, kl=kl, **metrics)
