"""Learning-rate schedules: the multipliers, and the trainer following them."""
import csv

import pytest

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import config_from_dict
from pyro_vae.experiment import Experiment
from pyro_vae.rundir import RunDir
from pyro_vae.schedules import burda_stage, lr_multiplier
from pyro_vae.train import fit


def test_burda_stages_last_three_to_the_i_epochs():
    stages = [burda_stage(e) for e in range(3281)]
    assert [stages.count(i) for i in range(8)] == [3**i for i in range(8)][:7] + [3**7 + 1]  # 3,280 epochs, then stays
    assert stages[:14] == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    fn = lr_multiplier("burda", steps_per_epoch=10, total_steps=0)
    assert fn(0) == 1.0 and fn(39) == pytest.approx(10 ** (-1 / 7)) and fn(40) == pytest.approx(10 ** (-2 / 7))
    assert fn(10**9) == pytest.approx(10 ** (-7 / 7))


def test_cosine_and_warmup():
    fn = lr_multiplier("cosine", steps_per_epoch=10, total_steps=100)
    assert [fn(0), fn(50), fn(100), fn(200)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    warm = lr_multiplier("constant", steps_per_epoch=10, total_steps=100, warmup_steps=4)
    assert [warm(t) for t in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_the_trainer_follows_the_schedule_and_a_changed_one_on_resume(tiny_raw, tmp_path):
    tiny_raw["train"].update(limit=500, epochs=2, lr=0.01, lr_schedule="cosine")  # 5 steps an epoch, 10 in all
    fit(Experiment.build(config_from_dict(tiny_raw)), RunDir(tmp_path), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.005, 0.0], abs=1e-12)  # after steps 5 and 10
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["scheduler"]["last_epoch"] == 10
    tiny_raw["train"].update(epochs=3, lr=0.02, lr_schedule="constant")  # both may change on resume
    fit(Experiment.build(config_from_dict(tiny_raw)), RunDir(tmp_path), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[-1]["lr"]) == pytest.approx(0.02)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.02)
