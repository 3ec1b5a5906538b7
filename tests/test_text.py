"""Text as a data modality: the vocabulary and batches, the sentence VAE's
masked likelihood, its encoder, and the evaluator on sentences."""
import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch

from conftest import requires_cuda
from pyro_vae import registry
from pyro_vae.config import config_from_dict
from pyro_vae.data.text import BOS, EOS, PAD, UNK, TextDataset, Vocabulary
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.evaluate import evaluate
from pyro_vae.experiment import Experiment
from pyro_vae.traces import OBSERVED_SITE

SENTENCES = {
    "train": [s.split() for s in ["the cat sat", "the dog sat down", "a cat ran", "the cat ran home fast",
                                  "a dog", "dogs and cats sat together on the mat"]],
    "valid": [s.split() for s in ["the cat", "a zebra sat"]],
    "test": [s.split() for s in ["the dog ran", "a cat sat down on the mat", "zebra"]],
}


def small_dataset(**options):
    return TextDataset(SENTENCES, torch.device("cpu"), max_length=10, **options)


def test_vocabulary_is_built_on_train_and_maps_unknown_words_to_unk(tmp_path):
    data = small_dataset(vocab_size=4)
    vocab = data.vocabulary
    assert vocab.words == ["<pad>", "<unk>", "<bos>", "<eos>", "the", "cat", "sat", "a"]  # most frequent 4
    assert vocab.encode("the zebra sat".split()) == [4, UNK, 6, EOS]
    assert vocab.decode([4, 5, EOS, 6]) == "the cat"
    assert Vocabulary.build(SENTENCES["train"], min_count=2).words[4:] == ["the", "cat", "sat", "a", "dog", "ran"]
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").words == vocab.words
    (tmp_path / "bad.json").write_text('["a", "b"]')
    with pytest.raises(DataError, match="is not a vocabulary"):
        Vocabulary.load(tmp_path / "bad.json")


def test_batches_are_cut_to_their_longest_sentence_and_grouped_by_length():
    data = small_dataset()
    test = data["test"]
    assert test.lengths.tolist() == [4, 8, 2]  # words + <eos>
    assert test.batch(slice(0, 1)).shape == (1, 4) and test.batch(slice(0, 3)).shape == (3, 8)
    assert test.batch(slice(2, 3)).tolist() == [[UNK, EOS]]
    order = data["train"].permutation(torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(6))
    assert data["train"].lengths[order].tolist() == sorted(data["train"].lengths.tolist())  # one pool: sorted
    long = TextDataset({"train": [["w"] * 12, ["w"]], "valid": [["w"]], "test": [["w"]]}, torch.device("cpu"), 10)
    assert len(long["train"]) == 1 and long.dropped["train"] == 1
    edge = TextDataset({"train": [["w"] * 10, ["w"] * 11], "valid": [["w"]], "test": [["w"]]}, torch.device("cpu"), 10)
    assert edge["train"].lengths.tolist() == [11] and edge.dropped["train"] == 1  # max_length words kept, not more
    cut = TextDataset({"train": [["w"] * 12], "valid": [["w"]], "test": [["w"]]}, torch.device("cpu"), 10, truncate=True)
    assert cut["train"].lengths.tolist() == [11]


def build(condition="init", word_dropout=0.0, latent_dim=3):
    data = small_dataset()
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=latent_dim)
    model = registry.MODELS.build("sentence", {"latent_dim": latent_dim, "embedding": 8, "hidden": 16,
                                               "condition": condition, "word_dropout": word_dropout},
                                  prior=prior, **data.spec)
    guide = registry.GUIDES.build("lstm", {"embedding": 8, "hidden": 16, "bidirectional": True},
                                  latent_dim=latent_dim, **data.spec)
    return data, model.eval(), guide.eval()


