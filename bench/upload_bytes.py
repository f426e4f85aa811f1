"""Upload bytes of one HERON-SFL round, client_upload="parameters" vs "seeds".

Runs round 1 of the main job's configuration (heron.cli.main.MAIN_JOB: 5 clients, 10 local steps,
smashed data every 2 steps, batch 64, MNIST) for each model and both upload modes, and splits the
round's bytes_up into the smashed-data part (counted at the main server) and the client-model
part (the rest: the state, or the seed-and-scalar upload).

    PYTHONPATH=python python bench/upload_bytes.py --models cnn,resnet18 --json bench/results/upload_bytes.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

from heron.cli.main import MAIN_JOB
from heron.sfl.config import TrainConfig
from heron.sfl.data import load_dataset, split_clients
from heron.sfl.engine import Experiment


def one_round(config: TrainConfig, dataset, client_data) -> dict[str, int]:
    experiment = Experiment(config, dataset=dataset, client_data=client_data)
    smashed = 0
    train_on = experiment.server.train_on

    def counting(upload):
        nonlocal smashed
        smashed += upload.nbytes
        return train_on(upload)

    experiment.server.train_on = counting
    record = experiment.run_round(0)
    return {"bytes_up": record.bytes_up, "smashed_bytes": smashed, "client_model_bytes": record.bytes_up - smashed,
            "bytes_down": record.bytes_down, "skipped_steps": record.skipped_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,resnet18")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    keys = ("model", "dataset", "clients", "upload_every")
    base = TrainConfig(method="heron", rounds=1, **{k: MAIN_JOB[k] for k in keys})
    dataset = load_dataset(base.dataset, seed=base.seed)
    client_data = split_clients(dataset, base.clients, base.partition, base.alpha, base.seed)
    results = []
    print(f"{'model':<9} {'upload':<11} {'client-model B':>15} {'smashed B':>12} {'total up B':>12}")
    for model in args.models.split(","):
        for mode in ("parameters", "seeds"):
            config = replace(base, model=model, client_upload=mode)
            row = {"model": model, "client_upload": mode, **one_round(config, dataset, client_data)}
            results.append(row)
            print(f"{model:<9} {mode:<11} {row['client_model_bytes']:>15,} {row['smashed_bytes']:>12,} "
                  f"{row['bytes_up']:>12,}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            config = {k: v for k, v in asdict(base).items() if k not in ("model", "client_upload")}
            json.dump({"config": config | {"models": args.models.split(",")}, "round": 1,
                       "results": results}, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
