"""`heron profile`: peak memory, FLOPs and time of one client step, updaters side by side."""

from __future__ import annotations

import argparse
import json

import torch

from heron.cli import UsageError
from heron.profiling.environment import environment


def _checked_kinds(args: argparse.Namespace) -> list[str]:
    """The updater kinds of --updaters, with every other option checked; a UsageError before any model is built."""
    from heron.kernels import backends
    from heron.profiling.presets import UPDATERS

    kinds = [k.strip() for k in args.updaters.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in UPDATERS]
    if unknown or not kinds:
        raise UsageError(f"--updaters: unknown updater {unknown[0]!r}" if unknown else "--updaters names no updater"
                         f"; valid: {', '.join(sorted(UPDATERS))}")
    for name, value, low in (("--batch", args.batch, 1), ("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if device.type not in backends.SUPPORTED_DEVICE_TYPES:
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} needs CUDA, which this torch build or machine does not have")
    if args.backend is not None:
        if args.backend not in backends.BACKENDS:
            raise UsageError(f"--backend must be one of {backends.BACKENDS}, got {args.backend!r}")
        reason = backends.unavailable_reason(args.backend, device.type)
        if reason is not None:
            raise UsageError(f"--backend {args.backend} is not available on {device}: {reason}")
    return kinds


def run_profile(args: argparse.Namespace) -> int:
    """`heron profile`; --threads sets torch's intra-op threads for the run only."""
    kinds = _checked_kinds(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _profile(args, kinds)
    finally:
        torch.set_num_threads(threads)


def _profile(args: argparse.Namespace, kinds: list[str]) -> int:
    from heron.profiling.presets import build_config, build_updater
    from heron.profiling.profile import profile_steps

    overrides = {} if args.backend is None else {"backend": args.backend}
    config_kwargs = {"device": args.device}
    if args.batch is not None:
        config_kwargs["batch_size"] = args.batch
    config = build_config(args.model, **config_kwargs)
    print(f"{config.name}: {config.description} on {args.device}, {torch.get_num_threads()} threads")
    updaters = {kind: build_updater(kind, config, **(overrides if kind.startswith("zo") else {})) for kind in kinds}
    print(f"  profiling {', '.join(kinds)} (timed steps interleaved) ...", flush=True)
    profiles = profile_steps(updaters, config.batch, warmup=args.warmup, repeats=args.repeats)
    results = {kind: profile.as_dict() for kind, profile in profiles.items()}
    del updaters, profiles
    width = max(len("updater"), *(len(kind) for kind in results))
    print(f"{'updater':<{width}} {'peak memory MB':>15} {'GFLOPs/step':>12} {'time s':>8}")
    for kind, r in results.items():
        print(f"{kind:<{width}} {r['peak_memory_bytes'] / 1e6:15.1f} {r['flops'] / 1e9:12.2f} {r['time_s']:8.3f}")
    for zo_kind in [k for k in results if k.startswith("zo")]:
        for kind in [k for k in results if not k.startswith("zo")]:
            zo, other = results[zo_kind], results[kind]
            print(f"{zo_kind}/{kind}: memory {zo['peak_memory_bytes'] / other['peak_memory_bytes']:.3f}, "
                  f"FLOPs {zo['flops'] / max(other['flops'], 1):.3f}, time {zo['time_s'] / other['time_s']:.3f}")
    if args.json:
        report = {"updaters": results, "environment": environment(),
                  "config": {"model": config.name, "description": config.description, "device": args.device,
                             "updater_kwargs": config.updater_kwargs, "warmup": args.warmup,
                             "repeats": args.repeats, "backend": args.backend}}
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return 0
