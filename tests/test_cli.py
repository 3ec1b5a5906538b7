"""The `pyro-vae` command end to end on a small MNIST subset."""
import json

import pytest
import tomli_w

from conftest import TINY
from pyro_vae import compiled
from pyro_vae.cli import main
from pyro_vae.evaluate import onednn_bf16


def trained_tiny_run(tmp_path, capsys):
    """A run of the tiny config trained one epoch (and evaluated) by the command; its output discarded."""
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(TINY))
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 0
    capsys.readouterr()
    return run


def test_list_prints_every_registered_name(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist", "mlp", "standard_normal", "normal", "trace_elbo", "meanfield_elbo"):
        assert f"  {name} " in out


def test_train_then_evaluate(tmp_path, capsys, monkeypatch):
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(TINY))
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--set", "train.epochs=2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test ELBO" in out and "IS NLL (K=20)" in out
    for name in ("config.toml", "checkpoint.pt", "metrics.csv", "samples.png", "reconstructions.png",
                 "curves.png", "report.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["epochs"] == 2 and report["eval"]["num_datapoints"] == 100

    assert main(["evaluate", str(run), "--iw-samples", "30", "--limit", "40", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"elbo", "iw_nll", "kl", "psis_khat"} <= set(summary)
    assert summary["num_datapoints"] == 40 and summary["iw_samples"] == 30
    assert -summary["iw_nll"] >= summary["elbo"] - 1.0  # L_30 sits above the ELBO (up to noise)
    assert json.loads((run / "eval_test_K30_first40_epoch2.json").read_text()) == summary
    report = json.loads((run / "report.json").read_text())
    assert [e["file"] for e in report["evaluations"]] == ["eval_test_K20_first100_epoch2.json",
                                                          "eval_test_K30_first40_epoch2.json"]
    assert report["eval"] == summary and report["epochs"] == 2  # the training summary is kept

    compiled_chunks = []  # --compile routes the evaluator's chunks through torch.compile (counted, not compiled)
    monkeypatch.setattr(compiled.torch, "compile", lambda fn, **kw: lambda *a: compiled_chunks.append(a[3]) or fn(*a))
    assert main(["evaluate", str(run), "--iw-samples", "30", "--limit", "40", "--compile", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["num_datapoints"] == 40 and sum(compiled_chunks) == 30 * 1


@pytest.mark.skipif(not onednn_bf16(), reason="needs a CPU whose float32 products oneDNN takes (AVX-512)")
def test_an_evaluation_with_bf16_products_is_filed_beside_the_float32_one_not_over_it(tmp_path, capsys):
    run = trained_tiny_run(tmp_path, capsys)
    float32 = json.loads((run / "report.json").read_text())["eval"]
    assert main(["evaluate", str(run), "--iw-samples", "20", "--limit", "100", "--matmul-precision", "bf16",
                 "--quiet"]) == 0
    reduced = json.loads(capsys.readouterr().out)
    assert reduced["matmul_precision"] == "bf16" and reduced["file"] == "eval_test_K20_first100_bf16_epoch1.json"
    assert float32["matmul_precision"] == "ieee" and float32["file"] == "eval_test_K20_first100_epoch1.json"
    assert (run / float32["file"]).is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["eval"] == float32 and report["evaluations"][-1] == reduced  # the headline stays float32


def test_errors_are_one_line_messages(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(tomli_w.dumps({**TINY, "model": {**TINY["model"], "name": "mlpp"}}))
    assert main(["train", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: unknown model 'mlpp'. Did you mean 'mlp'?")
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist; train one with `pyro-vae train CONFIG" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "is not a run directory: it has no config.toml" in capsys.readouterr().err


def test_evaluate_takes_k_equal_one_and_refuses_bad_numbers(tmp_path, capsys):
    run = trained_tiny_run(tmp_path, capsys)
    assert main(["evaluate", str(run), "--iw-samples", "1", "--limit", "20", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iw_samples"] == 1 and summary["psis_khat"] is None
    assert summary["iw_nll"] == -summary["elbo"]  # L_1 is the one-sample ELBO
    for flag, value in (("--iw-samples", "-3"), ("--iw-samples", "0"), ("--limit", "0"), ("--chunk-size", "x")):
        with pytest.raises(SystemExit):
            main(["evaluate", str(run), flag, value])
        assert f"argument {flag}" in capsys.readouterr().err
