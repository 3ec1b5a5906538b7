"""Speed and memory of pyro-vae against hand-written PyTorch, as ratios.

Each case times pyro-vae and a reference implementation on the same machine,
in the same process, interleaved, and reports the median of the repeats and
their ratio (reference time / pyro-vae time: above 1 means pyro-vae is
faster).  Peak memory is measured in fresh child processes that build only the model
and guide: the growth of the peak resident set size during the evaluation on
CPU (Linux ``/proc``), ``torch.cuda.max_memory_allocated`` on CUDA.

The references run copies of the same networks with torch's ``nn.Tanh``
(pyro-vae's :class:`~pyro_vae.nn.Tanh` takes a faster form on the CPU).
Cases, on Burda et al.'s MNIST architecture (784-200-200-50, tanh):

- ``train_step``: one Adam step on a batch of 100 with the mean-field ELBO,
  pyro-vae's trainer step (the ``meanfield_elbo`` objective module, fused
  Adam, the gradients checked for NaN before the update, the loss for
  divergence after; eager with the traces built directly, the same with
  ``train.direct_traces = false``, and with ``train.compile = true``) vs the same
  math written by hand, with PyTorch's default Adam and with fused Adam; and
  the ``trace_elbo`` step, eager and compiled, vs its estimator (the KL by
  one sample) written by hand with PyTorch's default Adam.
- ``pipeline``: training examples/s of whole pipelines (batches + steps):
  pyro-vae's trainer, a hand-written step on the same (dynamically binarized)
  batches, pyro-vae's compiled trainer on images binarized once (as the next
  two take them), the style of Pyro's VAE example (``DataLoader`` + ``SVI``), and pythae's ``BaseTrainer``
  on images binarized once and on images its dataset binarizes when loaded
  (the optional ``benchmark`` extra; skipped with a message without it).
- ``iw_throughput``: datapoints x samples / s of the IS log-likelihood at
  K = 5000, pyro-vae's evaluator (eager, with ``eval.compile``, and compiled
  with ``eval.matmul_precision`` bf16 on the CPU, tf32 on a GPU) against
  pythae's ``get_nll``.
- ``iw_chunks``: the evaluator's throughput (datapoints x samples / s) by
  samples per chunk, ``auto`` included, on 100 test images;
- ``flop_limit``: the measured sgemm rate (a 2048 x 2048 product) and the
  training step's matrix-product FLOPs, hence the fastest a step could be;
- ``iw_eval``: the importance-sampled log-likelihood of 100 test images with K
  samples; pyro-vae's chunked, particle-plate-vectorized evaluator vs (a) a
  hand-written loop over the K samples with ``torch.distributions``, and
  (b) a hand-written evaluation of all K samples at once;
- ``allocator``: the evaluator's throughput and page faults in fresh
  processes with :func:`pyro_vae.allocator.keep_freed_memory` (which the
  ``pyro-vae`` command and this script call at start) and without it.

Usage: ``python scripts/benchmark.py [--device cpu|cuda] [--iw-samples 1000] [--cases train_step ...]
[--json PATH]``: a table on standard output, and the same results as JSON in ``PATH``.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyro
import torch
import torch.nn.functional as F

from pyro_vae.allocator import keep_freed_memory
from pyro_vae.compiled import CompiledCall
from pyro_vae.config import load_config
from pyro_vae.evaluate import (chunked_log_weights, cpu_chunk_size, float32_matmul_precision,
                               importance_log_likelihood, matmul_precision_problem)
from pyro_vae.experiment import Experiment, build_model_and_guide
from pyro_vae.nn import Tanh
from pyro_vae.rundir import RunDir
from pyro_vae.traces import log_importance_weights
from pyro_vae.train import Trainer

CONFIG = "configs/mnist_burda.toml"
CHUNK = "auto"  # samples drawn at once by pyro-vae's evaluator: sized for the device
PYTHAE_SAMPLE_BATCH = 500  # samples per batch in pythae's get_nll
NESTING = 1  # plates of the Gaussian VAE: the data plate only
CASES = ["train_step", "pipeline", "flop_limit", "iw_chunks", "iw_eval", "iw_throughput", "memory", "allocator"]


def build(device: str, compile: bool = False, direct_traces: bool = True, objective: str = "meanfield_elbo",
          binarization: str = "dynamic") -> Experiment:
    config = load_config(CONFIG, [f"objective.name={objective}", f"train.compile={str(compile).lower()}",
                                  f"train.direct_traces={str(direct_traces).lower()}",
                                  f"data.binarization={binarization}"])
    return Experiment.build(config, torch.device(device))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / inner * 1000)
    return statistics.median(times)


# ---------------------------------------------------------------- references
def plain_torch_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``net`` with torch's ``nn.Tanh`` for pyro-vae's
    :class:`~pyro_vae.nn.Tanh` (its faster CPU form): the networks a VAE
    written by hand, Pyro's example and pythae run."""
    net = copy.deepcopy(net)
    for module in net.modules():
        for name, child in module.named_children():
            if isinstance(child, Tanh):
                setattr(module, name, torch.nn.Tanh())
    return net


