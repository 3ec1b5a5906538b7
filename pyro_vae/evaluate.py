"""Evaluation of any model/guide pair that keeps the site contract.

Every figure is computed per datapoint first.  For datapoint ``x`` and
``z_1..z_K ~ q(z | x)`` the log importance weights are

    log w_k = log p(x, z_k) - log q(z_k | x),

summed over every sample site of the model (latents and the observed ``x``)
and of the guide, per datapoint of the ``"data"`` plate.  From them:

- the ELBO, ``E_q[log w] ~= (1/K) sum_k log w_k``;
- the importance-sampled log-likelihood (Burda et al. 2015)
  ``log p(x) >= L_K = log (1/K) sum_k w_k``, which increases to ``log p(x)``
  as ``K`` grows;
- the PSIS k-hat of the ``w_k`` (Vehtari et al. 2024, via arviz): above 0.7
  the importance-sampling estimate is unreliable for that datapoint;
- ``KL(q(z|x) || p(z))`` per latent dimension (analytic where registered).

Samples are drawn ``chunk_size`` at a time, vectorized over a particle plate
placed left of every plate the model uses, so memory is bounded by
``chunk_size * batch_size * dim(x)`` whatever ``K`` is.  ``chunk_size =
"auto"`` picks it for the device (:func:`cpu_chunk_size`, :func:`cuda_chunked_log_weights`).
``matmul_precision`` sets the internal precision of the float32 matrix
products for the evaluation (:func:`float32_matmul_precision`): ``"ieee"`` (the
default) computes them in float32; ``"bf16"`` (CPUs, through oneDNN)
rounds their operands to bfloat16 and accumulates in float32, which a CPU
with AMX runs at about twice the evaluator's float32 throughput; ``"tf32"``
does the same with TF32 on GPUs.  Everything else -- the log-densities, the
log-sum-exp -- stays float32.  On the Burda model's 10,000 test images
(K=5000, the same draws) bf16 products moved the IS NLL by +0.008 nats and
single images' IS log-likelihood by 0.07 (standard deviation; 0.46 at
most): README, "Evaluation".
With ``compile`` each chunk's log weights run through :func:`torch.compile`
whole (:class:`~pyro_vae.compiled.CompiledCall`): Inductor fuses the
elementwise passes around the matrix products (the tanh layers, the
Bernoulli log-density over the ``[chunk, B, dim(x)]`` logits) into a few
loops: a graph for the first chunk shape, one dynamic-shape graph for the
others (a CUDA evaluation, whose probe chunk differs, compiles both).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Optional, Union

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae.compiled import CompiledCall
from pyro_vae.config import MatmulPrecision
from pyro_vae.errors import ConfigError
from pyro_vae.psis import pareto_khat
from pyro_vae.traces import (
    guide_and_model_traces,
    latent_sites,
    log_importance_weights,
    log_mean_exp,
    max_plate_nesting,
    site_kl,
)


log = logging.getLogger("pyro_vae")


def onednn_bf16() -> bool:
    """Whether torch gives float32 products to oneDNN's bfloat16 kernels on this CPU (AVX-512)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def matmul_precision_problem(precision: MatmulPrecision, device: torch.device) -> Optional[str]:
    """Why ``precision`` cannot apply to float32 products on ``device``
    (``None``: it can): bfloat16 products are oneDNN's, on CPUs with AVX-512
    (elsewhere torch leaves float32 products to its BLAS, and the setting
    would change nothing); TF32 is cuBLAS's."""
    if precision == "bf16" and device.type != "cpu":
        return (f'eval.matmul_precision = "bf16" (--matmul-precision) is for CPUs; on {device.type} use "tf32" or '
                '"ieee"')
    if precision == "bf16" and not onednn_bf16():
        return ('eval.matmul_precision = "bf16" (--matmul-precision): this CPU has no AVX-512, so torch does not '
                'give its float32 products to oneDNN and bfloat16 operands would change nothing; use "ieee"')
    if precision == "tf32" and device.type != "cuda":
        return ('eval.matmul_precision = "tf32" (--matmul-precision) is for GPUs; on the CPU use '
                + ('"bf16" or "ieee"' if onednn_bf16() else '"ieee"'))
    return None


