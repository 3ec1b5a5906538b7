"""The remedies for posterior collapse: KL annealing schedules and free bits
against their formulas."""
import math

import pyro
import pytest
import torch

from pyro_vae.config import config_from_dict
from pyro_vae.errors import ConfigError
from pyro_vae.experiment import Experiment
from pyro_vae.schedules import kl_annealing
from pyro_vae.traces import draw_particles


def test_annealing_schedules_follow_their_formulas():
    T = 400
    assert [kl_annealing("none", t, T) for t in (0, 100, 500)] == [1.0, 1.0, 1.0]
    assert [kl_annealing("linear", t, T) for t in (0, 100, 200, 400, 900)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert kl_annealing("sigmoid", 0, T) == pytest.approx(1 / (1 + math.exp(5)))
    assert kl_annealing("sigmoid", 200, T) == pytest.approx(0.5)
    assert kl_annealing("sigmoid", 300, T) == pytest.approx(1 / (1 + math.exp(-2.5)))
    assert kl_annealing("sigmoid", 400, T) == 1.0
    # Fu et al.: 4 cycles of 100 steps, rising over the first half of each
    cyclical = [kl_annealing("cyclical", t, T, cycles=4, cycle_ratio=0.5) for t in (0, 25, 50, 99, 100, 125, 375, 400)]
    assert cyclical == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0])
    assert kl_annealing("cyclical", 30, 300, cycles=3, cycle_ratio=1.0) == pytest.approx(0.3)


def experiment(tiny_raw, **objective):
    tiny_raw["objective"] = {"name": "meanfield_elbo", **objective}
    return Experiment.build(config_from_dict(tiny_raw))


@pytest.mark.parametrize("per", ["dimension", "total"])
def test_free_bits_and_kl_weight_against_a_direct_computation(tiny_raw, per):
    """loss = -sum_b log p(x_b|z_b) + w B F(KL), F = sum_d max(lambda, mean_b KL_bd)
    (per dimension) or max(lambda, mean_b KL_b) (total), from the same draws;
    the reported ELBO stays log p(x|z) - KL."""
    exp = experiment(tiny_raw, free_bits=0.3, free_bits_per=per, kl_weight=0.7)
    objective = exp.objective
    x = exp.data["train"].batch(slice(0, 50))
    objective.nesting(x)  # found once, drawing random numbers: before the seeded draws
    pyro.set_rng_seed(3)
    with torch.no_grad():
        particles = draw_particles(exp.model, exp.guide, x, 1, objective.nesting(x))
        kl = particles.kl_per_dimension()[0]  # [B, D]
        log_likelihood = particles.log_likelihood()[0]
    assert kl.shape == (50, 8)
    # lambda amid the KLs, so the clamp acts on some dimensions (or datapoints) and not on others
    free_bits = float(kl.mean(0).median()) if per == "dimension" else float(kl.sum(-1).median())
    objective.free_bits = free_bits
    pyro.set_rng_seed(3)
    loss = objective(x)
    clamped = kl.mean(0).clamp_min(free_bits).sum() if per == "dimension" else kl.sum(-1).mean().clamp_min(free_bits)
    expected = -log_likelihood.sum() + 0.7 * 50 * clamped
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert float(objective.metrics["elbo"]) == pytest.approx(float((log_likelihood - kl.sum(-1)).mean()), rel=1e-5)


def test_free_bits_above_every_kl_leave_only_the_reconstruction_gradient(tiny_raw):
    """With lambda above every dimension's KL the KL term is a constant: the
    guide's gradient is that of -sum_b log p(x_b | z_b) alone."""
    exp = experiment(tiny_raw, free_bits=1e6)
    x = exp.data["train"].batch(slice(0, 20))
    exp.objective.nesting(x)
    pyro.set_rng_seed(5)
    exp.objective(x).backward()
    with_free_bits = [p.grad.clone() for p in exp.guide.parameters()]
    exp.objective.zero_grad()
    pyro.set_rng_seed(5)
    particles = draw_particles(exp.model, exp.guide, x, 1, exp.objective.nesting(x))
    (-particles.log_likelihood().sum()).backward()
    for got, expected in zip(with_free_bits, (p.grad for p in exp.guide.parameters())):
        assert torch.allclose(got, expected, atol=1e-5)