def handwritten_networks(experiment: Experiment) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The experiment's encoder and decoder as plain torch copies (:func:`plain_torch_copy`)."""
    return plain_torch_copy(experiment.guide.encoder), plain_torch_copy(experiment.model.decoder)


def handwritten_sample(encoder, decoder, x):
    """One reparameterized draw z = loc + scale * eps, eps ~ N(0, I), and
    log p(x | z), written directly in PyTorch: (loc, scale, eps, z, log_lik)."""
    x = x.reshape(x.shape[0], -1)
    loc, raw = encoder(x).chunk(2, -1)
    scale = F.softplus(raw) + 1e-4
    eps = torch.randn_like(loc)
    z = loc + scale * eps
    log_lik = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
    return loc, scale, eps, z, log_lik


def handwritten_loss(encoder, decoder, x):
    """-ELBO with analytic KL, written directly in PyTorch."""
    loc, scale, _, _, log_lik = handwritten_sample(encoder, decoder, x)
    kl = (-torch.log(scale) + (scale**2 + loc**2 - 1) / 2).sum(-1)
    return (kl - log_lik).sum()


def handwritten_monte_carlo_kl_loss(encoder, decoder, x):
    """-ELBO with the KL by one sample, log q(z|x) - log p(z) at the drawn z
    (the estimator of ``trace_elbo``); the normal densities' constants cancel."""
    _, scale, eps, z, log_lik = handwritten_sample(encoder, decoder, x)
    log_q_over_p = (0.5 * (z**2 - eps**2) - torch.log(scale)).sum(-1)
    return (log_q_over_p - log_lik).sum()


def handwritten_log_weights(encoder, decoder, x, num_samples):
    """log w [K, B] over all K samples at once: q(z|x) and p(x, z) by hand."""
    x = x.reshape(x.shape[0], -1)
    loc, raw = encoder(x).chunk(2, -1)
    q = torch.distributions.Normal(loc, F.softplus(raw) + 1e-4)
    z = q.sample((num_samples,))
    prior = torch.distributions.Normal(0.0, 1.0)
    log_lik = torch.distributions.Bernoulli(logits=decoder(z)).log_prob(x).sum(-1)
    return log_lik + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)


def pyro_example_model_and_guide(encoder, decoder):
    """The model and guide as Pyro's VAE example writes them (``pyro.module``,
    a data plate, ``Normal(...).to_event(1)`` latents, Bernoulli pixels),
    around the same networks."""
    import pyro.distributions as dist

    latent_dim = decoder[0].in_features

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], latent_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = encoder(x).chunk(2, -1)
            pyro.sample("latent", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))

    return model, guide


def handwritten_loop(encoder, decoder, x, num_samples):
    """The same, one sample at a time (the common hand-written form)."""
    return torch.stack([handwritten_log_weights(encoder, decoder, x, 1)[0] for _ in range(num_samples)])