@contextlib.contextmanager
def float32_matmul_precision(precision: MatmulPrecision, device: torch.device) -> Iterator[None]:
    """Within the block, float32 matrix products on ``device`` take their
    operands at ``precision`` and accumulate in float32: torch's
    ``fp32_precision`` of oneDNN on the CPU, of cuBLAS on CUDA, restored
    after.  ``"ieee"``: float32 products; ``"bf16"``: operands rounded to
    bfloat16 (8 significant bits; CPUs with AVX-512, fast with AMX or
    AVX512-BF16, emulated without); ``"tf32"``: to TF32 (11 bits; NVIDIA
    GPUs since Ampere).  :func:`matmul_precision_problem`'s combinations
    raise :class:`~pyro_vae.errors.ConfigError`.  (Inside the block torch's
    older getters, ``torch.get_float32_matmul_precision()`` and
    ``torch.backends.cuda.matmul.allow_tf32``, raise: torch refuses to mix
    the two APIs.)"""
    problem = matmul_precision_problem(precision, device)
    if problem:
        raise ConfigError(problem)
    if precision == "bf16" and not torch.cpu._is_avx512_bf16_supported():
        log.warning('eval.matmul_precision = "bf16": this CPU has no bfloat16 products (AVX512-BF16 or AMX), '
                    'so oneDNN emulates them, more slowly than "ieee"')
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    previous = backend.fp32_precision
    backend.fp32_precision = precision
    try:
        yield
    finally:
        backend.fp32_precision = previous


def chunk_sizes(total: int, chunk: int) -> list[int]:
    """``total`` split into pieces of at most ``chunk``: 1200, 500 -> [500, 500, 200]."""
    return [min(chunk, total - start) for start in range(0, total, chunk)]


ChunkSize = Union[int, Literal["auto"]]
LogWeights = Callable[[Callable, Callable, torch.Tensor, int, int], torch.Tensor]  # log_importance_weights' signature
CPU_CHUNK_ELEMENTS = 4_000_000  # data elements per chunk (chunk x B x dim(x)) on the CPU
CUDA_MEMORY_FRACTION = 0.5  # of the free GPU memory, for one chunk
PROBE_SAMPLES = 16  # the first chunk on CUDA, whose peak memory sizes the others


