"""ZO vs MeZO-style vs first-order client steps on third-party models, side by side.

The models of tests/zo/test_any_model.py at benchmark size (tests/zo/third_party.py): timm's layer
patterns written out, Hugging Face GPT-2 / BERT / Llama from configs (bare and with PEFT LoRA r=8)
and the pretrained MiniLM. For each model one `heron.profile_steps` run interleaves the timed steps
of every updater (Adam, lr 1e-4): `zo` (ZOUpdater, dual schedule), `zo-seq` (sequential schedule),
`zo-inplace` (sequential, executor="in_place"),
`mezo` (MeZOUpdater), `fo` (FOUpdater, backprop). Prints a table (time and peak memory per step,
ratios to MeZO-style) and writes the JSON.

Time is the process's CPU time per step with one thread by default (`--clock cpu --threads 1`):
on a shared machine other processes' load does not inflate it, and one thread has no OpenMP
waiting in it. `--clock wall --threads N` measures wall time instead.

    .venv/bin/python bench/profile_any_model.py --json bench/results/profile_any_model_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.zo.third_party

import heron  # noqa: E402
from heron.profiling.environment import environment  # noqa: E402
from tests.zo import third_party as tp  # noqa: E402

UPDATERS = {"zo": {"schedule": "dual"}, "zo-seq": {"schedule": "sequential"},
            "zo-inplace": {"schedule": "sequential", "executor": "in_place"}, "mezo": {}, "fo": {}}
CLASSES = {"zo": heron.ZOUpdater, "zo-seq": heron.ZOUpdater, "zo-inplace": heron.ZOUpdater, "mezo": heron.MeZOUpdater,
           "fo": heron.FOUpdater}


# What each workload is, for the tables (bench/tables.py).
DESCRIPTIONS = {
    "timm-vit-root-tokens": "ViT, root cls_token/pos_embed (dim 192, 4 blocks; 32 images 32x32)",
    "timm-layer-scale": "ConvNeXt layer-scale blocks (dim 96, 3 blocks; 32 images)",
    "timm-batchnorm-act": "convs + BatchNormAct2d (width 64; 64 images)",
    "timm-linear-subclass": "MLP with an nn.Linear subclass (512-1024-1024; batch 256)",
    "timm-multihead-attention": "nn.MultiheadAttention (dim 256; 32 x 64 tokens)",
    "timm-tied-head": "tied embedding / output head (vocab 4000, dim 256; 16 x 64 tokens)",
    "timm-root-parameter": "MLP + root-level scale (512-1024; batch 256)",
    "hf-gpt2": "Hugging Face GPT-2 (4 layers x 256; 8 x 128 tokens)",
    "hf-gpt2-lora": "the same, PEFT LoRA r=8",
    "hf-bert": "Hugging Face BERT classifier (4 x 256; 8 x 128)",
    "hf-bert-lora": "the same, PEFT LoRA r=8",
    "hf-llama": "Hugging Face Llama (4 x 256; 8 x 128)",
    "hf-llama-lora": "the same, PEFT LoRA r=8",
    "minilm": "pretrained MiniLM-L6 classifier (16 x 64 tokens)",
    "minilm-lora": "the same, PEFT LoRA r=8",
    "minilm-b2x32": "pretrained MiniLM-L6 classifier (2 x 32 tokens)",
}


def workloads() -> dict[str, callable]:
    table = {f"timm-{name}": (lambda name=name: tp.pattern(name, "bench")) for name in tp.PATTERNS}
    for name in tp.HF_MODELS:
        table[f"hf-{name}"] = lambda name=name: tp.hugging_face(name, False, "bench")
        table[f"hf-{name}-lora"] = lambda name=name: tp.hugging_face(name, True, "bench")
    table["minilm"] = lambda: tp.minilm(False, "bench")
    table["minilm-lora"] = lambda: tp.minilm(True, "bench")
    table["minilm-b2x32"] = lambda: tp.minilm(False, "bench-small-batch")  # 64 rows: the fused kernels run
    return table


def profile(name: str, make, warmup: int, repeats: int, clock) -> dict[str, dict]:
    work = make()
    updaters = {kind: CLASSES[kind](work.model, work.loss_fn, optimizer="adam", lr=1e-4, seed=0, **kwargs)
                for kind, kwargs in UPDATERS.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profiles = heron.profile_steps(updaters, work.batch, warmup=warmup, repeats=repeats, clock=clock)
    trainable = sum(p.numel() for p in work.model.parameters() if p.requires_grad)
    return {"description": DESCRIPTIONS[name], "trainable_parameters": trainable, "executor": updaters["zo"].executor,
            "updaters": {kind: p.as_dict() for kind, p in profiles.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(workloads()), help="comma-separated subset")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="time per step: the process's CPU time (default) or wall time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    table = workloads()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown models {unknown}; valid: {list(table)}")
    results = {}
    columns = "  ".join(f"{k + ' s':>9} {k + ' MB':>9}" for k in UPDATERS)
    print(f"{'model':<26} {'trainable':>10} {'executor':>8}  {columns}  mezo/zo  mezo/zo-seq  mezo/zo-inplace")
    for name in names:
        result = profile(name, table[name], args.warmup, args.repeats, clock)
        results[name] = result
        u = result["updaters"]
        cells = "  ".join(f"{u[k]['time_s']:9.3f} {u[k]['peak_memory_bytes'] / 1e6:9.1f}" for k in UPDATERS)
        print(f"{name:<26} {result['trainable_parameters']:>10} {result['executor']:>8}  {cells}  "
              f"{u['mezo']['time_s'] / u['zo']['time_s']:7.2f}  {u['mezo']['time_s'] / u['zo-seq']['time_s']:11.2f}  "
              f"{u['mezo']['time_s'] / u['zo-inplace']['time_s']:15.2f}",
              flush=True)
    if args.json:
        report = {"models": results, "environment": environment(), "threads": torch.get_num_threads(),
                  "clock": args.clock, "warmup": args.warmup, "repeats": args.repeats, "optimizer": "adam",
                  "lr": 1e-4}
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
