"""One client step, same model and batch, updaters side by side in one run: the fused ZO step
(dual and sequential schedules) against the MeZO-style in-place ZO step and the first-order
step (backprop + Adam, CSE-FSL's client), timed steps interleaved. Rows hold peak memory, FLOPs and median time of each,
and the ZO/FO and ZO/MeZO ratios (issue 4's targets: memory <= 0.30x FO, FLOPs <= 0.67x FO,
time <= 0.7x FO on CPU and >= 1.5x faster than MeZO).

The GPT-2 Medium client takes ~15 s per step on a 2-core CPU; select it with
`-k gpt2m` or leave it out with `-k resnet18`.
"""

from __future__ import annotations

import pytest
import torch

from heron.profiling.presets import build_config, build_updater
from heron.profiling.profile import profile_steps

pytestmark = pytest.mark.bench

UPDATERS = ("zo", "zo-seq", "fo", "mezo")
# the low-rank variants change nothing on the GPT-2 client (LoRA adapters only, no trainable Linear weights)
EXTRA_UPDATERS = {"resnet18-paper": ("zo-lowrank", "zo-seq-lowrank"), "gpt2m-paper": ()}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("model", ["resnet18-paper", "gpt2m-paper"])
def test_client_step_updaters(record, model):
    device = _device()
    config = build_config(model, device=device)
    repeats = 3 if model == "resnet18-paper" or device == "cuda" else 1
    kinds = UPDATERS + EXTRA_UPDATERS[model]
    results = profile_steps({kind: build_updater(kind, config) for kind in kinds}, config.batch, warmup=1,
                            repeats=repeats)
    fo, mezo = results["fo"], results["mezo"]
    for kind, r in results.items():
        record("client_step", model=model, device=device, updater=kind, peak_memory_bytes=r.peak_memory_bytes,
               flops=r.flops, time_s=r.time_s,
               memory_vs_fo=r.peak_memory_bytes / fo.peak_memory_bytes, flops_vs_fo=r.flops / fo.flops,
               time_vs_fo=r.time_s / fo.time_s, speedup_vs_mezo=mezo.time_s / r.time_s)
    for kind in [k for k in kinds if k.startswith("zo")]:
        assert results[kind].flops > 0 and results[kind].peak_memory_bytes > 0
