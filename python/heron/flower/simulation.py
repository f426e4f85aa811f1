"""Run the heron Flower app as a simulation on one machine (Flower's Ray-backed simulation engine)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Collection

from heron.flower.client_app import make_client_app
from heron.flower.config import FlowerSettings, check_flower_dataset, check_flower_method
from heron.flower.report import FlowerRun
from heron.flower.server_app import make_server_app
from heron.profiling.memory import peak_memory
from heron.sfl.config import TrainConfig
from heron.sfl.records import RoundRecord


def backend_config(*, ray_cpus: int | None = None, client_cpus: float = 1.0, client_gpus: float = 0.0,
                   verbose: bool = False) -> dict:
    """Ray settings: a cluster of `ray_cpus` CPUs (default: all, at most 2) and `client_cpus` per ClientApp
    (so ray_cpus // client_cpus clients run at once), no dashboard, Ray's own logging quiet."""
    cpus = ray_cpus if ray_cpus is not None else min(2, os.cpu_count() or 1)
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
            "init_args": {"num_cpus": cpus, "include_dashboard": False,
                          "logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}}


def simulate(config: TrainConfig, settings: FlowerSettings | None = None, *, ray_cpus: int | None = None,
             client_cpus: float = 1.0, client_gpus: float = 0.0, fail_clients: Collection[int] = (),
             progress: Callable[[str], None] | None = None, on_round: Callable[[RoundRecord], None] | None = None,
             verbose: bool = False) -> FlowerRun:
    """Run `config` with `config.clients` simulated SuperNodes; returns the FlowerRun.

    fail_clients: client ids whose ClientApp raises on every round (tests of failure handling only).
    verbose: keep Flower's INFO log and Ray's worker output; otherwise Flower shows errors only (heron's own
    warnings, e.g. a client left out of a round, still show).
    """
    from flwr.simulation import run_simulation

    config = config.validate()
    check_flower_method(config.method)
    check_flower_dataset(config.dataset)
    finished: list[FlowerRun] = []
    server_app = make_server_app(config, settings, on_finish=finished.append, progress=progress, on_round=on_round)
    client_app = make_client_app(fail_clients=fail_clients)
    # The ServerApp runs in a worker thread here and profiles a client step for the report; torch's
    # profiler (kineto) prints an error unless it was first started on the main thread.
    peak_memory(lambda: None, "cpu")
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            run_simulation(server_app, client_app, num_supernodes=config.clients,
                           backend_config=backend_config(ray_cpus=ray_cpus, client_cpus=client_cpus,
                                                         client_gpus=client_gpus, verbose=verbose),
                           verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
    if not finished:
        raise RuntimeError("the Flower simulation ended without a result from the ServerApp (see the log above)")
    return finished[0]