# ---------------------------------------------------------------- cases
def train_step_case(device: str, repeats: int) -> dict:
    experiment = build(device)
    x = experiment.data["train"].batch(slice(0, 100))
    with tempfile.TemporaryDirectory() as scratch:  # the trainer's step writes nothing there
        trainers = {  # the trainer's own step: guarded, checked, summed
            "pyro_vae_ms": Trainer(experiment, RunDir(scratch)),
            "pyro_vae_pyro_traces_ms": Trainer(build(device, direct_traces=False), RunDir(scratch)),
            "pyro_vae_compiled_ms": Trainer(build(device, compile=True), RunDir(scratch)),
            "pyro_vae_trace_elbo_ms": Trainer(build(device, objective="trace_elbo"), RunDir(scratch)),
            "pyro_vae_trace_elbo_compiled_ms": Trainer(build(device, compile=True, objective="trace_elbo"),
                                                       RunDir(scratch)),
        }
        for key in ("pyro_vae_compiled_ms", "pyro_vae_trace_elbo_compiled_ms"):
            for _ in range(3):
                trainers[key].step(x)  # compiles (forward and backward) before the clock starts
        encoder, decoder = handwritten_networks(experiment)
        reference_params = [*encoder.parameters(), *decoder.parameters()]
        references = {  # (loss, optimizer)
            "handwritten_torch_ms": (handwritten_loss, torch.optim.Adam(reference_params, lr=1e-3)),
            "handwritten_torch_fused_adam_ms": (handwritten_loss,
                                                torch.optim.Adam(reference_params, lr=1e-3, fused=True)),
            "handwritten_monte_carlo_kl_ms": (handwritten_monte_carlo_kl_loss,
                                              torch.optim.Adam(reference_params, lr=1e-3)),
        }

        def reference_step(loss_fn, optimizer):
            loss = loss_fn(encoder, decoder, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        times = {k: [] for k in [*trainers, *references]}
        for _ in range(repeats):  # interleaved, so drifts in machine load hit every variant
            for key, trainer in trainers.items():
                times[key].append(median_ms(lambda: trainer.step(x), device, 1, 50))
            for key, reference in references.items():
                times[key].append(median_ms(lambda: reference_step(*reference), device, 1, 50))
        out = {"case": "train_step (batch 100)", **{k: round(statistics.median(v), 2) for k, v in times.items()}}
        out["speedup_vs_handwritten"] = round(out["handwritten_torch_ms"] / out["pyro_vae_ms"], 2)
        out["speedup_vs_handwritten_fused_adam"] = round(out["handwritten_torch_fused_adam_ms"] / out["pyro_vae_ms"], 2)
        out["compiled_speedup"] = round(out["pyro_vae_ms"] / out["pyro_vae_compiled_ms"], 2)
        out["direct_traces_speedup"] = round(out["pyro_vae_pyro_traces_ms"] / out["pyro_vae_ms"], 2)
        for key in ("pyro_vae_trace_elbo_ms", "pyro_vae_trace_elbo_compiled_ms"):  # against the same estimator
            out[f"speedup_{key[len('pyro_vae_'):-len('_ms')]}_vs_handwritten_monte_carlo_kl"] = round(
                out["handwritten_monte_carlo_kl_ms"] / out[key], 2)
        return out


def iw_case(device: str, repeats: int, num_samples: int) -> dict:
    experiment = build(device)
    x = experiment.data["test"].batch(slice(0, 100))
    model, guide = experiment.model, experiment.guide
    encoder, decoder = handwritten_networks(experiment)
    with torch.no_grad():
        ours = median_ms(lambda: chunked_log_weights(model, guide, x, num_samples, CHUNK, NESTING), device, repeats, 1)
        at_once = median_ms(lambda: handwritten_log_weights(encoder, decoder, x, num_samples), device, repeats, 1)
        loop = median_ms(lambda: handwritten_loop(encoder, decoder, x, num_samples), device, max(1, repeats // 2), 1)
        # both implementations estimate the same L_K (independent draws)
        a = importance_log_likelihood(chunked_log_weights(model, guide, x, num_samples, CHUNK, NESTING)).mean()
        b = importance_log_likelihood(handwritten_log_weights(encoder, decoder, x, num_samples)).mean()
    return {"case": f"iw_eval (100 images, K={num_samples})", "pyro_vae_ms": round(ours, 1),
            "handwritten_all_at_once_ms": round(at_once, 1), "handwritten_loop_ms": round(loop, 1),
            "speedup_vs_all_at_once": round(at_once / ours, 2), "speedup_vs_loop": round(loop / ours, 2),
            "mean_log_likelihood_pyro_vae": round(a.item(), 2), "mean_log_likelihood_handwritten": round(b.item(), 2)}


def pipeline_case(device: str, steps: int, repeats: int) -> dict:
    """Training throughput of whole pipelines (data batches + steps), in
    examples/s, on the same model: pyro-vae's trainer, eager and with
    ``train.compile = true`` (dynamic binarization, as configured), and
    compiled on images binarized once (``data.binarization = "static"``: the
    work of the Pyro example's and pythae's pipelines, which take
    pre-binarized images); the same data path with a hand-written step;
    the style of Pyro's VAE example (a ``DataLoader`` over a
    ``TensorDataset``, ``SVI`` with ``pyro.optim.Adam`` and ``Trace_ELBO``);
    and pythae's ``BaseTrainer`` (when installed) on images binarized once,
    and binarized by its dataset each time they are loaded (the dynamic
    binarization's work, as a pythae user writes it).  The pipelines take turns
    for ``repeats`` rounds (each round ``steps`` steps of each); the median
    round of each is reported."""
    from pyro.infer import SVI, Trace_ELBO
    from torch.utils.data import DataLoader, TensorDataset

    experiment = build(device)
    split = experiment.data["train"]
    batch = 100
    out = {"case": f"training pipeline, examples/s (batch {batch}, {steps} steps, median of {repeats} rounds)"}
    generator = torch.Generator(device=split.device).manual_seed(0)
    order = split.permutation(generator)
    batches = [order[i * batch:(i + 1) * batch] for i in range(steps)]

    def timed(loop) -> Callable[[], float]:
        def rate() -> float:
            sync(device)
            start = time.perf_counter()
            loop()
            sync(device)
            return steps * batch / (time.perf_counter() - start)
        return rate

    def trainer_loop(trainer: Trainer) -> Callable[[], None]:
        images = trainer.train_split  # (its binarization: the experiment's)
        for _ in range(3):
            trainer.step(images.batch(batches[0], generator))  # compiles before the clock starts

        def loop() -> None:
            for index in batches:
                trainer.step(images.batch(index, generator))
        return loop

    encoder, decoder = handwritten_networks(experiment)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)

    def handwritten():
        for index in batches:
            loss = handwritten_loss(encoder, decoder, split.batch(index, generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    pyro.clear_param_store()
    images = torch.bernoulli(split.pixels[: steps * batch].float() / 255).reshape(steps * batch, -1)
    loader = DataLoader(TensorDataset(images), batch_size=batch, shuffle=True)
    model, guide = pyro_example_model_and_guide(*handwritten_networks(experiment))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=Trace_ELBO())

    def pyro_example():
        for (x,) in loader:
            svi.step(x)

    with tempfile.TemporaryDirectory() as scratch:
        pipelines = {
            "pyro_vae": timed(trainer_loop(Trainer(build(device), RunDir(scratch)))),
            "pyro_vae_compiled": timed(trainer_loop(Trainer(build(device, compile=True), RunDir(scratch)))),
            "pyro_vae_compiled_static": timed(trainer_loop(
                Trainer(build(device, compile=True, binarization="static"), RunDir(scratch)))),
            "handwritten_torch": timed(handwritten),
            "pyro_example_svi": timed(pyro_example),
        }
        if pythae_installed():
            pipelines["pythae_trainer"] = timed(pythae_epoch(experiment, split, steps, batch, device, scratch))
            pipelines["pythae_trainer_dynamic"] = timed(
                pythae_epoch(experiment, split, steps, batch, device, scratch, dynamic=True))
        rates = {key: [] for key in pipelines}
        for _ in range(repeats):  # in turns, so drifts in machine load hit every pipeline
            for key, rate in pipelines.items():
                rates[key].append(rate())
    out.update({key: round(statistics.median(r), 1) for key, r in rates.items()})
    every = {key: key for key in ("handwritten_torch", "pyro_example_svi", "pythae_trainer", "pythae_trainer_dynamic")}
    prebinarized = {key: key for key in ("pyro_example_svi", "pythae_trainer")}  # (they take pre-binarized images)
    for ours, references in (("pyro_vae", every), ("pyro_vae_compiled", every), ("pyro_vae_compiled_static", prebinarized)):
        out.update(speedups(out, ours, references, 2))
    return out


def speedups(out: dict, ours: str, references: dict[str, str], digits: int) -> dict:
    """``speedup[_<variant>]_vs_<name>``: the row ``ours`` (``pyro_vae[_<variant>]``) over the row
    ``references[name]``, for each such row in ``out`` (throughputs: above 1, pyro-vae is faster)."""
    variant = ours.removeprefix("pyro_vae")
    return {f"speedup{variant}_vs_{name}": round(out[ours] / out[row], digits)
            for name, row in references.items() if row in out}


def _pythae_vae(experiment: Experiment):
    """pythae's ``VAE`` with the experiment's encoder and decoder networks
    (the same architecture: diagonal Normal guide, Bernoulli pixels)."""
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            loc, raw = self.net(x.reshape(x.shape[0], -1)).chunk(2, -1)
            return ModelOutput(embedding=loc, log_covariance=2 * torch.log(F.softplus(raw) + 1e-4))

    class Decoder(BaseDecoder):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)).reshape(-1, *experiment.data.event_shape))

    config = VAEConfig(input_dim=experiment.data.event_shape, latent_dim=experiment.config.model.options["latent_dim"],
                       reconstruction_loss="bce")
    encoder, decoder = handwritten_networks(experiment)
    return VAE(config, encoder=Encoder(encoder), decoder=Decoder(decoder))