def cpu_chunk_size(x: torch.Tensor, num_samples: int, outputs_per_value: int = 1) -> int:
    """Samples per chunk on the CPU: ``chunk x B x dim(x) ~ 4M`` elements.

    The evaluation is memory-bound around its matrix products: each chunk's
    tensors (the decoder's activations, the logits) are read and written by
    several elementwise passes, which run from the cache when a tensor holds
    a few million floats and from main memory when it holds more.  Measured
    on the Burda model, 100 images a batch, one thread: 130k samples/s with
    50 samples a chunk, 100k with 100, 48k with 500 (``scripts/benchmark.py``,
    ``iw_chunks``).  A model whose per-sample tensors are much larger than
    its data (a language model's vocabulary-sized logits per word) gives
    ``outputs_per_value`` (the dataset's: 1 for pixels, the vocabulary's size
    for words), so the chunk counts those outputs instead.

    The chunk is the largest divisor of ``num_samples`` between half that
    size and it, where there is one (5000 in chunks of 50, not 98 of 51 and
    one of 2): every chunk then has one shape, which a compiled evaluator
    compiles once."""
    per_sample = x.numel() * outputs_per_value
    target = max(1, min(num_samples, CPU_CHUNK_ELEMENTS // max(per_sample, 1)))
    return next((size for size in range(target, (target + 1) // 2 - 1, -1) if num_samples % size == 0), target)


def cuda_chunked_log_weights(model: Callable, guide: Callable, x: torch.Tensor, num_samples: int,
                             nesting: int, log_weights: LogWeights = log_importance_weights) -> torch.Tensor:
    """The log weights on a GPU, in chunks as large as half its free memory
    allows: the first :data:`PROBE_SAMPLES` samples are drawn alone and the
    peak memory they took, per sample, sizes the rest."""
    device = x.device
    first = min(PROBE_SAMPLES, num_samples)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    pieces = [log_weights(model, guide, x, first, nesting)]
    per_sample = max(torch.cuda.max_memory_allocated(device) - base, 1) / first
    free, _ = torch.cuda.mem_get_info(device)
    chunk = max(1, int(CUDA_MEMORY_FRACTION * free / per_sample))
    pieces += [log_weights(model, guide, x, k, nesting) for k in chunk_sizes(num_samples - first, chunk)]
    return torch.cat(pieces)


def chunked_log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, num_samples: int, chunk_size: ChunkSize, nesting: int,
    outputs_per_value: int = 1, log_weights: LogWeights = log_importance_weights,
) -> torch.Tensor:
    """``log_weights`` (:func:`~pyro_vae.traces.log_importance_weights`, or
    its compiled form) for ``num_samples`` drawn ``chunk_size`` at a time
    (``"auto"``: sized for the device, see :func:`cpu_chunk_size`):
    ``[num_samples, B]``."""
    if chunk_size == "auto":
        if x.device.type == "cuda":
            return cuda_chunked_log_weights(model, guide, x, num_samples, nesting, log_weights)
        chunk_size = cpu_chunk_size(x, num_samples, outputs_per_value)
    return torch.cat([log_weights(model, guide, x, k, nesting) for k in chunk_sizes(num_samples, chunk_size)])


def importance_log_likelihood(log_w: torch.Tensor) -> torch.Tensor:
    """``L_K = log (1/K) sum_k w_k`` per datapoint (``log_w``: ``[K, B]`` -> ``[B]``)."""
    return log_mean_exp(log_w, dim=0)


PSIS_MIN_SAMPLES = 21  # the Pareto tail is the ceil(min(K/5, 3 sqrt K)) largest weights: 5, the fewest fitted, at K = 21


def psis_khat(log_w: torch.Tensor) -> np.ndarray:
    """Pareto-smoothed importance-sampling shape estimate k-hat per datapoint
    (arviz's :func:`~arviz.psislw` estimate, for a batch at once:
    :func:`pyro_vae.psis.pareto_khat`; ``log_w``: ``[K, B]`` -> ``[B]``).
    Undefined (NaN) below :data:`PSIS_MIN_SAMPLES` samples, too few to fit a tail."""
    if log_w.shape[0] < PSIS_MIN_SAMPLES:
        return np.full(log_w.shape[1], np.nan)
    return pareto_khat(log_w)


def kl_per_dimension(model: Callable, guide: Callable, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``KL(q(z_u | x_b) || p(z_u))`` per datapoint ``b`` and latent dimension
    ``u``, for each latent site: ``{site: [B, D]}``.

    Where both densities factorise over dimensions (diagonal guides, i.i.d.
    priors) each dimension's KL is analytic if torch registers the pair, else a
    one-sample estimate ``log q(z_u|x) - log p(z_u)``.  A site whose guide or
    prior does not factorise (e.g. a full-covariance guide) gets its total KL
    as a single column ``[B, 1]``, computed the same way (see
    :func:`~pyro_vae.traces.site_kl`)."""
    guide_trace, model_trace = guide_and_model_traces(model, guide, x)
    return {name: site_kl(q_site, model_trace.nodes[name]).reshape(x.shape[0], -1)
            for name, q_site in latent_sites(guide_trace)}


@dataclass
class Evaluation:
    """Per-datapoint results over one split (arrays of shape ``[N]``) and the
    per-dimension KL averaged over datapoints."""

    elbo: np.ndarray
    log_likelihood: np.ndarray
    khat: np.ndarray
    kl_per_dim: dict[str, np.ndarray]
    num_samples: int
    extra: dict = field(default_factory=dict)

    def _khat_summary(self) -> dict:
        """Mean, max and fraction above 0.7 of k-hat; ``None`` where undefined (K too small)."""
        if np.isnan(self.khat).all():
            return {"psis_khat": None, "psis_khat_max": None, "psis_khat_frac_above_0.7": None}
        return {"psis_khat": float(self.khat.mean()), "psis_khat_max": float(self.khat.max()),
                "psis_khat_frac_above_0.7": float((self.khat > 0.7).mean())}

    def summary(self) -> dict:
        """Means over datapoints, in nats; the NLL as a positive number."""
        kl_total = float(sum(v.sum() for v in self.kl_per_dim.values()))
        return {
            "elbo": float(self.elbo.mean()),
            "iw_nll": float(-self.log_likelihood.mean()),
            "kl": kl_total,
            **self._khat_summary(),
            "kl_per_dim": {k: [round(float(u), 4) for u in v] for k, v in self.kl_per_dim.items()},
            "iw_samples": self.num_samples,
            "num_datapoints": int(self.elbo.shape[0]),
            **self.extra,
        }


@torch.no_grad()
def evaluate(
    model: Callable,
    guide: Callable,
    batches: Iterable[torch.Tensor],
    num_samples: int,
    chunk_size: ChunkSize = "auto",
    num_batches: int | None = None,
    progress: bool = True,
    outputs_per_value: int = 1,
    compile: bool = False,
    matmul_precision: MatmulPrecision = "ieee",
) -> Evaluation:
    """ELBO, IS log-likelihood with ``num_samples`` samples, PSIS k-hat and KL
    per dimension for every datapoint of ``batches``; with ``compile``, the
    log weights through :func:`torch.compile`; their matrix products at
    ``matmul_precision`` (see the module docstring)."""
    log_weights = (CompiledCall(log_importance_weights, "the IS evaluator's log weights") if compile
                   else log_importance_weights)
    elbo, log_lik, khat, kl_sum, count = [], [], [], {}, 0
    nesting = None
    with contextlib.ExitStack() as scope:
        for x in tqdm(batches, total=num_batches, desc=f"evaluate K={num_samples}", disable=not progress,
                      leave=False):
            if nesting is None:  # the first batch runs with Pyro's argument validation on
                nesting = max_plate_nesting(model, guide, x)
                scope.enter_context(float32_matmul_precision(matmul_precision, x.device))
            with pyro.validation_enabled(False):  # validation would re-check K * B * dim(x) values
                log_w = chunked_log_weights(model, guide, x, num_samples, chunk_size, nesting, outputs_per_value,
                                            log_weights)
            elbo.append(log_w.mean(0).cpu())
            log_lik.append(importance_log_likelihood(log_w).cpu())
            khat.append(psis_khat(log_w))
            for site, kl in kl_per_dimension(model, guide, x).items():
                kl_sum[site] = kl_sum.get(site, 0) + kl.sum(0).double().cpu()
            count += x.shape[0]
    if count == 0:
        raise ValueError("nothing to evaluate: the split is empty")
    return Evaluation(
        elbo=torch.cat(elbo).double().numpy(),
        log_likelihood=torch.cat(log_lik).double().numpy(),
        khat=np.concatenate(khat),
        kl_per_dim={k: (v / count).numpy() for k, v in kl_sum.items()},
        num_samples=num_samples,
        extra={"matmul_precision": matmul_precision},
    )


@torch.no_grad()
def mean_elbo(model: Callable, guide: Callable, batches: Iterable[torch.Tensor], num_samples: int = 1) -> float:
    """The ELBO averaged over datapoints, each estimated from ``num_samples``
    draws of ``q(z|x)`` (the cheap per-epoch validation figure)."""
    total, count, nesting = 0.0, 0, None
    for x in batches:
        if nesting is None:
            nesting = max_plate_nesting(model, guide, x)
        with pyro.validation_enabled(False):
            total += float(log_importance_weights(model, guide, x, num_samples, nesting).mean(0).sum())
        count += x.shape[0]
    return total / count
