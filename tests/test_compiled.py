"""train.compile and eval.compile: the objective compiled whole gives the
eager loss and gradients, the evaluator's chunks the eager log weights; what
cannot be compiled, and calls that must not be, run eagerly."""
import copy
import logging

import pyro
import pytest
import torch

from conftest import requires_cuda
from linear_gaussian import LinearGaussianModel, PosteriorGuide
from pyro_vae import compiled, registry
from pyro_vae.compiled import CompiledCall, CompiledObjective, compile_objective
from pyro_vae.evaluate import chunked_log_weights, evaluate
from pyro_vae.traces import log_importance_weights, max_plate_nesting


def _parts(device="cpu"):
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=4)
    model = registry.MODELS.build("mlp", {"latent_dim": 4, "hidden": [16, 16]}, prior=prior, event_shape=(1, 6, 6))
    guide = registry.GUIDES.build("normal", {"hidden": [16]}, event_shape=(1, 6, 6), latent_dim=4)
    return model.to(device), guide.to(device)


def _objective(name, options, model, guide, device="cpu"):
    objective = registry.OBJECTIVES.build(name, options)(model, guide)
    objective.prepare(torch.zeros(2, 1, 6, 6, device=device))  # the trainer's first-use work, eager and without gradients
    return objective


def _loss_and_grads(objective, x, seed=3):
    torch.manual_seed(seed)
    with pyro.validation_enabled(False):  # the trainer's steps after an epoch's first
        loss = objective(x)
    objective.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in objective.parameters()]


@pytest.mark.parametrize("name, options", [("meanfield_elbo", {"num_particles": 2}), ("iwae", {"num_particles": 3}),
                                           ("meanfield_elbo", {"free_bits": 0.5}), ("trace_elbo", {})])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_the_compiled_objective_gives_the_eager_loss_and_gradients(device, name, options):
    """From the same generator state the compiled forward draws the eager
    draws (torch's generator, not Inductor's), so loss and gradients agree,
    on the CPU (C++ kernels) and on CUDA (Triton kernels)."""
    model, guide = _parts(device)
    objective = _objective(name, options, model, guide, device)
    eager = _objective(name, options, copy.deepcopy(model), copy.deepcopy(guide), device)
    wrapper = compile_objective(objective)
    assert objective.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3, device=device))
    for batch in (x, x[:5]):  # a second shape recompiles
        loss, grads = _loss_and_grads(objective, batch)
        eager_loss, eager_grads = _loss_and_grads(eager, batch)
        assert wrapper.compiled is not None  # captured whole: it did not fall back
        assert torch.allclose(loss, eager_loss, rtol=1e-5)
        for g, e in zip(grads, eager_grads):  # to float32 rounding of the tensor's largest entry (IWAE's
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-5 * e.abs().max())  # weights amplify it in small ones)
        assert objective.metrics.keys() == eager.metrics.keys()
        for key in eager.metrics:
            assert torch.allclose(objective.metrics[key], eager.metrics[key], rtol=1e-5), key


def test_calls_without_gradients_or_under_validation_run_eagerly(monkeypatch):
    calls = []

    def counting_compiler(fn, **kwargs):
        def counted(*args, **kw):
            calls.append(1)
            return fn(*args, **kw)
        return counted

    monkeypatch.setattr(compiled.torch, "compile", counting_compiler)
    model, guide = _parts()
    objective = _objective("meanfield_elbo", {}, model, guide)
    compile_objective(objective)
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    with torch.no_grad(), pyro.validation_enabled(False):
        objective(x)
    with pyro.validation_enabled(True):
        objective(x)
    assert calls == []
    with pyro.validation_enabled(False):
        objective(x)
    assert calls == [1]


def test_an_objective_that_cannot_be_captured_whole_runs_eagerly(caplog):
    """tracegraph_elbo runs Pyro's TraceGraph_ELBO, whose handlers TorchDynamo
    cannot capture in one graph: one warning, then the eager loss."""
    model, guide = _parts()
    objective = _objective("tracegraph_elbo", {}, model, guide)
    eager = _objective("tracegraph_elbo", {}, copy.deepcopy(model), copy.deepcopy(guide))
    wrapper = compile_objective(objective)
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        loss, grads = _loss_and_grads(objective, x)
    assert "torch.compile cannot compile objective TraceGraphELBO whole" in caplog.text
    assert wrapper.compiled is None
    eager_loss, eager_grads = _loss_and_grads(eager, x)
    assert torch.equal(loss, eager_loss)
    assert all(torch.equal(g, e) for g, e in zip(grads, eager_grads))