def test_annealing_reads_the_training_step(tiny_raw):
    exp = experiment(tiny_raw, kl_annealing="linear", anneal_steps=100)
    x = exp.data["train"].batch(slice(0, 20))
    exp.objective.context.step = 0
    exp.objective.nesting(x)
    pyro.set_rng_seed(1)
    at_zero = exp.objective(x)
    assert float(exp.objective.metrics["kl_weight"]) == 0.0
    pyro.set_rng_seed(1)
    particles = draw_particles(exp.model, exp.guide, x, 1, exp.objective.nesting(x))
    assert torch.allclose(at_zero, -particles.log_likelihood().sum(), rtol=1e-5)  # w = 0: reconstruction alone
    exp.objective.context.step = 50
    exp.objective(x)
    assert float(exp.objective.metrics["kl_weight"]) == 0.5


def counting_draws(train):
    """A ``draw_batch`` of 50 random training datapoints, and the list that grows by one each call."""
    draws = []

    def draw():
        draws.append(1)
        return train.batch(torch.randint(len(train), (50,)))
    return draws, draw


def test_aggressive_updates_train_the_guide_alone_then_the_model_then_end_when_mi_stops_rising(tiny_raw, tmp_path):
    """During the phase a step leaves the model's parameters as they were
    through the guide's inner steps (Adam untouched for them) and then moves
    only the model; the phase ends at the first epoch whose valid I(x; z)
    does not exceed the best so far, and is checkpointed."""
    from pyro_vae.objectives import TrainingContext

    exp = experiment(tiny_raw, aggressive=True, inner_steps=20, mi_datapoints=100)
    objective = exp.objective
    train = exp.data["train"]
    draws, draw = counting_draws(train)

    objective.context = TrainingContext(draw_batch=draw)
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-2)
    model_before = [p.detach().clone() for p in exp.model.parameters()]
    guide_before = [p.detach().clone() for p in exp.guide.parameters()]
    seen = {}

    def spy(step):
        def wrapped(*args, **kwargs):
            seen.setdefault("model_moved", []).append(
                any(not torch.equal(p, q) for p, q in zip(exp.model.parameters(), model_before)))
            return step(*args, **kwargs)
        return wrapped

    optimizer.step = spy(optimizer.step)
    objective.step(train.batch(slice(0, 50)), optimizer)
    assert len(draws) == 20 and len(seen["model_moved"]) == 21  # the first window of 10 cannot stop the loop
    assert not any(seen["model_moved"][:-1])  # the inner steps never touch the model
    guide_after = [p.detach().clone() for p in exp.guide.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(guide_after, guide_before))
    assert any(not torch.equal(p, q) for p, q in zip(exp.model.parameters(), model_before))  # the model's own step
    # ... which leaves the guide where its inner steps put it
    assert all(torch.equal(p, q) for p, q in zip(exp.guide.parameters(), guide_after))

    first = objective.end_epoch(exp.data["valid"])
    assert first["aggressive"] == 1.0 and math.isfinite(first["phase_mutual_information"])
    objective.best_mutual_information.fill_(1e9)  # no epoch can beat it: the phase ends
    assert objective.end_epoch(exp.data["valid"])["aggressive"] == 0.0
    assert objective.end_epoch(exp.data["valid"]) == {}
    assert not bool(objective.own_state_dict()["aggressive_phase"])


