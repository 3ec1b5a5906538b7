"""train.compile's whole step (forward, gradient, check and guarded Adam in one
graph) against the eager guarded step: the same loss, metrics, parameters,
Adam state and objective state, a skipped bad batch, learning rates that move
without recompiling, and the cases that keep the eager step."""
import copy
import logging

import pyro
import pytest
import torch

from conftest import requires_cuda
from linear_gaussian import LearnableMeanFieldGuide, LinearGaussianModel
from pyro_vae import registry
from pyro_vae.compiled_step import CompiledTrainStep, whole_step_unsupported
from pyro_vae.distributed import Ranks
from pyro_vae.divergence import GuardedOptimizer
from pyro_vae.objectives import Objective
from pyro_vae.objectives.elbo import MeanFieldELBO
from pyro_vae.train import make_optimizer, train_step

EVENT = (1, 6, 6)


def _parts(latent: str, device: str, hidden: int = 16):
    prior, guide = ("standard_normal", "normal") if latent == "gaussian" else ("bernoulli", "bernoulli")
    torch.manual_seed(0)
    prior = registry.PRIORS.build(prior, {}, latent_dim=4)
    model = registry.MODELS.build("mlp", {"latent_dim": 4, "hidden": [hidden, hidden]}, prior=prior, event_shape=EVENT)
    guide = registry.GUIDES.build(guide, {"hidden": [16]}, event_shape=EVENT, latent_dim=4)
    return model.to(device), guide.to(device)


def _stepper(objective, lr=1e-2):
    objective.prepare(torch.zeros(2, *EVENT, device=next(objective.parameters()).device))
    guard = GuardedOptimizer(make_optimizer(objective.param_groups(), lr), objective)
    return guard, CompiledTrainStep(objective, guard)


def _pair(name, options, latent, device="cpu", hidden=16):
    """The same objective twice: one stepped whole and compiled, one by the eager guarded step."""
    model, guide = _parts(latent, device, hidden)
    compiled = registry.OBJECTIVES.build(name, options)(model, guide)
    compiled.prepare(torch.zeros(2, *EVENT, device=device))  # (shapes NVIL's lazy baseline network)
    eager = copy.deepcopy(compiled)
    guard, stepper = _stepper(compiled)
    eager_guard, _ = _stepper(eager)
    return (compiled, guard, stepper), (eager, eager_guard)


def _batch(seed, device="cpu", n=8):
    return torch.bernoulli(torch.full((n, *EVENT), 0.3, device=device),
                           generator=torch.Generator(device).manual_seed(seed))


def _assert_same_state(compiled, guard, eager, eager_guard):
    """Parameters to 1e-3 of their group's learning rate: Adam's step is scale-free, so a
    gradient entry near zero turns its rounding into a visible part of a step of size ~lr."""
    for ours, theirs in zip(guard.optimizer.param_groups, eager_guard.optimizer.param_groups):
        for p, q in zip(ours["params"], theirs["params"]):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-3 * theirs["lr"]), p.shape
    for p, q in zip(compiled.parameters(), eager.parameters()):
        ours, theirs = guard.optimizer.state[p], eager_guard.optimizer.state[q]
        assert ours.keys() == theirs.keys()
        assert torch.equal(ours["step"], theirs["step"])
        for key in ("exp_avg", "exp_avg_sq"):  # gradients to float rounding of the largest entry
            assert torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5 * theirs[key].abs().max()), key
    buffers = dict(compiled.named_buffers())
    for key, value in eager.named_buffers():  # running baselines' moments
        assert torch.allclose(buffers[key], value, rtol=1e-5), key


