"""train.compile: the compiled networks give the eager path's loss and
gradients, and a network whose compilation fails runs eagerly."""
import copy
import logging

import torch

from pyro_vae import compiled, registry
from pyro_vae.compiled import compile_networks


def _parts():
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=4)
    model = registry.MODELS.build("mlp", {"latent_dim": 4, "hidden": [16, 16]}, prior=prior, event_shape=(1, 6, 6))
    guide = registry.GUIDES.build("normal", {"hidden": [16]}, event_shape=(1, 6, 6), latent_dim=4)
    return model, guide


def _loss_and_grads(model, guide, x, seed=3):
    objective = registry.OBJECTIVES.build("meanfield_elbo", {"num_particles": 2})(model, guide)
    torch.manual_seed(seed)
    loss = objective(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in objective.parameters()]


def test_compiled_networks_give_the_eager_loss_and_gradients():
    model, guide = _parts()
    eager_model, eager_guide = copy.deepcopy(model), copy.deepcopy(guide)
    assert compile_networks(model, guide) == ["model.decoder", "guide.encoder"]
    assert model.state_dict().keys() == eager_model.state_dict().keys()  # checkpoints unchanged
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    for batch in (x, x[:5]):  # a second shape recompiles
        loss, grads = _loss_and_grads(model, guide, batch)
        eager_loss, eager_grads = _loss_and_grads(eager_model, eager_guide, batch)
        assert torch.allclose(loss, eager_loss, rtol=1e-5)
        for g, e in zip(grads, eager_grads):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)
        model.zero_grad(), guide.zero_grad(), eager_model.zero_grad(), eager_guide.zero_grad()
    assert model.decoder.forward.compiled is not None  # it did not fall back


def test_a_network_that_fails_to_compile_runs_eagerly(monkeypatch, caplog):
    def broken_compiler(fn):
        def fails(*args, **kwargs):
            raise RuntimeError("InductorError: no C++ compiler\nmore detail")
        return fails

    monkeypatch.setattr(compiled.torch, "compile", broken_compiler)
    model, guide = _parts()
    eager_model, eager_guide = copy.deepcopy(model), copy.deepcopy(guide)
    compile_networks(model, guide)
    x = torch.bernoulli(torch.full((8, 1, 6, 6), 0.3))
    with caplog.at_level(logging.WARNING, logger="pyro_vae"):
        loss, grads = _loss_and_grads(model, guide, x)
    assert "torch.compile failed for model.decoder (RuntimeError: InductorError: no C++ compiler); it runs uncompiled" \
        in caplog.text
    eager_loss, _ = _loss_and_grads(eager_model, eager_guide, x)
    assert torch.equal(loss, eager_loss)
    assert model.decoder.forward.compiled is None and guide.encoder.forward.compiled is None


def test_the_train_compile_switch_compiles_the_parts_networks(tiny_raw, tmp_path):
    from pyro_vae.compiled import CompiledForward
    from pyro_vae.config import config_from_dict
    from pyro_vae.experiment import Experiment
    from pyro_vae.rundir import RunDir
    from pyro_vae.train import Trainer

    tiny_raw["train"].update(compile=True, limit=200)
    experiment = Experiment.build(config_from_dict(tiny_raw))
    trainer = Trainer(experiment, RunDir(tmp_path), progress=False, verbose=False)
    assert isinstance(experiment.model.decoder.__dict__["forward"], CompiledForward)
    assert isinstance(experiment.guide.encoder.__dict__["forward"], CompiledForward)
    before = [p.clone() for p in experiment.model.parameters()]
    trainer.step(experiment.data["train"].batch(slice(0, 50)))
    assert trainer.state.datapoints == 50 and torch.isfinite(trainer.state.sums["loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, experiment.model.parameters()))