def pythae_installed() -> bool:
    """Whether pythae (the ``benchmark`` extra) is installed; a message when not."""
    try:
        import pythae  # noqa: F401
    except ImportError:
        print("pythae is not installed (pip install 'pyro-vae[benchmark]'): its rows are skipped")
        return False
    return True


def pythae_epoch(experiment: Experiment, split, steps: int, batch: int, device: str, out_dir: str,
                 dynamic: bool = False) -> Callable[[], None]:
    """One epoch of pythae's ``BaseTrainer`` over ``steps * batch`` images, as
    a loop to time: the trainer is built and prepared once (optimizer, output
    folder, callbacks: what ``train()`` does first), and each call runs its
    epoch loop, ``train_step`` (its DataLoader's batches, forward, Adam step,
    the loss read and NaN check), not the set-up, logging and model saving
    around it in ``train()``.  The images are binarized once, as pythae's
    datasets take them, or with ``dynamic`` each time one is loaded: pythae
    has no dynamic binarization, so the dataset does it as a pythae user
    would write it, ``torch.bernoulli`` of the gray levels in
    ``__getitem__`` (the work of pyro-vae's ``data.binarization = "dynamic"``)."""
    from pythae.data.datasets import BaseDataset, DatasetOutput
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    class GrayLevels(BaseDataset):
        """Gray levels in [0, 1], each image drawn ``x ~ Bernoulli(gray)`` when loaded."""

        def __getitem__(self, index):
            item = super().__getitem__(index)
            return DatasetOutput(data=torch.bernoulli(item.data), labels=item.labels)

    gray, labels = split.pixels[: steps * batch].float().cpu() / 255, torch.zeros(steps * batch)
    images = GrayLevels(gray, labels) if dynamic else BaseDataset(torch.bernoulli(gray), labels)
    config = BaseTrainerConfig(output_dir=out_dir, per_device_train_batch_size=batch, num_epochs=1,
                               learning_rate=1e-3, no_cuda=device != "cuda")
    trainer = BaseTrainer(_pythae_vae(experiment), train_dataset=images, training_config=config)
    trainer.prepare_training()
    epochs = itertools.count(1)

    def epoch() -> None:
        trainer.train_step(next(epochs))
        trainer.callback_handler.on_epoch_end(training_config=config)  # closes the epoch's progress bar
    return epoch