@pytest.mark.parametrize("name, options, latent", [
    ("meanfield_elbo", {}, "gaussian"), ("trace_elbo", {}, "gaussian"), ("iwae", {"num_particles": 3}, "gaussian"),
    ("nvil", {"baseline_lr": 0.05}, "bernoulli"),
    ("meanfield_elbo", {"kl_annealing": "linear", "anneal_steps": 20}, "gaussian"),
    ("capacity", {"anneal_steps": 10}, "gaussian")])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_the_whole_step_is_the_eager_guarded_step(device, name, options, latent):
    """From the same generator state, five steps (the fourth validated, so
    eager on the same optimizer state; the first compiled, making Adam's
    state) give the eager loss and metrics, and leave the eager parameters,
    Adam moments and step counts, and objective state (NVIL's running
    moments; its baseline in its own parameter group with its own learning
    rate; a KL weight and a capacity that move with the step).  NVIL's first step is validated too, as the trainer validates an
    epoch's first: that step centres the signal on its own batch, so the
    baseline's bias has a gradient of rounding noise, whose sign Adam's
    first step turns into a full step either way."""
    (compiled, guard, stepper), (eager, eager_guard) = _pair(name, options, latent, device)
    validated = (0, 3) if name == "nvil" else (3,)
    for step in range(5):
        x = _batch(step, device)
        compiled.context.step = eager.context.step = step  # (annealing and capacity schedules read it)
        torch.manual_seed(step)
        loss = stepper.step(x, validate=step in validated)
        torch.manual_seed(step)
        eager_loss = train_step(eager, eager_guard, x, validate=step in validated)
        assert stepper.call.compiled is not None  # captured whole: it did not fall back
        assert not guard.skipped
        assert torch.allclose(loss, eager_loss, rtol=1e-5), step
        assert compiled.metrics.keys() == eager.metrics.keys()
        for key in eager.metrics:
            assert torch.allclose(compiled.metrics[key], eager.metrics[key], rtol=1e-5, atol=1e-6), (step, key)
    _assert_same_state(compiled, guard, eager, eager_guard)


def test_a_batch_with_a_non_finite_loss_changes_nothing_and_is_reported_skipped():
    """A NaN datapoint makes the loss NaN: no parameter, moment or step count
    moves, ``guard.skipped`` says so; the next batch steps as the eager run does."""
    (compiled, guard, stepper), (eager, eager_guard) = _pair("meanfield_elbo", {}, "gaussian")
    for step in range(2):
        torch.manual_seed(step)
        stepper.step(_batch(step))
        torch.manual_seed(step)
        train_step(eager, eager_guard, _batch(step))
    before = copy.deepcopy((compiled.state_dict(), guard.optimizer.state_dict()))
    bad = _batch(9)
    bad[0, 0, 0, 0] = float("nan")
    stepper.step(bad)
    assert guard.skipped and stepper.call.compiled is not None
    after = (compiled.state_dict(), guard.optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), after[0].values()))
    for p_before, p_after in zip(before[1]["state"].values(), after[1]["state"].values()):
        assert all(torch.equal(p_before[k], p_after[k]) for k in p_before)
    torch.manual_seed(5)
    stepper.step(_batch(5))
    torch.manual_seed(5)
    train_step(eager, eager_guard, _batch(5))
    assert not guard.skipped
    _assert_same_state(compiled, guard, eager, eager_guard)


class RootLoss(Objective):
    """loss = sum_ij sqrt|w_ij| of the model's weight: finite at w_ij = 0, where its gradient is not
    (0 * inf through |w|: NaN)."""

    def forward(self, x):
        return self.report(self.model.weight.abs().sqrt().sum() + 0 * x.sum(), x.shape[0])


def test_a_finite_loss_with_a_non_finite_gradient_changes_nothing():
    model, guide = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    objective = RootLoss(model, guide)
    guard, stepper = _stepper(objective)
    with torch.no_grad():
        model.weight.fill_(1.0)
    stepper.step(torch.zeros(4, 2))  # a good step first: the state exists
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    before = copy.deepcopy((model.weight.detach(), guard.optimizer.state_dict()["state"]))
    loss = stepper.step(torch.zeros(4, 2))
    assert torch.isfinite(loss) and guard.skipped and stepper.call.compiled is not None
    assert not torch.isfinite(model.weight.grad[0, 0])  # left in .grad, where the trainer looks for the culprit
    assert torch.equal(model.weight, before[0])
    for key, state in guard.optimizer.state_dict()["state"].items():
        assert all(torch.equal(state[k], before[1][key][k]) for k in state)


