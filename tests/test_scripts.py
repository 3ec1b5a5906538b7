"""The study scripts run end to end on a small configuration."""
import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import tomli_w

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    """``scripts/<name>.py`` imported as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gradient_variance_script(tmp_path):
    config = {**TINY, "data": {"name": "mnist", "binarization": "static"},
              "model": {"name": "linear", "latent_dim": 20}, "prior": {"name": "bernoulli", "learned": True},
              "guide": {"name": "bernoulli", "hidden": []}, "objective": {"name": "disarm"}}
    (tmp_path / "sbn.toml").write_text(tomli_w.dumps(config))
    out = tmp_path / "gv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gradient_variance.py"), "--config", str(tmp_path / "sbn.toml"),
                    "--estimators", "trace_elbo", "nvil", "disarm", "--reference", "nvil", "--draws", "30", "--reference-draws", "500",
                    "--warmup", "20", "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    rows = {row["estimator"]: row for row in csv.DictReader(open(out.with_suffix(".csv")))}
    assert set(rows) == {"trace_elbo", "nvil", "disarm"}
    # the plain score function is orders of magnitude noisier than DisARM
    assert float(rows["trace_elbo"]["variance"]) > 100 * float(rows["disarm"]["variance"])
    assert float(rows["disarm"]["bias"]) < 3 * float(rows["disarm"]["noise"])
    assert out.with_suffix(".png").stat().st_size > 1000 and "| `disarm` |" in out.with_suffix(".md").read_text()


def test_compare_runs_reports_the_headline_evaluation(tmp_path, capsys):
    """Of a run's evaluations, the table shows the latest checkpoint's on the
    test split with the largest K, whatever was evaluated last."""
    import json

    from pyro_vae.cli import main

    (tmp_path / "tiny.toml").write_text(tomli_w.dumps(TINY))
    for name in ("a", "b"):
        assert main(["train", str(tmp_path / "tiny.toml"), "--run-dir", str(tmp_path / name), "--quiet"]) == 0
    assert main(["evaluate", str(tmp_path / "a"), "--quiet", "--iw-samples", "3", "--split", "valid", "--limit", "7"]) == 0
    assert main(["evaluate", str(tmp_path / "b"), "--quiet", "--iw-samples", "20", "--limit", "100", "--decompose"]) == 0
    capsys.readouterr()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(tmp_path / "a"), str(tmp_path / "b"),
                    "--out", str(tmp_path / "cmp")], check=True, capture_output=True, cwd=tmp_path)
    table = (tmp_path / "cmp.md").read_text()
    headline = json.loads((tmp_path / "a" / "eval_test_K20_first100_epoch1.json").read_text())
    assert "test IS NLL (K=20)" in table and f"| {headline['iw_nll']:.2f} |" in table.splitlines()[2]
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    decomposed = table.split("\n\n")[1].splitlines()  # b was evaluated with --decompose, a was not
    assert "index-code MI" in decomposed[0] and "| n/a |" in decomposed[2] and "± " in decomposed[3]


def test_the_headline_evaluation_is_one_with_float32_products():
    """A newer evaluation with more samples but bf16 products (eval.matmul_precision) is not the headline."""
    headline_evaluation = _script("compare_runs").headline_evaluation

    float32 = {"split": "test", "iw_samples": 20, "epoch": 1, "matmul_precision": "ieee"}
    older = {"split": "test", "iw_samples": 5, "epoch": 1}  # (written before the option: float32)
    reduced = {"split": "test", "iw_samples": 5000, "epoch": 1, "matmul_precision": "bf16"}
    assert headline_evaluation({"evaluations": [older, float32, reduced]}) is float32
    assert headline_evaluation({"evaluations": [reduced]}) is reduced


def test_collapse_study_quick_mode_writes_its_table_and_plots(tmp_path):
    """--quick trains each named run (a combination and the aggressive
    encoder, whose phase checks I(x; z) every tenth of an epoch, included) on 300 PTB
    sentences and writes the CSV, the markdown table and the plots; a second
    call resumes: finished runs are read, not retrained."""
    import csv
    import subprocess
    import sys

    command = [sys.executable, "scripts/collapse_study.py", "--quick", "--epochs", "1", "--runs", "vanilla",
               "cyclical+free_bits", "aggressive", "lm", "--out", str(tmp_path / "study")]
    subprocess.run(command, check=True, capture_output=True)
    rows = list(csv.DictReader(open(tmp_path / "study" / "study.csv")))
    assert [r["run"] for r in rows] == ["vanilla", "cyclical+free_bits", "aggressive", "lm"]
    assert all(float(r["perplexity"]) > 1 and float(r["kl"]) >= 0 for r in rows)
    assert "| cyclical+free_bits |" in (tmp_path / "study" / "study.md").read_text()
    assert (tmp_path / "study" / "study.png").stat().st_size > 10_000
    stamp = (tmp_path / "study" / "vanilla" / "checkpoint.pt").stat().st_mtime
    subprocess.run(command, check=True, capture_output=True)
    assert (tmp_path / "study" / "vanilla" / "checkpoint.pt").stat().st_mtime == stamp
    failed = subprocess.run(command[:5] + ["--runs", "vanila"], capture_output=True, text=True)
    assert failed.returncode != 0 and "unknown remedy 'vanila'" in failed.stderr


def test_benchmark_prints_a_table_and_writes_the_same_results_as_json(tmp_path):
    import json

    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--device", "cpu", "--threads", "1",
                          "--cases", "iw_eval", "--repeats", "1", "--iw-samples", "50", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    (case,) = report["results"]
    assert report["setup"]["device"] == "cpu" and case["case"] == "iw_eval (100 images, K=50)"
    lines = run.stdout.splitlines()
    assert lines[0].startswith("setup: device = cpu") and case["case"] in lines
    for key, value in case.items():  # every figure on its own line
        if key != "case":
            assert any(line.split() == [key, str(value)] for line in lines), key
    # the two estimates of the same untrained model agree within Monte-Carlo error
    assert abs(case["mean_log_likelihood_pyro_vae"] - case["mean_log_likelihood_handwritten"]) < 2.0


def test_compare_runs_counts_steps_with_a_short_last_batch_and_takes_the_best_elbo(tmp_path):
    """250 images in batches of 100 are 3 steps an epoch (the last batch short);
    the best train ELBO is the highest."""
    import csv
    from pyro_vae.config import config_from_dict, save_config
    from pyro_vae.rundir import RunDir

    compare_runs = _script("compare_runs")
    run = tmp_path / "run"
    run.mkdir()
    raw = copy.deepcopy(TINY)
    raw["train"].update(limit=250, epochs=3)
    save_config(config_from_dict(raw), run / "config.toml")
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "train_elbo", "valid_elbo", "seconds"])
        writer.writeheader()
        for epoch, elbo in ((1, -100.0), (2, -80.0), (3, -90.0)):
            writer.writerow({"epoch": epoch, "train_elbo": elbo, "valid_elbo": elbo - 1, "seconds": 1200})
    evaluation = {"split": "test", "iw_samples": 5, "epoch": 3, "elbo": -95.0, "iw_nll": 92.0}
    (run / "report.json").write_text(json.dumps({"eval": evaluation, "evaluations": [evaluation]}))
    summary = compare_runs.summarise(RunDir(run))
    assert summary["steps"] == 9 and summary["curve"] == ([3, 6, 9], [-100.0, -80.0, -90.0])
    assert summary["best_train_elbo"] == -80.0 and summary["final_train_elbo"] == -90.0
    assert summary["valid_elbo"] == -91.0 and summary["hours"] == 1.0


def test_collapse_study_overrides_check_mi_at_least_every_step():
    """The aggressive phase checks I(x; z) every tenth of an epoch, and at least every step
    (mi_every = 0 for an epoch of fewer than 10 steps would be refused or never check)."""
    study = _script("collapse_study")
    assert study.overrides("aggressive", 4, 1, 5) == ["objective.aggressive=true", "objective.mi_every=1"]
    assert study.overrides("aggressive", 4, 1, 250) == ["objective.aggressive=true", "objective.mi_every=25"]
    assert study.overrides("linear+cyclical", 4, 2, 10) == [
        "objective.kl_annealing=linear", "objective.anneal_steps=20",
        "objective.kl_annealing=cyclical", "objective.anneal_steps=40", "objective.cycles=4"]