@pytest.mark.parametrize("condition", ["init", "input", "both"])
def test_padding_never_changes_a_sentence_score_or_its_code(condition):
    """A sentence scored alone ([1, T]) and inside a padded batch ([3, T_max])
    at the same z gets the same log p(x | z); the encoder gives it the same
    q(z | x) (packed sequences: the backward direction starts at its own end)."""
    data, model, guide = build(condition)
    batch = data["test"].batch(slice(0, 3))  # lengths 4, 8, 2: the first and last are padded
    z = torch.randn(3, 3)
    conditioned = poutine.condition(model, data={"z": z})
    in_batch = poutine.trace(conditioned).get_trace(batch).nodes[OBSERVED_SITE]
    q_batch = guide.distribution(batch)
    for i in (0, 2):
        alone = data["test"].batch(slice(i, i + 1))
        trace = poutine.trace(poutine.condition(model, data={"z": z[i:i + 1]})).get_trace(alone)
        assert torch.allclose(trace.nodes[OBSERVED_SITE]["fn"].log_prob(alone), in_batch["fn"].log_prob(batch)[i:i + 1],
                              atol=1e-5)
        q_alone = guide.distribution(alone)
        assert torch.allclose(q_alone.mean, q_batch.mean[i:i + 1], atol=1e-6)
        assert torch.allclose(q_alone.stddev, q_batch.stddev[i:i + 1], atol=1e-6)
    # the masked log-likelihood is the sum of the word log-probabilities, <eos> included, padding excluded
    logits = model.logits(z, batch)
    words = torch.distributions.Categorical(logits=logits).log_prob(batch)
    expected = (words * (batch != PAD)).sum(-1)
    assert torch.allclose(in_batch["fn"].log_prob(batch), expected, atol=1e-5)


def test_a_decoder_that_ignores_z_has_is_likelihood_equal_to_its_language_model_for_every_k():
    """condition = "none" and q(z|x) = p(z) (a collapsed guide: zero encoder
    head, scale 1): every log weight is log p_LM(x), so L_K = log p_LM(x) for
    every K, computed here from the LSTM by teacher forcing."""
    data, model, guide = build("none")
    assert model.ignores_latent and not build("init")[1].ignores_latent  # (no posterior-collapse warning for it)
    with torch.no_grad():
        guide.head.weight.zero_()
        guide.head.bias.copy_(torch.cat([torch.zeros(3), torch.full((3,), math.log(math.expm1(1 - 1e-4)))]))
    x = data["test"].batch(slice(0, 3))
    with torch.no_grad():
        lm = (torch.distributions.Categorical(logits=model.logits(torch.zeros(3, 3), x)).log_prob(x) * (x != PAD)).sum(-1)
    for k in (1, 7, 50):
        result = evaluate(model, guide, [x], k, chunk_size=4, progress=False)
        assert np.allclose(result.log_likelihood, lm.double().numpy(), atol=1e-4), k
        assert np.allclose(result.elbo, lm.double().numpy(), atol=1e-4)


def test_word_dropout_acts_in_training_mode_only():
    data, model, _ = build(word_dropout=0.5)
    x, z = data["train"].batch(slice(0, 6)), torch.randn(6, 3)
    assert torch.equal(model.logits(z, x), model.logits(z, x))  # eval mode: deterministic
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model.logits(z, x), model.eval().logits(z, x))


def test_word_dropout_never_drops_bos():
    """Word dropout replaces decoder inputs by <unk>, but never the first,
    <bos>: the first word's logits are those of evaluation mode, however
    high the rate."""
    data, model, _ = build(word_dropout=0.95)
    x, z = data["train"].batch(slice(0, 6)), torch.randn(6, 3)
    with torch.no_grad():
        reference = model.logits(z, x)[:, 0]
        model.train()
        for seed in range(5):
            torch.manual_seed(seed)
            assert torch.allclose(model.logits(z, x)[:, 0], reference, atol=1e-6)


def test_the_decoder_reads_bos_and_the_words_before_each_position_only():
    """Teacher forcing: the logits at t come from the inputs [<bos>, x_1 ..
    x_{t-1}], so changing the words from t on leaves positions up to t alone,
    and the logits are the one-step decoder's on the shifted sentence."""
    data, model, _ = build()
    x, z = data["train"].batch(slice(0, 6)), torch.randn(6, 3)
    with torch.no_grad():
        logits = model.logits(z, x)
        for t in range(x.shape[1]):
            changed = x.clone()
            changed[:, t:] = 4 + (changed[:, t:] + 1) % (len(data.vocabulary) - 4)  # other real words from t on
            assert torch.allclose(model.logits(z, changed)[:, :t + 1], logits[:, :t + 1], atol=1e-6), t
        inputs = torch.cat([torch.full((6, 1), BOS), x[:, :-1]], 1)
        assert torch.allclose(logits, model.step_logits(z, inputs)[0], atol=1e-6)