def decoder_products_rate(decoder: torch.nn.Module, rows: int, device: str, repeats: int) -> int:
    """Samples / s of the decoder's matrix products alone, ``rows`` latent
    samples at a time (into buffers made once): the throughput no float32
    evaluator of this model can exceed on the device, were every other
    pass (activations, log-densities, draws, the encoder) free."""
    weights = [m.weight.detach() for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, w.shape[1], device=device) for w in weights]
    outputs = [torch.empty(rows, w.shape[0], device=device) for w in weights]

    def products() -> None:
        for a, w, out in zip(inputs, weights, outputs):
            torch.mm(a, w.t(), out=out)
    products()
    return round(rows / (median_ms(products, device, repeats, 20) / 1000))


def iw_throughput_case(device: str, num_samples: int, images: int, repeats: int) -> dict:
    """IS log-likelihood throughput, (datapoints x samples) / s, at equal K:
    pyro-vae's evaluator, eager and compiled (``eval.compile``), and compiled
    with the products' operands rounded (``eval.matmul_precision``: bf16 on
    the CPU, tf32 on a GPU; each estimate printed beside), against
    pythae's ``get_nll`` (one datapoint at a time, samples in batches of 500)
    on the same networks; and the ceiling of any float32 evaluator, the
    decoder's matrix products alone at the compiled chunk's shape
    (:func:`decoder_products_rate`).  Each is run once untimed (its estimate; the first
    call's set-up and compilation, a GPU's handles and kernels), then timed
    ``repeats`` times (median)."""
    experiment = build(device)
    x = experiment.data["test"].batch(slice(0, images))
    model, guide = experiment.model, experiment.guide
    out = {"case": f"IS log-likelihood throughput, datapoints x samples / s ({images} images, K={num_samples}, "
                   f"median of {repeats})"}

    def rate(ms: float) -> int:
        return round(images * num_samples / (ms / 1000))

    compiled = CompiledCall(log_importance_weights, "the IS evaluator's log weights")
    with torch.no_grad(), pyro.validation_enabled(False):
        def ours(log_weights=log_importance_weights) -> torch.Tensor:
            log_w = chunked_log_weights(model, guide, x, num_samples, CHUNK, NESTING, log_weights=log_weights)
            return importance_log_likelihood(log_w).mean()

        out["nll_pyro_vae"] = round(-ours().item(), 2)
        out["pyro_vae"] = rate(median_ms(ours, device, repeats, 1))
        out["nll_pyro_vae_compiled"] = round(-ours(compiled).item(), 2)
        out["pyro_vae_compiled"] = rate(median_ms(lambda: ours(compiled), device, repeats, 1))
        out["compiled_captured"] = compiled.compiled is not None  # False: the "compiled" row ran eagerly
        reduced = "bf16" if device == "cpu" else "tf32"  # eval.matmul_precision: the products' operands rounded
        problem = matmul_precision_problem(reduced, torch.device(device))
        if problem:  # (a CPU without AVX-512)
            print(f"{problem}: the {reduced} row is skipped")
        else:
            with float32_matmul_precision(reduced, torch.device(device)):
                out[f"nll_pyro_vae_compiled_{reduced}"] = round(-ours(compiled).item(), 2)
                out[f"pyro_vae_compiled_{reduced}"] = rate(median_ms(lambda: ours(compiled), device, repeats, 1))
        chunk = cpu_chunk_size(x, num_samples) if device == "cpu" else num_samples
        out["decoder_products_only"] = decoder_products_rate(model.decoder, chunk * images, device, repeats)
        if not pythae_installed():
            return out
        vae = _pythae_vae(experiment).to(device).eval()

        def pythae() -> float:
            return vae.get_nll(x, n_samples=num_samples, batch_size=PYTHAE_SAMPLE_BATCH)

        out["nll_pythae"] = round(-float(pythae()), 2)
        out["pythae_get_nll"] = rate(median_ms(pythae, device, repeats, 1))
        for ours in ("pyro_vae", "pyro_vae_compiled", f"pyro_vae_compiled_{reduced}"):
            if ours in out:  # (the reduced row is skipped on a CPU without AVX-512)
                out.update(speedups(out, ours, {"pythae": "pythae_get_nll"}, 1))
        out["ceiling_vs_pythae"] = round(out["decoder_products_only"] / out["pythae_get_nll"], 1)
    return out


