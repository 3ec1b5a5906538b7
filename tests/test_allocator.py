"""The allocator setting: freed tensor memory stays in the heap for reuse."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vae.allocator import OPT_OUT, keep_freed_memory

GLIBC = platform.libc_ver()[0] == "glibc"
BURDA = Path(__file__).parent.parent / "configs" / "mnist_burda.toml"

# Minor page faults of the evaluator's K=200 pass over 100 binary images
# with Burda's untrained networks, in chunks of 51 samples (~16 MiB of logits
# each): the fewest of three passes after the first.  The kernel's proactive
# reclaim (DAMON: kdamond runs on these machines) pages kept blocks out
# between passes at times: 600-3,900 faults in a pass here, 1-3 otherwise,
# against ~35,000 with glibc's default, which hands every block back.
FAULTS_OF_AN_IS_PASS = """
import resource, sys, torch
from pyro_vae.allocator import keep_freed_memory
from pyro_vae.config import load_config
from pyro_vae.evaluate import chunked_log_weights
from pyro_vae.experiment import build_model_and_guide
torch.set_num_threads(1)
changed = keep_freed_memory()
model, guide = build_model_and_guide(load_config(sys.argv[1]), {"event_shape": (1, 28, 28)})
x = torch.rand(100, 1, 28, 28).round()
faults = []
with torch.no_grad():
    chunked_log_weights(model, guide, x, 200, 51, 1)
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        chunked_log_weights(model, guide, x, 200, 51, 1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(changed, min(faults))
"""


def faults_of_an_is_pass(**env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_AN_IS_PASS, str(BURDA)], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_an_importance_sampling_pass_reuses_freed_memory():
    """Four chunks of ~16 MiB logits and ~4 MiB activations: page-faulted in
    afresh (tens of thousands of faults) unless freed blocks are kept."""
    changed, faults = faults_of_an_is_pass()
    assert changed == "True"
    assert faults < 10_000, faults


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_environment_variable_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT, "0")
    assert keep_freed_memory() is False
    changed, _ = faults_of_an_is_pass(**{OPT_OUT: "0"})
    assert changed == "False"  # (glibc's default then faults or not, by what the process freed before)


def test_the_command_keeps_freed_memory(monkeypatch):
    from pyro_vae import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["list"]) == 0
    assert calls == [1]