def test_next_words_are_never_pad_or_bos_and_the_lstm_starts_from_tanh_az():
    """Decoding rules out <pad> and <bos> (log-probability -inf) and leaves
    every other word's logit as it is; with ``condition = "init"`` the LSTM
    starts at h_0 = tanh(A z), c_0 = 0."""
    _, model, _ = build()
    logits = torch.randn(3, 2, 11)
    out = model.next_word_logits(logits)
    assert torch.isneginf(out[:, [PAD, BOS]]).all()
    others = [i for i in range(11) if i not in (PAD, BOS)]
    assert torch.equal(out[:, others], logits[:, -1, others])
    z = torch.randn(4, 3)
    h, c = model.initial_state(z)
    assert torch.allclose(h[0], torch.tanh(model.init(z))) and torch.equal(c, torch.zeros_like(h))


def test_the_lstm_guide_reads_each_whole_sentence_with_its_eos_and_no_padding():
    """q(z | x)'s mean and scale come from the bidirectional LSTM's final
    states over each sentence's own tokens, <eos> included, as if it were
    alone in its batch."""
    from torch.nn.functional import softplus

    data, _, guide = build()
    x = data["test"].batch(slice(0, 3))
    q = guide.distribution(x)
    with torch.no_grad():
        for i, length in enumerate(data["test"].lengths.tolist()):
            _, (h, _) = guide.lstm(guide.embed(x[i:i + 1, :length]))
            loc, raw = guide.head(h.transpose(0, 1).reshape(1, -1)).chunk(2, -1)
            assert torch.allclose(q.mean[i], loc[0], atol=1e-6)
            assert torch.allclose(q.stddev[i], softplus(raw[0]) + 1e-4, atol=1e-6)


def test_interpolation_runs_from_the_first_sentence_to_the_second():
    """``interpolate(a, b)`` decodes the codes (1 - t) mu(a) + t mu(b), t from 0 to 1."""
    from types import SimpleNamespace

    from pyro_vae.sentences import SentenceVAE

    data, model, guide = build()
    vae = SentenceVAE(SimpleNamespace(data=data, model=model, guide=guide, device=torch.device("cpu")))
    vae.decode = lambda z, mode="greedy", **options: z  # the codes themselves
    path = vae.interpolate("the cat sat", "a dog", steps=5)
    a, b = vae.encode(["the cat sat"])[0], vae.encode(["a dog"])[0]
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    assert torch.allclose(path[1], 0.75 * a + 0.25 * b, atol=1e-6)


def test_perplexity_counts_eos_and_not_padding():
    data = small_dataset()
    log_likelihood = np.array([-4.0, -10.0, -2.0])
    metrics = data.unit_metrics(log_likelihood, data["test"])
    assert metrics["words"] == 4 + 8 + 2 and metrics["perplexity"] == pytest.approx(math.exp(16.0 / 14))


def test_a_part_of_another_modality_is_refused_naming_what_it_needs(tiny_raw):
    tiny_raw["model"] = {"name": "sentence", "latent_dim": 4}
    with pytest.raises(ConfigError, match=r"model 'sentence' needs vocab_size, pad_id from the data, which this "
                                          r"dataset does not give \(its data spec: event_shape\)"):
        Experiment.build(config_from_dict(tiny_raw))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_the_ptb_config_trains_a_step_and_evaluates(device, tmp_path):
    """configs/ptb_sentence.toml on 300 PTB sentences, small widths: one
    epoch, an evaluation with perplexity, and sentences.txt."""
    from pyro_vae.config import load_config
    from pyro_vae.train import train_and_evaluate

    config = load_config("configs/ptb_sentence.toml", [
        "data.limit=300", "model.hidden=32", "model.embedding=16", "guide.hidden=32", "guide.embedding=16",
        "train.epochs=1", "eval.iw_samples=10", "eval.limit=20", f"train.device={device}"])
    report = train_and_evaluate(config, tmp_path / "run", progress=False)
    assert report["device"].startswith(device)
    ev = report["eval"]
    assert ev["perplexity"] == pytest.approx(math.exp(ev["iw_nll"] * ev["num_datapoints"] / ev["words"]), rel=1e-6)
    assert math.isfinite(ev["perplexity"]) and ev["perplexity"] > 1
    text = (tmp_path / "run" / "sentences.txt").read_text()
    assert "# greedy decodings of z ~ p(z)" in text and "# reconstructions" in text
    assert (tmp_path / "run" / "vocabulary.json").is_file()