def iw_chunks_case(device: str, num_samples: int, seconds: float = 3.0) -> dict:
    """Evaluator throughput, datapoints x samples / s, by samples per chunk."""
    experiment = build(device)
    x = experiment.data["test"].batch(slice(0, 100))
    model, guide = experiment.model, experiment.guide
    out = {"case": f"IS throughput by chunk size, datapoints x samples / s (100 images, K={num_samples})"}
    with torch.no_grad():
        for chunk in (500, 200, 100, 50, 20, "auto"):
            chunked_log_weights(model, guide, x, 50, chunk, NESTING)  # warm-up
            sync(device)
            start, repeats = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                chunked_log_weights(model, guide, x, num_samples, chunk, NESTING)
                repeats += 1
            sync(device)
            out[f"chunk_{chunk}"] = round(repeats * num_samples * 100 / (time.perf_counter() - start))
    if device == "cpu":
        out["auto_chunk"] = cpu_chunk_size(x, num_samples)
    return out


def matmul_flops(encoder: torch.nn.Module, decoder: torch.nn.Module, batch: int) -> int:
    """FLOPs of the matrix products of one training step: per ``Linear``
    layer ``2 B n_in n_out`` forward, as much for the weight gradient and
    again for the input gradient, save the encoder's first layer (the data
    need no gradient)."""
    total = 0
    for net in (encoder, decoder):
        for i, layer in enumerate(m for m in net.modules() if isinstance(m, torch.nn.Linear)):
            passes = 2 if (net is encoder and i == 0) else 3
            total += passes * 2 * batch * layer.in_features * layer.out_features
    return total