def test_aggressive_phase_checked_every_mi_every_steps_ends_within_the_epoch(tiny_raw):
    """With ``mi_every = 2`` the phase's I(x; z) is measured after the 2nd,
    4th, ... step of training (not at the epoch's end), the phase ends at the
    first check that does not beat the best, and the following steps are
    joint ones (no inner draws)."""
    from pyro_vae.objectives import TrainingContext

    exp = experiment(tiny_raw, aggressive=True, inner_steps=20, mi_datapoints=100, mi_every=2)
    objective, train = exp.objective, exp.data["train"]
    draws, draw = counting_draws(train)

    objective.context = TrainingContext(draw_batch=draw, valid=exp.data["valid"])
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-2)
    batch = train.batch(slice(0, 50))

    def step():
        objective.step(batch, optimizer)
        objective.context.step += 1

    step()
    assert objective.end_epoch(exp.data["valid"]) == {}  # no check after the first step
    step()
    saved = {k: v.clone() for k, v in objective.own_state_dict().items()}  # a checkpoint after the check
    first = objective.end_epoch(exp.data["valid"])
    assert first["aggressive"] == 1.0 and first["phase_mutual_information"] == pytest.approx(
        float(objective.best_mutual_information))
    assert objective.end_epoch(exp.data["valid"]) == {}  # an epoch without a check reports none
    objective.load_own_state_dict(saved)  # resumed from that checkpoint, the check is still to be reported
    assert objective.end_epoch(exp.data["valid"]) == first
    del saved["unreported_mutual_information"]  # a checkpoint from before mi_every loads, with nothing to report
    objective.load_own_state_dict(saved)
    assert objective.end_epoch(exp.data["valid"]) == {}
    objective.best_mutual_information.fill_(1e9)
    step()
    assert bool(objective.aggressive_phase)  # the 3rd step checks nothing
    step()
    assert not bool(objective.aggressive_phase) and objective.end_epoch(exp.data["valid"])["aggressive"] == 0.0
    before = len(draws)
    step()
    assert len(draws) == before  # a joint step
    objective.context.valid = None
    objective.aggressive_phase.fill_(True)
    with pytest.raises(ConfigError, match="mi_every"):
        step()
    with pytest.raises(ConfigError, match="aggressive = true"):
        experiment(tiny_raw, mi_every=5)


def test_aggressive_training_runs_through_the_trainer(tiny_raw, tmp_path):
    import csv

    from pyro_vae.train import train_and_evaluate

    tiny_raw["objective"] = {"name": "meanfield_elbo", "aggressive": True, "inner_steps": 10, "mi_datapoints": 100}
    tiny_raw["train"]["limit"] = 300
    train_and_evaluate(config_from_dict(tiny_raw), tmp_path / "run", progress=False, evaluate_after=False)
    row = next(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert math.isfinite(float(row["phase_mutual_information"])) and row["aggressive"] == "1.0"


def test_a_collapsed_run_is_warned_once_and_a_healthy_one_not(tiny_raw, tmp_path, caplog, monkeypatch):
    """An epoch whose training KL(q || p) is below ``COLLAPSED_KL`` nats per
    datapoint logs the posterior-collapse warning with its remedies, once a
    call (here every epoch is "collapsed" under a raised threshold); a run
    whose z carries information logs none under the real one."""
    import logging

    import pyro_vae.train
    from pyro_vae.train import collapse_warning, train_and_evaluate

    tiny_raw["train"]["epochs"] = 3
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        train_and_evaluate(config_from_dict(tiny_raw), tmp_path / "healthy", progress=False, evaluate_after=False)
    assert "posterior collapse" not in caplog.text
    monkeypatch.setattr(pyro_vae.train, "COLLAPSED_KL", 1e9)
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        train_and_evaluate(config_from_dict(tiny_raw), tmp_path / "collapsed", progress=False, evaluate_after=False)
    assert caplog.text.count("posterior collapse at epoch") == 1  # epochs 2 and 3 say nothing more
    assert "posterior collapse at epoch 1:" in caplog.text and "objective.free_bits" in caplog.text
    monkeypatch.undo()
    model = torch.nn.Linear(1, 1)
    assert collapse_warning({"epoch": 2, "train_kl": 0.0099}, model).startswith("posterior collapse at epoch 2: ")
    assert collapse_warning({"epoch": 2, "train_kl": 0.01}, model) is None
    assert collapse_warning({"epoch": 2, "train_loss": 1.0}, model) is None  # an objective without a KL
    model.ignores_latent = True  # the language model: no z by design
    assert collapse_warning({"epoch": 2, "train_kl": 0.0}, model) is None