def test_a_new_learning_rate_takes_effect_without_recompiling():
    """A schedule sets each group's ``lr`` between steps: the rate is a graph
    input, so the step follows the eager one without a new graph (with a
    recompile limit of 1 a new graph would fall back to eager).  The first
    step is validated, hence eager, as the trainer's first step of an epoch."""
    (compiled, guard, stepper), (eager, eager_guard) = _pair("nvil", {"baseline_lr": 0.05}, "bernoulli")
    with torch._dynamo.config.patch(recompile_limit=1):
        for step, factor in enumerate([1.0, 1.0, 0.5, 0.1, 2.0]):
            for optimizer in (guard.optimizer, eager_guard.optimizer):
                for group, base in zip(optimizer.param_groups, (1e-2, 0.05)):
                    group["lr"] = base * factor
            torch.manual_seed(step)
            stepper.step(_batch(step), validate=step == 0)
            torch.manual_seed(step)
            train_step(eager, eager_guard, _batch(step), validate=step == 0)
    assert stepper.call.compiled is not None
    _assert_same_state(compiled, guard, eager, eager_guard)


def test_each_step_object_has_dynamos_graph_limit_to_itself():
    """Dynamo keeps 8 graphs a code object; each trainer's step takes up to
    three (here: an annealed step counter made a graph input, and a short
    batch).  Ten step objects of ten decoder widths in one process all stay
    compiled."""
    steppers = []
    for hidden in range(8, 18):
        (objective, _, stepper), _ = _pair("meanfield_elbo", {"kl_annealing": "linear", "anneal_steps": 20}, "gaussian",
                                           hidden=hidden)
        for step, n in enumerate((8, 8, 5)):
            objective.context.step = step
            stepper.step(_batch(step, n=n))
        steppers.append(stepper)
    assert all(stepper.call.compiled is not None for stepper in steppers)


def test_aggressive_encoder_updates_take_the_objectives_own_step(monkeypatch):
    """While the aggressive phase lasts the objective's own step runs (inner
    guide steps, then the model's); the whole step once it has ended."""
    model, guide = _parts("gaussian", "cpu")
    objective = MeanFieldELBO(model, guide, aggressive=True, inner_steps=2)
    objective.context.draw_batch = lambda: _batch(7)
    guard, stepper = _stepper(objective)
    own_steps = []
    monkeypatch.setattr(MeanFieldELBO, "step", lambda self, x, opt: own_steps.append(1) or torch.tensor(0.0))
    stepper.step(_batch(0))
    assert own_steps == [1]
    objective.aggressive_phase.fill_(False)
    stepper.step(_batch(1))
    assert own_steps == [1] and not guard.skipped
    assert guard.optimizer.state[next(objective.parameters())]["step"] == 1


def test_what_keeps_the_eager_step_is_named():
    model, guide = _parts("gaussian", "cpu")
    objective = registry.OBJECTIVES.build("meanfield_elbo", {})(model, guide)
    fused = make_optimizer(objective.param_groups(), 1e-3)
    assert whole_step_unsupported(GuardedOptimizer(fused, objective)) is None
    assert "several processes" in whole_step_unsupported(GuardedOptimizer(fused, objective, Ranks(0, 2)))
    loop = torch.optim.Adam(objective.parameters(), lr=1e-3)
    assert "not fused Adam" in whole_step_unsupported(GuardedOptimizer(loop, objective))
    sgd = torch.optim.SGD(objective.parameters(), lr=1e-3)
    assert "SGD, not Adam" in whole_step_unsupported(GuardedOptimizer(sgd, objective))


def test_a_step_that_cannot_be_captured_falls_back_to_the_eager_guarded_step(caplog):
    """The linear-Gaussian pair runs Pyro's handlers: one warning, then the
    eager guarded step, which still trains it."""
    model = LinearGaussianModel()
    objective = registry.OBJECTIVES.build("trace_elbo", {})(model, LearnableMeanFieldGuide(model))
    eager = copy.deepcopy(objective)
    x = model.sample_data(16)
    guard = GuardedOptimizer(make_optimizer(objective.param_groups(), 1e-2), objective)
    eager_guard = GuardedOptimizer(make_optimizer(eager.param_groups(), 1e-2), eager)
    stepper = CompiledTrainStep(objective, guard)
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        torch.manual_seed(0)
        loss = stepper.step(x)
    assert "torch.compile cannot compile the training step of TraceELBO whole" in caplog.text
    assert stepper.call.compiled is None
    torch.manual_seed(0)
    assert torch.equal(loss, train_step(eager, eager_guard, x))
    assert all(torch.equal(p, q) for p, q in zip(objective.parameters(), eager.parameters()))
    assert not torch.equal(objective.guide.shift, torch.full((3,), 0.3, dtype=torch.float64))