def flop_limit_case(device: str, train_step: dict, pipeline: dict) -> dict:
    """The measured sgemm rate, the step's matmul FLOPs and the time they
    take at that rate: the floor no implementation of the step gets under;
    each measured step (and pipeline, per 100 examples) as a multiple of it."""
    a = torch.randn(2048, 2048, device=device)
    for _ in range(2):
        a @ a
    sync(device)
    start, repeats = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        a @ a
        repeats += 1
    sync(device)
    gflops = repeats * 2 * 2048**3 / (time.perf_counter() - start) / 1e9
    experiment = build(device)
    flops = matmul_flops(experiment.guide.encoder, experiment.model.decoder, 100)
    floor_ms = flops / (gflops * 1e9) * 1000
    out = {"case": "FLOP limit of the training step (batch 100)", "sgemm_gflops": round(gflops, 1),
           "step_matmul_gflop": round(flops / 1e9, 3), "floor_ms": float(f"{floor_ms:.3g}")}
    for key in ("pyro_vae_ms", "pyro_vae_compiled_ms", "handwritten_torch_ms", "handwritten_torch_fused_adam_ms"):
        out[f"{key.removesuffix('_ms')}_x_floor"] = round(train_step[key] / floor_ms, 2)
    for key in ("pyro_vae", "pyro_vae_compiled", "handwritten_torch", "pyro_example_svi", "pythae_trainer",
                "pythae_trainer_dynamic"):
        if pipeline.get(key):
            out[f"pipeline_{key}_x_floor"] = round(100 / pipeline[key] * 1000 / floor_ms, 2)
    return out


def _peak_memory_child(kind: str, device: str, num_samples: int, queue) -> None:
    """Builds only the model and guide (no dataset), so the peak measured is the evaluation's."""
    keep_freed_memory()  # as the command does
    torch.set_num_threads(1)
    event_shape = (1, 28, 28)
    model, guide = build_model_and_guide(load_config(CONFIG), {"event_shape": event_shape})
    model, guide = model.to(device), guide.to(device)
    x = torch.bernoulli(torch.full((100, *event_shape), 0.13, device=device))
    encoder, decoder = plain_torch_copy(guide.encoder), plain_torch_copy(model.decoder)  # the hand-written's
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size (Linux)
    before = _resident_mib("VmRSS")
    with torch.no_grad():
        if kind == "pyro_vae":
            chunked_log_weights(model, guide, x, num_samples, CHUNK, NESTING)
        else:
            handwritten_log_weights(encoder, decoder, x, num_samples)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _resident_mib("VmHWM") - before
    queue.put(peak)


