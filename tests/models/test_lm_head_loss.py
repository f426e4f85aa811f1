"""linear_cross_entropy (chunked logits) against torch's cross_entropy of the whole logits, and
the GPT-2 head split (HeadHidden + LMHeadLoss) against the plain head + lm_loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from heron.kernels import functional as HF
from heron.models.gpt2 import GPT2Config, HeadHidden, LMHeadLoss, gpt2_split, lm_loss
from heron.zo.updaters import ZOUpdater


@pytest.mark.parametrize("rows", [1, 3, 17, 97])
@pytest.mark.parametrize("chunk_rows", [1, 5, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_whole_logits(rows, chunk_rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 16, generator=generator)
    weight = torch.randn(33, 16, generator=generator)
    bias = torch.randn(33, generator=generator) if with_bias else None
    targets = torch.randint(0, 33, (rows,), generator=generator)
    expected = nn.functional.cross_entropy(nn.functional.linear(hidden, weight, bias), targets)
    got = HF.linear_cross_entropy(hidden, weight, targets, bias, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)


def test_linear_cross_entropy_batch_dims_ignore_index_and_bf16():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 8, generator=generator)
    weight = torch.randn(11, 8, generator=generator)
    targets = torch.randint(0, 11, (2, 7), generator=generator)
    targets[0, :3] = -100
    expected = nn.functional.cross_entropy((hidden @ weight.T).reshape(-1, 11), targets.reshape(-1))
    torch.testing.assert_close(HF.linear_cross_entropy(hidden, weight, targets, chunk_rows=4), expected)
    low = HF.linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, chunk_rows=4)
    reference = nn.functional.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float().reshape(-1, 11),
                                            targets.reshape(-1))
    torch.testing.assert_close(low, reference, rtol=1e-3, atol=1e-3)


def test_linear_cross_entropy_rejects_bad_input():
    hidden, weight = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="weight"):
        HF.linear_cross_entropy(hidden, torch.randn(5, 7), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="targets"):
        HF.linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="targets"):
        HF.linear_cross_entropy(hidden, weight, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk_rows"):
        HF.linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.int64), chunk_rows=0)
    with pytest.raises(ValueError, match="bias"):
        HF.linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.int64), torch.zeros(4))


def _tiny_client():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=4, n_head=4)
    split = gpt2_split(config, cut=2, aux_blocks=1, rank=4, n_layer=4)
    model = split.client_with_aux()
    for m in model.modules():  # non-zero adapters so the LoRA path matters
        if hasattr(m, "lora_b"):
            nn.init.normal_(m.lora_b, std=0.02)
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    return model, tokens


def test_head_hidden_and_lm_head_loss_equal_the_plain_head():
    model, tokens = _tiny_client()
    hidden_model = nn.Sequential(model[0], HeadHidden(model[1]))
    with torch.no_grad():
        expected = lm_loss(model(tokens), tokens)
        got = LMHeadLoss(model[1].unembed)(hidden_model(tokens), tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in hidden_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
def test_zo_step_through_lm_head_loss_matches_plain_head(schedule):
    """Same directions, same losses up to rounding, so the same update."""
    model, tokens = _tiny_client()
    plain = copy.deepcopy(model)
    hidden_model = nn.Sequential(model[0], HeadHidden(model[1]))
    kwargs = {"mu": 1e-3, "lr": 1e-2, "seed": 7, "optimizer": "adam", "schedule": schedule}
    folded = ZOUpdater(hidden_model, LMHeadLoss(model[1].unembed), **kwargs).step((tokens, tokens))
    reference = ZOUpdater(plain, lm_loss, **kwargs).step((tokens, tokens))
    assert folded.seeds == reference.seeds
    assert abs(folded.loss - reference.loss) < 1e-5
    g, g_ref = folded.projected_grads[0], reference.projected_grads[0]
    assert abs(g - g_ref) < 5e-2 * (1 + abs(g_ref)), (g, g_ref)
    for (name, got), (_, want) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
