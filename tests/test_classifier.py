"""The digit classifier's sample scores against exact answers, and the
`classifier train` / `evaluate --sample-quality` commands end to end."""
import json
import math

import numpy as np
import pytest
import tomli_w
import torch

import pyro_vae.classifier as classifier_module
from conftest import TINY
from pyro_vae.classifier import frechet_distance, score_images
from pyro_vae.cli import main


def test_frechet_distance_against_closed_forms():
    """Diagonal Gaussians: ||m_1 - m_2||^2 + sum_d (sqrt(a_d) - sqrt(b_d))^2;
    a Gaussian to itself: 0; a singular covariance (a dead feature) as well."""
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    a[2] = b[4] = 0.0
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    c = rng.normal(size=(5, 5))
    assert frechet_distance(m1, c @ c.T, m1, c @ c.T) == pytest.approx(0.0, abs=1e-9)


class _Fixed(torch.nn.Module):
    """A stand-in classifier: features = the flattened image, logits = features @ W."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def features(self, x):
        return x.flatten(1)

    def head(self, features):
        return features @ self.weight


def test_sample_scores_against_a_direct_computation():
    """Histogram of argmax classes, mean max-probability, entropy of the mean
    class distribution, and the Frechet distance of the features, each
    computed here from the probabilities and features directly."""
    torch.manual_seed(0)
    images, reference = torch.rand(300, 1, 2, 2), torch.rand(200, 1, 2, 2)
    weight = 3 * torch.randn(4, 3)
    quality = score_images(_Fixed(weight), images, reference.flatten(1))
    probs = (images.flatten(1) @ weight).softmax(-1).double()
    assert quality.histogram == pytest.approx((torch.bincount(probs.argmax(-1), minlength=3) / 300).tolist())
    assert quality.mean_confidence == pytest.approx(float(probs.max(-1).values.mean()), rel=1e-6)
    p_bar = probs.mean(0)
    assert quality.mean_class_entropy == pytest.approx(float(-(p_bar * p_bar.log()).sum()), rel=1e-6)
    f, g = images.flatten(1).double().numpy(), reference.flatten(1).double().numpy()
    assert quality.frechet_distance == pytest.approx(
        frechet_distance(f.mean(0), np.cov(f.T), g.mean(0), np.cov(g.T)), rel=1e-6)
    assert quality.summary()["max_class_entropy"] == pytest.approx(math.log(3))


def test_classifier_train_then_sample_quality_of_a_run(tmp_path, capsys, monkeypatch):
    """`classifier train` stores the classifier; `evaluate --sample-quality`
    scores a run's samples with it (a run with eval.iw_samples = 0 needs
    nothing else); without a classifier, or with a corrupt one, the message
    says how to train it."""
    path = tmp_path / "cache" / "classifier.pt"
    monkeypatch.setattr(classifier_module, "classifier_path", lambda: path)
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps({**TINY, "eval": {"iw_samples": 0}}))
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--sample-quality", "--samples", "300", "--quiet"]) == 2
    assert "no digit classifier at" in capsys.readouterr().err and not path.exists()
    assert main(["evaluate", str(run), "--quiet"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err

    assert main(["classifier", "train", "--epochs", "1", "--limit", "3000", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out.rsplit("}", 1)[0] + "}")
    assert path.is_file() and info["test_accuracy"] > 0.8 and info["train_images"] == 3000
    assert main(["evaluate", str(run), "--sample-quality", "--samples", "300", "--quiet"]) == 0
    summary = json.loads((run / "sample_quality.json").read_text())
    assert summary["num_samples"] == 300 and sum(summary["class_histogram"]) == pytest.approx(1.0, abs=1e-3)
    assert 0.1 <= summary["mean_confidence"] <= 1 and summary["frechet_distance"] > 0
    assert (run / "sample_quality.png").is_file()
    assert json.loads((run / "report.json").read_text())["sample_quality"] == summary

    path.write_bytes(b"\x00corrupt")
    assert main(["evaluate", str(run), "--sample-quality", "--quiet"]) == 2
    assert "is not a digit classifier this version can read" in capsys.readouterr().err