def _resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def in_fresh_process(target, *args):
    """``target(*args, queue)`` run in a spawned process; what it puts on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def memory_case(device: str, num_samples: int) -> dict:
    out = {kind: in_fresh_process(_peak_memory_child, kind, device, num_samples)
           for kind in ("pyro_vae", "handwritten_all_at_once")}
    return {"case": f"iw_eval peak memory growth (100 images, K={num_samples}, chunks {CHUNK})",
            "pyro_vae_MiB": round(out["pyro_vae"], 1),
            "handwritten_all_at_once_MiB": round(out["handwritten_all_at_once"], 1),
            "memory_ratio_handwritten_over_pyro_vae": round(out["handwritten_all_at_once"] / max(out["pyro_vae"], 1e-9), 1)}


def _is_pass_child(keep: bool, device: str, num_samples: int, threads: int, queue) -> None:
    """The evaluator's throughput and minor page faults over 100 test images
    (a warm-up pass, then a timed one), with or without :func:`keep_freed_memory`."""
    if keep:
        keep_freed_memory()
    torch.set_num_threads(threads)
    experiment = build(device)
    x = experiment.data["test"].batch(slice(0, 100))
    with torch.no_grad():
        chunked_log_weights(experiment.model, experiment.guide, x, num_samples, CHUNK, NESTING)
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        chunked_log_weights(experiment.model, experiment.guide, x, num_samples, CHUNK, NESTING)
        sync(device)
        seconds = time.perf_counter() - start
    queue.put((round(100 * num_samples / seconds), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))


def allocator_case(device: str, num_samples: int, threads: int, repeats: int) -> dict:
    """``pyro_vae.allocator.keep_freed_memory`` against glibc's default
    handling of freed blocks, in ``2 * repeats`` fresh processes of each
    (alternating): the IS evaluator's datapoints x samples / s and minor page
    faults, per process and their means.  Whether glibc's default returns the
    chunks' blocks to the kernel varies from process to process."""
    runs: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
    for _ in range(2 * repeats):
        for keep in (True, False):
            runs[keep].append(in_fresh_process(_is_pass_child, keep, device, num_samples, threads))
    out = {"case": f"IS throughput by allocator setting, datapoints x samples / s (100 images, K={num_samples}, "
                   f"fresh processes)"}
    for keep, name in ((True, "keep_freed_memory"), (False, "glibc_default")):
        out[name] = round(statistics.mean(r[0] for r in runs[keep]))
        out[f"{name}_runs"] = [{"samples_per_s": r[0], "minor_faults": r[1]} for r in runs[keep]]
    out["speedup"] = round(out["keep_freed_memory"] / out["glibc_default"], 2)
    return out


def format_table(report: dict) -> str:
    """The report as text: the setup, then each case's name and its figures,
    one per line, the names aligned (lists, a case's per-process runs, as JSON)."""
    lines = ["setup: " + ", ".join(f"{k} = {v}" for k, v in report["setup"].items())]
    for case in report["results"]:
        figures = {k: v for k, v in case.items() if k != "case"}
        width = max(map(len, figures), default=0)
        lines += ["", case["case"]]
        lines += [f"  {k:<{width}}  {json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in figures.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pipeline-steps", type=int, default=300, help="training steps timed per pipeline")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES, help="the cases to run (default: all)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the pyro-vae command does: every case below runs with it (`allocator` compares)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = train_step_case(args.device, args.repeats) if {"train_step", "flop_limit"} & set(args.cases) else None
    pipeline = (pipeline_case(args.device, args.pipeline_steps, args.repeats)
                if {"pipeline", "flop_limit"} & set(args.cases) else None)
    cases = {
        "train_step": lambda: step,
        "pipeline": lambda: pipeline,
        "flop_limit": lambda: flop_limit_case(args.device, step, pipeline),
        "iw_chunks": lambda: iw_chunks_case(args.device, args.iw_samples),
        "iw_eval": lambda: iw_case(args.device, args.repeats, args.iw_samples),
        "iw_throughput": lambda: iw_throughput_case(args.device, 5000, 10, args.repeats),
        "memory": lambda: memory_case(args.device, max(args.iw_samples, 5000)),
        "allocator": lambda: allocator_case(args.device, args.iw_samples, args.threads, args.repeats),
    }
    results = [cases[name]() for name in CASES if name in args.cases]
    meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
            "keep_freed_memory": kept}
    report = {"setup": meta, "results": results}
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
