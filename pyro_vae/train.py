"""The training loop: the loss of ``objective(model, guide)`` (a PyTorch
module, see :mod:`pyro_vae.objectives`) minimised by :class:`torch.optim.Adam`
over the objective's parameter groups, one :meth:`Objective.step` a batch.

No finished work is lost.  A checkpoint (atomic, the previous one kept) is
written at the end of every epoch and every ``train.checkpoint_minutes``
inside one; it holds the model, guide, objective and optimizer states, the
step, the epoch's partial metric sums and every random generator's state, so
a run killed at any moment resumes from its last checkpoint and -- on the
same device -- follows bit for bit the path of a run never interrupted.
SIGINT and SIGTERM write a checkpoint after the current step and stop.
Epoch ``e`` shuffles with a generator seeded from ``seed`` and ``e`` alone.

A step whose loss or gradient is not finite changes no parameter; up to
``train.max_bad_steps`` of them are skipped, and the next stops training with
the site that went bad named, as does a loss exploding against its running
mean (``train.divergence_factor``); the last checkpoint stays intact.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae.checkpoint import describe, discard_newest, load_checkpoint, restore_weights, rng_state, save_checkpoint, set_rng_state
from pyro_vae.compiled import compile_objective
from pyro_vae.compiled_step import CompiledTrainStep, whole_step_unsupported
from pyro_vae.config import ExperimentConfig, MatmulPrecision
from pyro_vae.distributed import Ranks, init_ranks
from pyro_vae.divergence import DivergenceMonitor, GuardedOptimizer, locate_non_finite
from pyro_vae.errors import CheckpointError, ConfigError, TrainingDivergedError, TrainingInterrupted
from pyro_vae.evaluate import Evaluation, evaluate, matmul_precision_problem, mean_elbo
from pyro_vae.ex_post import ex_post_prior, fit_ex_post_prior
from pyro_vae.experiment import Experiment, resolve_device
from pyro_vae.interrupt import StopRequests
from pyro_vae.objectives import Objective, TrainingContext
from pyro_vae.aggregate import single_factorised_latent
from pyro_vae.decompose import decompose as decompose_split
from pyro_vae.mig import mutual_information_gap
from pyro_vae.plots import (latent_codes, save_curves, save_kl_bars, save_latent_scatter, save_manifold,
                            save_traversals)
from pyro_vae.rundir import RunDir, checkpoint_tag
from pyro_vae.schedules import lr_multiplier
from pyro_vae.tensorboard import TensorBoardLog, check_tensorboard
from pyro_vae.traces import guide_and_model_traces, is_reparameterized, latent_sites

log = logging.getLogger("pyro_vae")

VALID_BATCH = 1000  # datapoints a validation batch, at most
VALID_OUTPUTS = 50_000_000  # and at most this many model outputs (a sentence's T x vocabulary logits)
REPORT_EVERY = 50  # steps between progress-bar updates
RANK_SEED_STRIDE = 7_919  # separates the ranks' random streams
SCATTER_POINTS = 5000  # test images in the latent scatter
COLLAPSED_KL = 0.01  # nats per datapoint: an epoch's KL(q || p) below it says z carries nothing


def collapse_warning(row: dict[str, Any], model: torch.nn.Module) -> Optional[str]:
    """The warning for an epoch's metrics ``row`` whose training KL(q(z|x) || p(z))
    is below :data:`COLLAPSED_KL` nats per datapoint: posterior collapse, with
    its remedies.  ``None`` otherwise, when the objective reports no KL
    (``meanfield_elbo``, ``beta`` and ``capacity`` do), or when the model
    ignores z by design (``ignores_latent``: the sentence model's language model)."""
    kl = row.get("train_kl")
    if kl is None or kl >= COLLAPSED_KL or getattr(model, "ignores_latent", False):
        return None
    return (f"posterior collapse at epoch {row['epoch']}: KL(q(z|x) || p(z)) is {kl:.2g} nats per datapoint, so z "
            "carries almost nothing and the decoder ignores it. Remedies (options of meanfield_elbo): "
            "objective.kl_annealing, objective.free_bits, objective.aggressive, and model.word_dropout for text "
            "(README, 'Text: the sentence VAE and posterior collapse'); for the tanh MLP with the vamp prior, "
            "model.activation = guide.activation = \"relu\" (README, 'The catalogue compared')")


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def make_optimizer(param_groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """Adam over the objective's parameter groups (a group without its own
    ``lr`` gets ``lr``), its update fused into one kernel where the device
    supports it (CPU and CUDA: about 5x faster than the per-tensor loop for
    these models)."""
    try:
        return torch.optim.Adam(param_groups, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(param_groups, lr=lr)


def train_step(objective: Objective, optimizer: torch.optim.Optimizer | GuardedOptimizer, x: torch.Tensor,
               validate: bool = False) -> torch.Tensor:
    """One optimisation step of ``objective`` on ``x`` (the objective's own
    :meth:`~pyro_vae.objectives.Objective.step`); returns the detached loss.
    Pyro's argument validation runs only when ``validate`` (it costs ~1 ms a step)."""
    with pyro.validation_enabled(validate):
        return objective.step(x, optimizer)


@dataclass
class Progress:
    """Where a run stands: finished epochs' history, and the current epoch's
    steps taken, datapoints seen, metric sums and seconds so far."""

    history: list[dict[str, Any]] = field(default_factory=list)
    step_in_epoch: int = 0
    datapoints: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    bad_steps: int = 0

    @property
    def epoch(self) -> int:
        return len(self.history)

    def add(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """Per-datapoint batch means -> sums over datapoints (in place, one call:
        a step's ~5 metrics cost ~45 us as separate products and sums on the CPU)."""
        for name, value in metrics.items():
            if name not in self.sums:
                self.sums[name] = torch.zeros_like(value)
        torch._foreach_add_([self.sums[name] for name in metrics], list(metrics.values()), alpha=batch_size)
        self.datapoints += batch_size

    def means(self) -> dict[str, float]:
        return {f"train_{name}": value.item() / max(self.datapoints, 1) for name, value in self.sums.items()}

    def finish_epoch(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        self.step_in_epoch, self.datapoints, self.sums, self.seconds = 0, 0, {}, 0.0


class Trainer:
    """One ``train`` call on one run directory (see the module docstring)."""

    def __init__(self, experiment: Experiment, run: RunDir, state: Optional[dict[str, Any]] = None,
                 progress: bool = True, verbose: bool = True, ranks: Ranks = Ranks()):
        self.experiment, self.run, self.ranks = experiment, run, ranks
        self.progress_bar, self.verbose = progress and ranks.is_main, verbose and ranks.is_main
        self.cfg = cfg = experiment.config.train
        self.objective = objective = experiment.objective
        self.train_split = experiment.data["train"].head(cfg.limit) if cfg.limit else experiment.data["train"]
        if cfg.compile:
            compile_objective(objective)
            log.info("torch.compile: objective %s, its training step compiled whole on its first step "
                     "outside Pyro's validation", type(objective).__name__)
        objective.prepare(self.train_split.batch(slice(0, 2)))
        self.optimizer = make_optimizer(objective.param_groups(), cfg.lr)
        self.guard = GuardedOptimizer(self.optimizer, objective, ranks)
        self.monitor = DivergenceMonitor(cfg.divergence_factor)
        self.steps_per_epoch = self.train_split.num_batches(cfg.batch_size)
        if ranks.active and 0 < len(self.train_split) % cfg.batch_size < ranks.world_size:
            self.steps_per_epoch -= 1  # a last global batch too small to give every rank a datapoint is dropped
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(
            cfg.lr_schedule, self.steps_per_epoch, cfg.epochs * self.steps_per_epoch, cfg.warmup_steps))
        self.generator = torch.Generator(device=experiment.device)
        self.state = Progress()
        self.collapse_warned = False  # once a call
        self.resume_rng: Optional[dict[str, Any]] = None
        if state is not None:
            self._restore(state)
        # (after the restore: the checkpoint's optimizer groups, e.g. not fused, decide)
        self.compiled_step = self._compiled_step() if cfg.compile else None
        objective.context = TrainingContext(
            step=self.state.epoch * self.steps_per_epoch + self.state.step_in_epoch,
            epoch=self.state.epoch + 1, num_train=len(self.train_split), steps_per_epoch=self.steps_per_epoch,
            draw_batch=self._random_batch, valid=experiment.data["valid"])
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_step: Optional[int] = None  # context.step of this call's newest checkpoint

    def _compiled_step(self) -> Optional[CompiledTrainStep]:
        """``train.compile``'s whole step (:mod:`pyro_vae.compiled_step`), where it applies."""
        reason = whole_step_unsupported(self.guard)
        if reason:
            log.info("torch.compile: the objective's forward alone, not the whole step: %s", reason)
            return None
        return CompiledTrainStep(self.objective, self.guard)

    def _random_batch(self) -> torch.Tensor:
        """``batch_size`` training datapoints drawn uniformly (with replacement), from the trainer's generator."""
        index = torch.randint(len(self.train_split), (self.cfg.batch_size,), device=self.experiment.device,
                              generator=self.generator)
        return self.train_split.batch(index, self.generator)

    def _restore(self, state: dict[str, Any]) -> None:
        exp, objective = self.experiment, self.objective
        restore_weights(exp.model, exp.guide, state, exp.data.event_shape, self.run.checkpoint)
        if state.get("objective"):
            try:
                objective.load_own_state_dict(state["objective"])
            except RuntimeError as exc:
                raise CheckpointError(f"{self.run.checkpoint}: {exc}; was the objective's code changed?") from None
        bases = list(self.scheduler.base_lrs)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.run.checkpoint}: the optimizer state does not fit the parameters "
                                  f"({exc}); was a part's code changed?") from None
        steps = state["epoch"] * self.steps_per_epoch + state.get("step_in_epoch", 0)
        if state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # a checkpoint from before schedules: the schedule's position is the step
            self.scheduler.last_epoch = steps
        self.scheduler.base_lrs = bases  # the learning rate and its schedule may change on resume
        for group, base, factor in zip(self.optimizer.param_groups, bases, self._factors()):
            group["initial_lr"], group["lr"] = base, base * factor
        self.state = Progress(history=list(state["history"]), step_in_epoch=state.get("step_in_epoch", 0),
                              datapoints=state.get("datapoints", 0), sums=dict(state.get("sums", {})),
                              seconds=state.get("seconds", 0.0), bad_steps=state.get("bad_steps", 0))
        self.monitor.running_mean = state.get("divergence_mean")
        if self.state.step_in_epoch:
            if state.get("device") == exp.device.type:
                self.resume_rng = state
            else:
                log.warning("the checkpoint was written on %s and training goes on on %s: the rest of epoch %d "
                            "is shuffled afresh (some of its images are seen twice, others not at all) and the "
                            "run no longer follows the uninterrupted path", state.get("device"), exp.device.type,
                            self.state.epoch + 1)

    def _factors(self) -> list[float]:
        """The schedule's multiplier for each parameter group at the scheduler's step."""
        return [fn(self.scheduler.last_epoch) for fn in self.scheduler.lr_lambdas]

    def checkpoint(self) -> None:
        """Save where the run stands (rank 0 alone writes)."""
        objective, s = self.objective, self.state
        if not self.ranks.is_main:
            return
        save_checkpoint(
            {
                "model": objective.model.state_dict(),
                "guide": objective.guide.state_dict(),
                "objective": objective.own_state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch": s.epoch,
                "step_in_epoch": s.step_in_epoch,
                "datapoints": s.datapoints,
                "sums": s.sums,
                "seconds": s.seconds,
                "bad_steps": s.bad_steps,
                "divergence_mean": self.monitor.running_mean,
                "history": s.history,
                "rng": rng_state(),
                "generator": self.generator.get_state(),
                "device": self.experiment.device.type,
                "event_shape": list(self.experiment.data.event_shape),
            },
            self.run.checkpoint,
        )
        self.last_checkpoint = time.monotonic()
        self.last_checkpoint_step = objective.context.step

    def _diverged(self, what: str) -> TrainingDivergedError:
        """The error to stop with.  A checkpoint written right after the
        previous step holds the parameters this step's loss has just shown to
        be bad: it is set aside and the one before it becomes the newest."""
        s = self.state
        where = (f"the end of epoch {s.epoch + 1}" if s.step_in_epoch >= self.steps_per_epoch
                 else f"epoch {s.epoch + 1}, step {s.step_in_epoch + 1}")
        advice = f"Lower train.lr (e.g. --set train.lr={self.cfg.lr / 3:.3g}) and run the same command again"
        if self.last_checkpoint_step == self.objective.context.step and self.ranks.is_main:
            discard_newest(self.run.checkpoint)
        self.ranks.barrier()  # every rank found it at this step: none leaves before the others have
        if self.run.checkpoint.is_file():
            saved = load_checkpoint(self.run.checkpoint)
            return TrainingDivergedError(
                f"{what} at {where}; the checkpoint of {describe(saved)} in {self.run.checkpoint} is intact. "
                f"{advice}: it resumes from there (the learning rate may change on resume).")
        return TrainingDivergedError(f"{what} at {where}, before the first checkpoint. {advice}.")

    def _culprit(self, x: torch.Tensor) -> str:
        model, guide = self.objective.model, self.objective.guide
        return locate_non_finite(model, guide, x, {"model": model, "guide": guide})

    def step(self, x: torch.Tensor, stop_requested: bool = False) -> bool:
        """One optimizer step on the batch ``x`` (Pyro's validation on an
        epoch's first step), checked for divergence, its metrics added to the
        epoch's sums.  A skipped bad batch also leaves the objective's own
        state (running baselines) as it was, when ``max_bad_steps`` allows skips.
        Returns whether any rank was asked to stop (``stop_requested`` here)."""
        objective, s, cfg = self.objective, self.state, self.cfg
        own_state = {k: v.clone() for k, v in objective.own_state_dict().items()} if cfg.max_bad_steps else None
        self.guard.batch_size, self.guard.stop = x.shape[0], stop_requested
        try:
            validate = s.step_in_epoch == 0
            loss = self.compiled_step.step(x, validate) if self.compiled_step else \
                train_step(objective, self.guard, x, validate)
            per_datapoint = self.guard.loss_per_datapoint if self.ranks.active else loss.item() / x.shape[0]
        except ValueError as exc:  # Pyro's validation found NaN distribution parameters: no update was made
            if "invalid values" not in str(exc):
                raise
            self.guard.poison()
            self.guard.step()  # (other ranks wait for this rank's part of the collective)
            per_datapoint = math.nan
        skipped = self.guard.skipped
        verdict = self.monitor.classify(per_datapoint, skipped)
        if verdict == "exploded":
            raise self._diverged(
                f"the loss exploded to {per_datapoint:.4g} nats per datapoint against a running mean of "
                f"{self.monitor.running_mean:.4g} (train.divergence_factor = {cfg.divergence_factor})")
        if verdict == "bad":
            culprit = self._culprit(x)
            s.bad_steps += 1
            if s.bad_steps > cfg.max_bad_steps:
                raise self._diverged(f"the loss or its gradient became NaN or infinite ({culprit} is not finite; "
                                     f"{s.bad_steps - 1} bad steps skipped of train.max_bad_steps = "
                                     f"{cfg.max_bad_steps})")
            objective.load_own_state_dict(own_state)
            log.warning("skipped a batch whose loss or gradient is not finite (%s) at epoch %d, step %d "
                        "(%d of train.max_bad_steps = %d)", culprit, s.epoch + 1, s.step_in_epoch + 1,
                        s.bad_steps, cfg.max_bad_steps)
        else:
            s.add(objective.metrics, x.shape[0])
        s.step_in_epoch += 1
        objective.context.step += 1
        self.scheduler.step()  # the schedule counts every step, skipped or not, as the context does
        return self.guard.stop_any

    def _train_epoch(self, epoch: int, stop: StopRequests, board: Optional[TensorBoardLog]) -> None:
        cfg, objective, s = self.cfg, self.objective, self.state
        self.generator.manual_seed(epoch_seed(cfg.seed, epoch))
        order = self.train_split.permutation(self.generator)  # the same on every rank
        if self.ranks.active:  # each rank its own draws (latents, binarization), from the epoch, rank and step
            seed = epoch_seed(cfg.seed, epoch) + RANK_SEED_STRIDE * self.ranks.rank + s.step_in_epoch
            pyro.set_rng_seed(seed)
            self.generator.manual_seed(seed)
            self.resume_rng = None
        elif self.resume_rng is not None:  # mid-epoch: continue the interrupted random streams
            set_rng_state(self.resume_rng["rng"])
            self.generator.set_state(self.resume_rng["generator"].cpu())  # (moved with a checkpoint loaded onto CUDA)
            self.resume_rng = None
        else:
            pyro.set_rng_seed(epoch_seed(cfg.seed, epoch))
        objective.context.epoch = epoch
        objective.train()
        bar = tqdm(total=self.steps_per_epoch, initial=s.step_in_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not self.progress_bar, leave=False)
        start = time.perf_counter()
        while s.step_in_epoch < self.steps_per_epoch:
            i = s.step_in_epoch * cfg.batch_size
            index = self.ranks.shard(order[i: i + cfg.batch_size])
            stopping = self.step(self.train_split.batch(index, self.generator), stop.received is not None)
            if not self.ranks.active:  # alone, a signal that arrived during the step stops after it
                stopping = stop.received is not None
            bar.update()
            if s.step_in_epoch % REPORT_EVERY == 0:
                bar.set_postfix({k.removeprefix("train_"): f"{v:.2f}" for k, v in s.means().items()
                                 if k in ("train_loss", "train_elbo")})
            if stopping or (s.step_in_epoch < self.steps_per_epoch
                            and time.monotonic() - self.last_checkpoint >= 60 * cfg.checkpoint_minutes):
                s.seconds += time.perf_counter() - start
                start = time.perf_counter()
                self.checkpoint()
            if stopping:
                bar.close()
                signum = stop.received or signal.SIGTERM  # (another rank's signal)
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(signum).name} at epoch {epoch}, step {s.step_in_epoch} of "
                    f"{self.steps_per_epoch}; checkpoint written to {self.run.checkpoint}. Run the same command "
                    "again to resume.", signum)
        bar.close()
        if self.ranks.active:  # the epoch's sums over every rank's parts
            totals = [*s.sums.values(), torch.tensor(float(s.datapoints))]
            self.ranks.all_reduce_sum_(totals)
            s.datapoints = int(totals[-1].item())
        if s.datapoints == 0:
            raise self._diverged("every batch of the epoch was bad")
        metrics = s.means()
        objective.eval()
        valid_elbo = self._valid_elbo()
        if not math.isfinite(valid_elbo):
            raise self._diverged(f"the valid ELBO became {valid_elbo}")
        seconds = s.seconds + time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]  # after the epoch's last step (it varies under a schedule)
        ends = objective.end_epoch(self.experiment.data["valid"])  # e.g. the end of aggressive encoder updates
        if cfg.latent_diagnostics:
            ends.update(self._latent_diagnostics(cfg.latent_diagnostics))
        s.finish_epoch({"epoch": epoch, **metrics, "valid_elbo": valid_elbo, **ends, "lr": lr, "seconds": seconds})
        warning = collapse_warning(s.history[-1], self.experiment.model)
        if warning and not self.collapse_warned and self.ranks.is_main:
            log.warning(warning)
            self.collapse_warned = True
        self.checkpoint()
        if self.ranks.is_main:
            self.run.write_metrics(s.history)
        if board is not None:
            board.scalars({k.replace("_", "/", 1): v for k, v in s.history[-1].items() if k not in ("epoch",)},
                          objective.context.step)
        if self.verbose:
            row = s.history[-1]
            train_elbo = f"train ELBO {row['train_elbo']:9.3f}  " if "train_elbo" in row else ""
            tqdm.write(f"epoch {epoch:>4}  loss {row['train_loss']:9.3f}  {train_elbo}"
                       f"valid ELBO {valid_elbo:9.3f}  ({seconds:.1f} s)", file=sys.stderr)

    def _valid_batch(self) -> int:
        """Validation batch size: :data:`VALID_BATCH`, or fewer where a datapoint's outputs are many."""
        data = self.experiment.data
        outputs = math.prod(data.event_shape) * data.outputs_per_value
        return max(1, min(VALID_BATCH, VALID_OUTPUTS // outputs))

    def _latent_diagnostics(self, datapoints: int) -> dict[str, float]:
        """I(x; z), active units and KL over the first ``datapoints`` valid
        datapoints (:mod:`pyro_vae.decompose`), the signs of posterior collapse."""
        valid = self.experiment.data["valid"]
        parts = decompose_split(self.objective.model, self.objective.guide,
                                valid.head(min(datapoints, len(valid))).batches(self._valid_batch()), progress=False)
        summary = parts.summary()
        return {"valid_mutual_information": summary["mutual_information"]["mean"],
                "valid_active_units": summary["active_units"], "valid_kl": summary["kl"]["mean"]}

    def _valid_elbo(self) -> float:
        """The one-sample ELBO averaged over the valid split (each rank its part)."""
        valid = self.experiment.data["valid"].part(self.ranks.rank, self.ranks.world_size)
        objective = self.objective
        total = torch.tensor([mean_elbo(objective.model, objective.guide, valid.batches(self._valid_batch())) * len(valid),
                              float(len(valid))])
        self.ranks.all_reduce_sum_([total])
        return (total[0] / total[1]).item()

    def fit(self, tensorboard: bool = False) -> list[dict[str, Any]]:
        """Train up to ``train.epochs``; returns the per-epoch history."""
        if self.state.history and self.ranks.is_main:  # a kill between the checkpoint and metrics.csv left it short
            self.run.write_metrics(self.state.history)
        board = TensorBoardLog(self.run.path, self.objective.context.step) if tensorboard and self.ranks.is_main else None
        try:
            with StopRequests() as stop:
                for epoch in range(self.state.epoch + 1, self.cfg.epochs + 1):
                    self._train_epoch(epoch, stop, board)
                if stop.received:  # arrived during the last epoch's validation or checkpoint
                    raise TrainingInterrupted(
                        f"stopped by {stop.name} after the last epoch; its checkpoint {self.run.checkpoint} is "
                        f"complete. Run `pyro-vae evaluate {self.run.path}` to evaluate it.", stop.received)
        finally:
            if board is not None:
                board.close()
        return self.state.history


def fit(experiment: Experiment, run: RunDir, state: Optional[dict[str, Any]] = None, progress: bool = True,
        verbose: bool = True, tensorboard: bool = False) -> list[dict[str, Any]]:
    """Train ``experiment`` up to ``train.epochs`` in ``run``, resuming from
    the checkpoint ``state`` (default: the run's checkpoint, if it has one).
    ``progress`` shows a bar per epoch, ``verbose`` a line per finished
    epoch.  Returns the per-epoch history: the objective's metrics averaged
    over the epoch's datapoints (``train_loss``, ``train_elbo``, ...), the
    valid ELBO, the learning rate and the seconds taken."""
    run.path.mkdir(parents=True, exist_ok=True)
    if state is None and run.checkpoint.is_file():
        state = load_checkpoint(run.checkpoint, map_location=experiment.device)
    return Trainer(experiment, run, state, progress, verbose).fit(tensorboard)


def evaluate_run(experiment: Experiment, split: str, num_samples: int, chunk_size: int,
                 batch_size: int, limit: int | None, progress: bool = True, decompose: bool = False,
                 compile: bool = False, matmul_precision: MatmulPrecision = "ieee") -> Evaluation:
    """Evaluate the experiment's model/guide on (the first ``limit`` datapoints
    of) one split, timing it; with ``decompose``, also the KL decomposition
    over the same datapoints (:mod:`pyro_vae.decompose`) and, where the data
    carry generative factors (labels ``[N, K]``), the MIG.  The result's
    ``limit`` is ``None`` when the whole split was evaluated."""
    experiment.check_guide_density(num_samples)
    data = experiment.data[split]
    if limit and limit < len(data):
        data = data.head(limit)
    else:
        limit = None  # the whole split
    start = time.perf_counter()
    result = evaluate(
        experiment.model, experiment.guide, data.batches(batch_size), num_samples,
        chunk_size=chunk_size, num_batches=data.num_batches(batch_size), progress=progress,
        outputs_per_value=experiment.data.outputs_per_value, compile=compile, matmul_precision=matmul_precision,
    )
    if decompose:
        parts = decompose_split(experiment.model, experiment.guide, data.batches(batch_size), progress=progress)
        result.extra["decomposition"] = parts.summary()
        if data.labels.dim() == 2 and data.labels.shape[1] > 0:  # known generative factors
            result.extra["mig"] = mutual_information_gap(parts.codes, data.labels.cpu().numpy())
    result.extra.update(**experiment.data.unit_metrics(result.log_likelihood, data), split=split, limit=limit, seconds=round(time.perf_counter() - start, 1))
    return result


def save_latent_pictures(run: RunDir, experiment: Experiment, kl_per_dim: Optional[dict[str, list[float]]] = None) -> None:
    """For images and a guide with one continuous latent site (nothing otherwise): the
    test codes scattered by label (2-D, or their first two principal
    components) with the ellipses of a prior fitted to the codes
    (:mod:`pyro_vae.ex_post`), the decoded manifold of a 2-D latent and,
    given an evaluation's per-dimension KL of a site that factorises over its
    dimensions, the latent traversals around the first test datapoint's code
    and the per-dimension KL bars."""
    x = experiment.data["test"].batch(slice(0, 1))
    with torch.no_grad():
        guide_trace, _ = guide_and_model_traces(experiment.model, experiment.guide, x)
    sites = list(latent_sites(guide_trace))
    if len(sites) != 1 or not is_reparameterized(sites[0][1]) or experiment.data.modality != "images":
        return
    site = sites[0][0]
    kl = (kl_per_dim or {}).get(site, [])
    if len(kl) >= 2 and len(kl_per_dim) == 1:
        try:
            single_factorised_latent(guide_trace, "latent traversals")
        except ConfigError:
            pass  # e.g. a low-rank Normal: no per-dimension traversal
        else:
            with run.atomic("traversals.png") as path:
                save_traversals(experiment.model, experiment.guide, x, kl, experiment.data.event_shape, path)
            with run.atomic("kl_per_dim.png") as path:
                save_kl_bars(kl, path)
    test = experiment.data["test"].head(SCATTER_POINTS)
    codes = latent_codes(experiment.guide, test.batches(1000))
    prior = ex_post_prior(experiment.model)
    mixture = prior.mixture_state() if prior is not None and prior.fitted else None
    if test.labels.dim() == 1:  # one label per image (a digit): the codes coloured by it
        with run.atomic("latent_scatter.png") as path:
            save_latent_scatter(codes, test.labels, path, mixture)
    if codes.shape[1] == 2:
        with run.atomic("manifold.png") as path:
            save_manifold(experiment.model, site, experiment.data.event_shape, path)


def record(run: RunDir, result: Evaluation, report: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write ``result`` into ``run`` (see :meth:`RunDir.record_evaluation`); returns its summary."""
    return run.record_evaluation(result.summary(), {"elbo": result.elbo, "log_likelihood": result.log_likelihood,
                                                    "khat": result.khat}, report)


def train_and_evaluate(config: ExperimentConfig, run_dir: str | Path, overwrite: bool = False,
                       progress: bool = True, evaluate_after: bool = True,
                       from_previous: bool = False) -> dict[str, Any]:
    """Train ``config`` in ``run_dir``, draw the pictures, evaluate on
    ``config.eval.split`` (unless not ``evaluate_after``), and write
    ``report.json``.  The config, data and device are checked before
    anything is written.  Returns the report."""
    run = RunDir(run_dir)
    device = resolve_device(config.train.device)
    ranks = init_ranks(device)
    experiment = Experiment.build(config, device)
    tensorboard = check_tensorboard(config.train.tensorboard)
    if evaluate_after and config.eval.iw_samples and (
            problem := matmul_precision_problem(config.eval.matmul_precision, experiment.device)):
        raise ConfigError(problem)  # (before training, not after it)
    state = run.resume_state(config, overwrite=overwrite and ranks.is_main, from_previous=from_previous,
                             map_location=experiment.device)
    trainer = Trainer(experiment, run, state, progress, ranks=ranks)  # restores the checkpoint: a misfit is refused here
    if ranks.is_main:
        run.start_session(config, state)
    ranks.barrier()
    start = time.perf_counter()
    history = trainer.fit(tensorboard)
    if not ranks.is_main:  # rank 0 draws and evaluates
        return {}

    ev = config.eval
    ex_post = fit_ex_post_prior(run, experiment)  # before the samples, which come from it
    experiment.objective.eval()  # training-only noise (word dropout) off from here on
    experiment.data.save_pictures(run, experiment.model, experiment.guide, ev.split)  # the modality's own
    if history:
        with run.atomic("curves.png") as path:
            save_curves(history, path)
    report = {
        "run_dir": str(run.path),
        "epochs": len(history),
        "train_seconds": round(sum(row["seconds"] for row in history), 1),
        "device": str(experiment.device),
        "final_train_elbo": history[-1].get("train_elbo") if history else None,
        "final_valid_elbo": history[-1]["valid_elbo"] if history else None,
        **({"ex_post_prior": ex_post} if ex_post else {}),
    }
    if not evaluate_after or ev.iw_samples == 0:
        report = run.read_report() | report
        run.write_json("report.json", report)
        if ev.iw_samples == 0:  # no evaluation will draw them
            save_latent_pictures(run, experiment)
        return report
    result = evaluate_run(experiment, ev.split, ev.iw_samples, ev.chunk_size, ev.batch_size, ev.limit, progress,
                          decompose=ev.decompose, compile=ev.compile, matmul_precision=ev.matmul_precision)
    result.extra.update(epoch=len(history), checkpoint=checkpoint_tag({"epoch": len(history)}))
    report["wall_seconds_this_call"] = round(time.perf_counter() - start, 1)
    summary = record(run, result, report)
    save_latent_pictures(run, experiment, summary["kl_per_dim"])
    return run.read_report()
