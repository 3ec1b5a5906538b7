"""Speed and memory of pyro-vae against hand-written PyTorch, as ratios.

Each case times pyro-vae and a reference implementation on the same machine,
in the same process, interleaved, and reports the median of the repeats and
their ratio (reference time / pyro-vae time: above 1 means pyro-vae is
faster).  Peak memory is measured in fresh child processes that build only the model
and guide: the growth of the peak resident set size during the evaluation on
CPU (Linux ``/proc``), ``torch.cuda.max_memory_allocated`` on CUDA.

Cases, on Burda et al.'s MNIST architecture (784-200-200-50, tanh):

- ``train_step``: one Adam step on a batch of 100 with the mean-field ELBO,
  pyro-vae's trainer step (the ``meanfield_elbo`` objective module, fused Adam, the
  gradients checked for NaN before the update, the loss for divergence after) vs the
  same math written by hand, with PyTorch's default Adam and with fused Adam.
- ``iw_eval``: the importance-sampled log-likelihood of 100 test images with K
  samples; pyro-vae's chunked, particle-plate-vectorized evaluator vs (a) a
  hand-written loop over the K samples with ``torch.distributions``, and
  (b) a hand-written evaluation of all K samples at once.

Usage: ``python scripts/benchmark.py [--device cpu|cuda] [--iw-samples 1000]``
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyro_vae.config import load_config
from pyro_vae.evaluate import chunked_log_weights, importance_log_likelihood
from pyro_vae.experiment import Experiment, build_model_and_guide
from pyro_vae.rundir import RunDir
from pyro_vae.train import Trainer

CONFIG = "configs/mnist_burda.toml"
CHUNK = 500  # samples drawn at once by pyro-vae's evaluator
NESTING = 1  # plates of the Gaussian VAE: the data plate only


def build(device: str) -> Experiment:
    return Experiment.build(load_config(CONFIG), torch.device(device))


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
def handwritten_loss(encoder, decoder, x):
    """-ELBO with analytic KL, written directly in PyTorch."""
    x = x.reshape(x.shape[0], -1)
    loc, raw = encoder(x).chunk(2, -1)
    scale = F.softplus(raw) + 1e-4
    z = loc + scale * torch.randn_like(loc)
    log_lik = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
    kl = (-torch.log(scale) + (scale**2 + loc**2 - 1) / 2).sum(-1)
    return (kl - log_lik).sum()


def handwritten_log_weights(encoder, decoder, x, num_samples):
    """log w [K, B] over all K samples at once: q(z|x) and p(x, z) by hand."""
    x = x.reshape(x.shape[0], -1)
    loc, raw = encoder(x).chunk(2, -1)
    q = torch.distributions.Normal(loc, F.softplus(raw) + 1e-4)
    z = q.sample((num_samples,))
    prior = torch.distributions.Normal(0.0, 1.0)
    log_lik = torch.distributions.Bernoulli(logits=decoder(z)).log_prob(x).sum(-1)
    return log_lik + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)


def handwritten_loop(encoder, decoder, x, num_samples):
    """The same, one sample at a time (the common hand-written form)."""
    return torch.stack([handwritten_log_weights(encoder, decoder, x, 1)[0] for _ in range(num_samples)])


# ---------------------------------------------------------------- cases
def train_step_case(device: str, repeats: int) -> dict:
    experiment = build(device)
    x = experiment.data["train"].batch(slice(0, 100))
    with tempfile.TemporaryDirectory() as unused:  # the trainer's step writes nothing there
        trainer = Trainer(experiment, RunDir(unused))  # the trainer's own step: guarded, checked, summed
        encoder, decoder = copy.deepcopy(experiment.guide.encoder), copy.deepcopy(experiment.model.decoder)
        reference_params = [*encoder.parameters(), *decoder.parameters()]
        reference_optimizers = {
            "handwritten_torch_ms": torch.optim.Adam(reference_params, lr=1e-3),
            "handwritten_torch_fused_adam_ms": torch.optim.Adam(reference_params, lr=1e-3, fused=True),
        }

        def reference_step(optimizer):
            loss = handwritten_loss(encoder, decoder, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        times = {"pyro_vae_ms": [], **{k: [] for k in reference_optimizers}}
        for _ in range(repeats):  # interleaved, so drifts in machine load hit every variant
            times["pyro_vae_ms"].append(median_ms(lambda: trainer.step(x), device, 1, 50))
            for key, ref_optimizer in reference_optimizers.items():
                times[key].append(median_ms(lambda opt=ref_optimizer: reference_step(opt), device, 1, 50))
        out = {"case": "train_step (batch 100)", **{k: round(statistics.median(v), 2) for k, v in times.items()}}
        out["speedup_vs_handwritten"] = round(out["handwritten_torch_ms"] / out["pyro_vae_ms"], 2)
        out["speedup_vs_handwritten_fused_adam"] = round(out["handwritten_torch_fused_adam_ms"] / out["pyro_vae_ms"], 2)
        return out


def iw_case(device: str, repeats: int, num_samples: int) -> dict:
    experiment = build(device)
    x = experiment.data["test"].batch(slice(0, 100))
    model, guide = experiment.model, experiment.guide
    encoder, decoder = guide.encoder, model.decoder
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


def _peak_memory_child(kind: str, device: str, num_samples: int, queue) -> None:
    """Builds only the model and guide (no dataset), so the peak measured is the evaluation's."""
    torch.set_num_threads(1)
    event_shape = (1, 28, 28)
    model, guide = build_model_and_guide(load_config(CONFIG), event_shape)
    model, guide = model.to(device), guide.to(device)
    x = torch.bernoulli(torch.full((100, *event_shape), 0.13, device=device))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size (Linux)
    before = _resident_mib("VmRSS")
    with torch.no_grad():
        if kind == "pyro_vae":
            chunked_log_weights(model, guide, x, num_samples, CHUNK, NESTING)
        else:
            handwritten_log_weights(guide.encoder, model.decoder, x, num_samples)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _resident_mib("VmHWM") - before
    queue.put(peak)


def _resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_case(device: str, num_samples: int) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for kind in ("pyro_vae", "handwritten_all_at_once"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_memory_child, args=(kind, device, num_samples, queue))
        proc.start()
        out[kind] = queue.get()
        proc.join()
    return {"case": f"iw_eval peak memory growth (100 images, K={num_samples}, chunk {CHUNK})",
            "pyro_vae_MiB": round(out["pyro_vae"], 1),
            "handwritten_all_at_once_MiB": round(out["handwritten_all_at_once"], 1),
            "memory_ratio_handwritten_over_pyro_vae": round(out["handwritten_all_at_once"] / max(out["pyro_vae"], 1e-9), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = [
        train_step_case(args.device, args.repeats),
        iw_case(args.device, args.repeats, args.iw_samples),
        memory_case(args.device, max(args.iw_samples, 5000)),
    ]
    meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__}
    print(json.dumps({"setup": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