def test_beam_search_finds_the_most_probable_sentence_and_greedy_is_a_beam_of_one():
    """On a 6-word vocabulary with sentences of at most 5 words, a beam as
    wide as every sequence is exhaustive: its sentence has the highest
    log p(x | z) of all 364 sentences of words, <unk> and <eos> (never <pad>
    or <bos>), enumerated here, and is well formed: no <pad> or <bos> before
    its <eos>, only <pad> after it (five steps, so a finished hypothesis is
    carried through reorderings of the beam); beam_size = 1 is greedy decoding."""
    import itertools

    vocab = Vocabulary(["a", "b"])
    data = TextDataset({"train": [["a"]], "valid": [["a"]], "test": [["b"]]}, torch.device("cpu"), 5,
                       vocabulary=vocab)
    prior = registry.PRIORS.build("standard_normal", {}, latent_dim=2)
    model = registry.MODELS.build("sentence", {"latent_dim": 2, "embedding": 4, "hidden": 8}, prior=prior,
                                  **data.spec).eval()
    torch.manual_seed(4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=1.5)
    z = torch.randn(3, 2)

    @torch.no_grad()
    def score(ids, zi):
        x = torch.tensor([ids])
        logits = model.logits(zi.unsqueeze(0), x)
        return float(torch.distributions.Categorical(logits=logits).log_prob(x).sum())

    words = [UNK, 4, 5]
    candidates = [list(body) + [EOS] for n in range(5) for body in itertools.product(words, repeat=n)]
    candidates += [list(body) for body in itertools.product(words, repeat=5)]  # cut at max_length
    for i in range(3):
        best = max(score(ids, z[i]) for ids in candidates)
        found = model.beam_search(z[i:i + 1], 5, EOS, beam_size=6 ** 5)[0].tolist()
        sentence = found[:found.index(EOS) + 1] if EOS in found else found
        assert PAD not in sentence and BOS not in sentence and set(found[len(sentence):]) <= {PAD}, found
        assert score(sentence, z[i]) >= best - 1e-4
    assert torch.equal(model.beam_search(z, 5, EOS, beam_size=1), model.generate(z, 5, EOS))


def test_sentence_api_and_sample_command_on_a_sentence_file(tmp_path, capsys):
    """A UTF-8 file of sentences trains a tiny run; `pyro-vae sample` decodes
    prior samples, reconstructions and an interpolation with each decoder."""
    import tomli_w

    from pyro_vae.cli import main
    from pyro_vae.rundir import RunDir
    from pyro_vae.sentences import SentenceVAE

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(s) for split in SENTENCES.values() for s in split) * 5, encoding="utf-8")
    config = {"data": {"name": "sentences", "path": str(corpus), "max_length": 12},
              "model": {"name": "sentence", "latent_dim": 3, "embedding": 8, "hidden": 16},
              "prior": {"name": "standard_normal"}, "guide": {"name": "lstm", "embedding": 8, "hidden": 16},
              "objective": {"name": "meanfield_elbo"},
              "train": {"epochs": 1, "batch_size": 8, "device": "cpu"}, "eval": {"iw_samples": 5, "chunk_size": 5}}
    (tmp_path / "c.toml").write_text(tomli_w.dumps(config))
    assert main(["train", str(tmp_path / "c.toml"), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    experiment, _ = RunDir(tmp_path / "run").load_trained()
    vae = SentenceVAE(experiment)
    assert len(vae.sample(4, "sample", temperature=0.5)) == 4 and len(vae.sample(2, "beam", beam_size=3)) == 2
    assert vae.encode(["the cat sat", "a dog"]).shape == (2, 3)
    path = vae.interpolate("the cat sat", "a dog", steps=5)
    assert len(path) == 5 and all(isinstance(s, str) for s in path)
    assert main(["sample", str(tmp_path / "run"), "--interpolate", "the cat sat", "a dog", "--steps", "3"]) == 0
    assert capsys.readouterr().out.count("\n") == 3  # one line each (an untrained decoder may give empty ones)
    assert main(["sample", str(tmp_path / "run"), "--reconstruct", "the cat sat", "--mode", "beam"]) == 0
    assert capsys.readouterr().out.startswith("the cat sat\n> ")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    config["data"]["path"] = str(tmp_path / "bad.txt")
    (tmp_path / "bad.toml").write_text(tomli_w.dumps(config))
    assert main(["train", str(tmp_path / "bad.toml"), "--run-dir", str(tmp_path / "bad")]) == 2
    assert "give data.path a UTF-8 file of one sentence per line" in capsys.readouterr().err
