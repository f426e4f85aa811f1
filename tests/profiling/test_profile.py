"""heron.profiling.profile: FLOPs against hand counts, memory and time fields, interleaved timing rounds, the
caller's model untouched, and the `heron profile` command's JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import heron
from heron.cli.main import main
from heron.profiling.profile import profile_steps
from heron.zo.updaters import FOUpdater, ZOUpdater


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


BATCH = (torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0]))
# Multiply-adds of one forward, counted as 2 FLOPs each (torch.utils.flop_counter's convention).
FORWARD_FLOPS = 2 * 5 * (8 * 16 + 16 * 4)


def test_flops_match_hand_counts():
    loss = nn.functional.cross_entropy
    profiles = profile_steps({"zo": ZOUpdater(mlp(), loss, lr=0.1, seed=0),
                              "fo": FOUpdater(mlp(), loss, lr=0.1)}, BATCH, warmup=0, repeats=1)
    assert profiles["zo"].flops == 2 * FORWARD_FLOPS  # the base and the perturbed stream
    # backprop: both weight gradients and the second layer's input gradient (not the batch's)
    assert profiles["fo"].flops == FORWARD_FLOPS + 2 * 5 * (8 * 16 + 2 * 16 * 4)


def test_fields_and_caller_model_untouched():
    model = mlp()
    before = {n: p.clone() for n, p in model.named_parameters()}
    profile = heron.profile_step(ZOUpdater(model, nn.functional.cross_entropy, lr=0.1, seed=0), BATCH, warmup=1,
                                 repeats=2)
    assert profile.time_s > 0
    assert profile.step_peak_bytes > 0
    params_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert profile.resident_bytes >= params_bytes
    assert profile.peak_memory_bytes == profile.resident_bytes + profile.step_peak_bytes
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class _LoggingUpdater:
    """Records the order of its steps in a log shared by every copy (profile_steps deep-copies)."""

    log: list[str] = []

    def __init__(self, name: str):
        self.name = name
        self.model = nn.Linear(1, 1)

    def step(self, batch):
        _LoggingUpdater.log.append(self.name)

    def state_dict(self):
        return {}


def test_timed_steps_are_interleaved():
    _LoggingUpdater.log = []
    updaters = {name: _LoggingUpdater(name) for name in "abc"}
    profiles = profile_steps(updaters, None, warmup=1, repeats=4)
    assert list(profiles) == ["a", "b", "c"]
    # warm-up per updater, then 4 rounds of one step each, every round starting one updater later
    # (no updater always runs after the same neighbour); then each one's FLOP and memory steps
    assert _LoggingUpdater.log[:15] == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        profile_steps({"a": _LoggingUpdater("a")}, None, repeats=0)


def test_profile_command_writes_json(tmp_path, capsys):
    path = tmp_path / "profile.json"
    assert main(["profile", "--model", "resnet18-paper", "--batch", "2", "--updaters", "zo,fo", "--warmup", "0",
                 "--repeats", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert set(report) == {"updaters", "config", "environment"}
    assert list(report["updaters"]) == ["zo", "fo"]
    for row in report["updaters"].values():
        assert row["peak_memory_bytes"] > 0 and row["flops"] > 0 and row["time_s"] > 0
    assert report["updaters"]["zo"]["flops"] < report["updaters"]["fo"]["flops"]
    assert "zo/fo: memory" in capsys.readouterr().out


def test_time_is_read_from_the_given_clock():
    """clock=: each timed step is the clock's difference around it (a counter here: exactly 1 per step)."""
    ticks = iter(range(10**6))
    profiles = profile_steps({"zo": ZOUpdater(mlp(), nn.functional.cross_entropy, lr=0.1, seed=0)}, BATCH,
                             warmup=0, repeats=3, clock=lambda: float(next(ticks)))
    assert profiles["zo"].time_s == 1.0


def test_environment_names_the_allocator_and_threads():
    """Allocator claims need the allocator: jemalloc (or tcmalloc) when mapped into the process, else glibc."""
    from heron.profiling.environment import allocator_of, environment

    jemalloc = "7f00-7f10 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    glibc = "7f00-7f10 r-xp 00000000 08:01 43 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    assert allocator_of(glibc + jemalloc) == "jemalloc"
    assert allocator_of(glibc + jemalloc.replace("libjemalloc", "libtcmalloc_minimal")) == "tcmalloc"
    assert allocator_of(glibc) == "glibc"
    env = environment()
    assert env["threads"] == torch.get_num_threads()
    assert env["allocator"] in ("glibc", "jemalloc", "tcmalloc")
    assert "malloc_conf" in env


def test_profile_command_threads_option(tmp_path):
    path = tmp_path / "profile.json"
    threads = torch.get_num_threads()
    assert main(["profile", "--model", "resnet18-paper", "--batch", "2", "--updaters", "zo", "--warmup", "0",
                 "--repeats", "1", "--threads", "1", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["environment"]["threads"] == 1
    assert torch.get_num_threads() == threads  # restored for the caller


def test_full_parameter_transformer_preset():
    """gpt2m-full: GPT-2 blocks trained whole (no LoRA), the LM head folded into the loss for the
    forward-only updaters; every updater steps it (a tiny config here; the preset's default is
    GPT-2 Medium's shapes)."""
    from heron.kernels.nn import LoRALinear
    from heron.models import GPT2Config
    from heron.profiling.presets import build_config, build_updater

    tiny = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2)
    config = build_config("gpt2m-full", batch_size=2, seq_len=8, config=tiny)
    model = config.model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = {n for n in dict(model.named_parameters()) if not any(k in n for k in (".wte.", ".wpe.", ".unembed."))}
    assert trainable == blocks and any("mlp_fc.weight" in n for n in trainable)
    for kind in ("zo", "zo-inplace", "mezo", "fo"):
        updater = build_updater(kind, config)
        assert kind != "zo-inplace" or (updater.executor, updater.schedule) == ("in_place", "sequential")
        before = {n: p.clone() for n, p in updater.model.named_parameters()}
        result = updater.step(config.batch)
        assert not result.skipped and math.isfinite(result.loss)
        moved = {n for n, p in updater.model.named_parameters() if not torch.equal(p, before[n])}
        assert moved == blocks, kind