def test_a_compiler_failure_runs_eagerly(monkeypatch, caplog):
    def broken_compiler(fn, **kwargs):
        def fails(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException("InductorError: no C++ compiler\nmore detail")
        return fails

    monkeypatch.setattr(compiled.torch, "compile", broken_compiler)
    model, guide = _parts()
    objective = _objective("meanfield_elbo", {}, model, guide)
    eager = _objective("meanfield_elbo", {}, copy.deepcopy(model), copy.deepcopy(guide))
    compile_objective(objective)
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        loss, _ = _loss_and_grads(objective, x)
    assert ("torch.compile cannot compile objective MeanFieldELBO whole (TorchDynamoException: InductorError: no "
            "C++ compiler); it runs uncompiled") in caplog.text
    assert torch.equal(loss, _loss_and_grads(eager, x)[0])


def test_an_error_of_the_objective_itself_is_raised_not_taken_for_a_compiler_failure(monkeypatch):
    def raising_compiler(fn, **kwargs):
        def fails(*args, **kw):
            raise ValueError("a bad batch")
        return fails

    monkeypatch.setattr(compiled.torch, "compile", raising_compiler)
    model, guide = _parts()
    wrapper = compile_objective(_objective("meanfield_elbo", {}, model, guide))
    with pyro.validation_enabled(False), pytest.raises(ValueError, match="a bad batch"):
        wrapper.objective(torch.zeros(8, 1, 6, 6))
    assert wrapper.compiled is not None


def test_an_annealed_objective_stays_compiled_as_its_step_advances():
    """The KL weight w(t) reads the training context's step: a graph input,
    not a constant that recompiles each step (and after eight, falls back to eager)."""
    model, guide = _parts()
    options = {"kl_annealing": "linear", "anneal_steps": 20}
    objective = _objective("meanfield_elbo", options, model, guide)
    eager = _objective("meanfield_elbo", options, copy.deepcopy(model), copy.deepcopy(guide))
    wrapper = compile_objective(objective)
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    for step in range(12):
        objective.context.step = eager.context.step = step
        loss, _ = _loss_and_grads(objective, x, seed=step)
        assert torch.allclose(loss, _loss_and_grads(eager, x, seed=step)[0], rtol=1e-5), step
        assert torch.allclose(objective.metrics["kl_weight"], eager.metrics["kl_weight"]), step
    assert wrapper.compiled is not None


def test_the_train_compile_switch_compiles_the_whole_step(tiny_raw, tmp_path):
    from pyro_vae.config import config_from_dict
    from pyro_vae.experiment import Experiment
    from pyro_vae.rundir import RunDir
    from pyro_vae.train import Trainer

    tiny_raw["train"].update(compile=True, limit=200)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    trainer = Trainer(experiment, RunDir(tmp_path), progress=False, verbose=False)
    wrapper = experiment.objective.__dict__["forward"]
    assert isinstance(wrapper, CompiledObjective)
    before = [p.clone() for p in experiment.model.parameters()]
    batches = [experiment.data["train"].batch(slice(i, i + 50)) for i in (0, 50)]
    whole = trainer.compiled_step.call
    graph, calls = whole.compiled, []
    whole.compiled = lambda *args: calls.append(1) or graph(*args)
    for batch in batches:  # the epoch's first step is validated (eager), the second compiled whole
        trainer.step(batch)
    assert wrapper.compiled is not None and whole.compiled is not None and calls == [1]
    assert trainer.state.datapoints == 100 and torch.isfinite(trainer.state.sums["loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, experiment.model.parameters()))


def test_a_resumed_checkpoint_of_unfused_adam_keeps_the_eager_update(tiny_raw, tmp_path):
    """The whole step is built after the resume: the checkpoint's optimizer
    groups (here: Adam without the fused kernel) decide, not the new ones."""
    from pyro_vae.checkpoint import load_checkpoint
    from pyro_vae.config import config_from_dict
    from pyro_vae.experiment import Experiment
    from pyro_vae.rundir import RunDir
    from pyro_vae.train import Trainer

    tiny_raw["train"].update(compile=True, limit=200)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    trainer = Trainer(experiment, RunDir(tmp_path), progress=False, verbose=False)
    assert trainer.compiled_step is not None
    trainer.step(experiment.data["train"].batch(slice(0, 50)))
    trainer.checkpoint()
    state = load_checkpoint(RunDir(tmp_path).checkpoint)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = False
    resumed = Trainer(Experiment.build(config_from_dict(tiny_raw)), RunDir(tmp_path), state=state,
                      progress=False, verbose=False)
    assert resumed.compiled_step is None


# ------------------------------------------------------------------ the evaluator (eval.compile)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_the_compiled_evaluator_gives_the_eager_log_weights(device):
    """Each chunk's log weights compiled whole: from the same generator state,
    the eager draws and weights, for two chunk shapes (the second recompiles)."""
    model, guide = _parts(device)
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3, device=device))
    call = CompiledCall(log_importance_weights, "log weights")
    nesting = max_plate_nesting(model, guide, x)  # the evaluator's first-use work, eager (the one-latent-site check)
    with torch.no_grad(), pyro.validation_enabled(False):
        for num_samples, chunk in ((12, 4), (10, 5)):
            torch.manual_seed(0)
            compiled_log_w = chunked_log_weights(model, guide, x, num_samples, chunk, nesting, log_weights=call)
            torch.manual_seed(0)
            eager_log_w = chunked_log_weights(model, guide, x, num_samples, chunk, nesting)
            assert call.compiled is not None  # captured whole: it did not fall back
            assert compiled_log_w.shape == (num_samples, 8)
            assert torch.allclose(compiled_log_w, eager_log_w, rtol=1e-5, atol=1e-4)


def test_the_eval_compile_switch_routes_every_chunk_through_the_compiler(monkeypatch):
    calls = []

    def counting_compiler(fn, **kwargs):
        def counted(*args, **kw):
            calls.append(args[3])  # the chunk's number of samples
            return fn(*args, **kw)
        return counted

    monkeypatch.setattr(compiled.torch, "compile", counting_compiler)
    model, guide = _parts()
    batches = torch.bernoulli(torch.full((12, 1, 6, 6), 0.3)).split(6)
    evaluate(model, guide, batches, num_samples=30, chunk_size=10, progress=False)
    assert calls == []
    result = evaluate(model, guide, batches, num_samples=30, chunk_size=10, progress=False, compile=True)
    assert calls == [10] * 6 and result.log_likelihood.shape == (12,)


def test_an_evaluator_that_cannot_be_captured_whole_runs_eagerly(caplog):
    """A model with its own ``forward`` runs Pyro's handlers, which TorchDynamo
    cannot capture in one graph: one warning, then the eager evaluator, exact
    here (the exact posterior as guide: every weight is p(x))."""
    model = LinearGaussianModel(latent_dim=3, data_dim=5, noise=0.7)
    x = model.sample_data(20)
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        result = evaluate(model, PosteriorGuide(model), x.split(10), num_samples=6, chunk_size=3, progress=False,
                          compile=True)
    assert caplog.text.count("torch.compile cannot compile the IS evaluator's log weights whole") == 1
    assert result.log_likelihood == pytest.approx(model.marginal().log_prob(x).numpy(), abs=1e-8)


def test_the_recompile_limit_falls_back_to_eager(caplog):
    """Past torch's recompile limit (8 graphs per function, shared by every
    evaluator in the process; 1 here) fullgraph raises FailOnRecompileLimitHit,
    not a TorchDynamoException: one warning, then the eager log weights."""
    model, guide = _parts()
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    call = CompiledCall(log_importance_weights, "log weights")
    nesting = max_plate_nesting(model, guide, x)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad(), pyro.validation_enabled(False), \
            caplog.at_level(logging.WARNING, logger="pyro_vae"):
        call(model, guide, x, 4, nesting)
        torch.manual_seed(0)
        log_w = call(model, guide, x[:5], 3, nesting)  # another shape: a recompile, past the limit
        torch.manual_seed(0)
        assert torch.equal(log_w, log_importance_weights(model, guide, x[:5], 3, nesting))
    assert call.compiled is None
    assert "torch.compile cannot compile log weights whole (FailOnRecompileLimitHit" in caplog.text
