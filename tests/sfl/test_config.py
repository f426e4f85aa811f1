"""The run configuration and its one identity rule ("is this the same run"), which both a resumed
checkpoint and a Flower node's saved updater state are held to."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("flwr")
from flwr.app import RecordDict  # noqa: E402

from heron.flower.client import load_updater_state, save_updater_state  # noqa: E402
from heron.sfl import checkpoint as ckpt  # noqa: E402
from heron.sfl.config import TrainConfig  # noqa: E402
from heron.sfl.engine import Experiment  # noqa: E402

RUN = TrainConfig(method="heron", model="cnn", dataset="digits", clients=2, rounds=1, local_steps=1, batch_size=16,
                  seed=0)
# (change, same run?): rounds may grow; the ZO schedule changes only how a step executes; everything
# else is another run
CHANGES = [({"rounds": 3}, True), ({"zo_schedule": "sequential"}, True), ({"seed": 1}, False),
           ({"zo_rank": 2}, False), ({"client_upload": "seeds"}, False), ({"zo_lr": 1e-2}, False),
           ({"clients": 3}, False)]


def checkpoint_accepts(tmp_path, before: TrainConfig, after: TrainConfig) -> bool:
    Experiment(before, checkpoint_dir=tmp_path).run()
    try:
        Experiment(replace(after, rounds=max(after.rounds, before.rounds)), checkpoint_dir=tmp_path,
                   resume=True).run()
    except ckpt.CheckpointError:
        return False
    return True


def flower_node_accepts(before: TrainConfig, after: TrainConfig) -> bool:
    state = RecordDict()
    save_updater_state(state, 0, before, {"steps": 1})
    try:
        load_updater_state(state, 0, after)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("change", "same_run"), CHANGES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, dict)
                         else str(c))
def test_checkpoints_and_flower_nodes_accept_the_same_changes(tmp_path, change, same_run):
    after = replace(RUN, **change).validate()
    assert (RUN.identity() == after.identity()) is same_run
    assert checkpoint_accepts(tmp_path, RUN, after) is same_run
    assert flower_node_accepts(RUN, after) is same_run


@pytest.mark.parametrize(("change", "same_run"), CHANGES[:2] + CHANGES[3:5], ids=str)
def test_the_rule_is_symmetric(tmp_path, change, same_run):
    """A run with a later option set (zo_rank, client_upload) is not the same as one without it, whichever
    side the checkpoint was written by."""
    before = replace(RUN, **change).validate()
    assert checkpoint_accepts(tmp_path, before, RUN) is same_run
    assert flower_node_accepts(before, RUN) is same_run


def test_identity_leaves_out_unset_options_so_older_checkpoints_resume():
    """Options added after the first checkpoints (a model's split, low-rank directions, seed uploads) are in
    the identity only when set, so a checkpoint written before they existed is still the same run."""
    identity = RUN.identity()
    assert {"rounds", "zo_schedule", "cut", "aux_layers", "zo_rank", "client_upload"}.isdisjoint(identity)
    assert replace(RUN, cut=2, zo_rank=4, client_upload="seeds").identity().keys() - identity.keys() == {
        "cut", "zo_rank", "client_upload"}
