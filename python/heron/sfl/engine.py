"""The HERON-SFL round loop for every method, on one machine.

One round: the fed server's client model is broadcast; each client in turn runs h local steps;
for the auxiliary-head methods (heron, cse-fsl, mezo) the main server then trains on that
client's uploaded smashed data; for SFL-V1/V2 client and server alternate every step (the server
returns the cut-layer gradient; V1 trains a server copy per client and averages them, V2 one
server model sequentially). The fed server averages the client models (FedAvg). Every round is
evaluated (server(client(x)) on the test set, scored by the dataset's task: accuracy for
classification, next-token accuracy, loss and perplexity for language modelling; see
heron.sfl.tasks) and checkpointed atomically.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from heron.models.split import SplitModel
from heron.sfl import checkpoint as ckpt
from heron.sfl.client_cost import profile_client
from heron.sfl.clients import build_client, make_optimizer
from heron.sfl.config import USER_MODEL, TrainConfig, identity_differences
from heron.sfl.data import load_dataset, split_clients
from heron.sfl.methods import AUX_METHODS, build_split_model
from heron.sfl.records import MethodReport, RoundRecord, RoundTally
from heron.sfl.replay import ClientReplica, SeedScalarUpload, seed_scalar_upload
from heron.sfl.roles import FedServer, MainServer, Upload, state_bytes
from heron.sfl.state import pack, unpack
from heron.sfl.tasks import Evaluation, task_of

CHECKPOINT_FORMAT = 1


class Experiment:
    """One method's run; `run()` returns its MethodReport."""

    def __init__(self, config: TrainConfig, *, checkpoint_dir: str | Path | None = None, resume: bool = False,
                 progress: Callable[[str], None] | None = None, dataset=None, client_data=None,
                 split: SplitModel | None = None):
        """split: the user's own model already split (e.g. heron.models.cut.split_at of a Hugging Face
        model), with config.model = "user"; copies of its parts are trained, the split is not changed."""
        if (split is None) != (config.model != USER_MODEL):
            raise ValueError(f"a user-split model needs config.model={USER_MODEL!r} and split=..., together; got "
                             f"model={config.model!r} and split={'given' if split is not None else None}")
        self.config = config.validate()
        self.user_split = None if split is None else copy.deepcopy(split)
        self.device = torch.device(config.device)
        self.log = progress or (lambda message: None)
        self.dataset = dataset if dataset is not None else load_dataset(config.dataset, seed=config.seed)
        self.client_data = client_data if client_data is not None else split_clients(
            self.dataset, config.clients, config.partition, config.alpha, config.seed)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.resume = resume
        self._build()

    # -- construction ---------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        split = self.user_split if self.user_split is not None else build_split_model(
            cfg.model, self.dataset, cut=cfg.cut, aux_layers=cfg.aux_layers)
        split = split.to(self.device)
        self.aux_method = cfg.method in AUX_METHODS
        self.task = task_of(self.dataset)
        self.loss_fn = self.task.loss_fn
        self.global_model = split.client_with_aux() if self.aux_method else split.client
        self.server_model = split.server
        self.server = MainServer(self.server_model, make_optimizer(cfg.server_optimizer,
                                                                   self.server_model.parameters(), cfg.server_lr),
                                 self.loss_fn)
        self.fed = FedServer(cfg.weighting)
        self.clients = [self._make_client(i, data) for i, data in enumerate(self.client_data)]
        # seeds mode: the server's mirror of each client's updater rebuilds its state from the upload
        self.replicas = None if cfg.client_upload != "seeds" else [
            ClientReplica.from_updater(client.updater, client_id=client.client_id) for client in self.clients]
        self.history: list[RoundRecord] = []
        self.start_round = 0
        self.eval_client = copy.deepcopy(split.client)

    def _make_client(self, client_id: int, data):
        return build_client(self.config, client_id, data, copy.deepcopy(self.global_model), self.loss_fn,
                            self.device, dataset=self.dataset)

    # -- one round --------------------------------------------------------------------------
    def _broadcast(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.global_model.state_dict().items()}

    def run_round(self, round_index: int) -> RoundRecord:
        start = time.perf_counter()
        state = self._broadcast()
        down = state_bytes(state) * len(self.clients)
        if self.aux_method:
            tally = self._aux_round(round_index, state)
        else:
            tally, down_grads = self._split_round(round_index, state)
            down += down_grads
        return self.finish_round(round_index, tally, bytes_down=down, started=start)

    def finish_round(self, round_index: int, tally: RoundTally, *, bytes_down: int, started: float) -> RoundRecord:
        """FedAvg the tally's client states (none: the global client model is kept), evaluate, and
        append the round's record (shared with the Flower ServerApp)."""
        if tally.states:
            self.global_model.load_state_dict(self.fed.aggregate(tally.states, tally.counts))
        evaluation = self.evaluation()
        record = RoundRecord(
            round=round_index + 1, test_accuracy=evaluation.metric,
            client_loss=float(sum(tally.client_losses) / max(len(tally.client_losses), 1)),
            server_loss=float(sum(tally.server_losses) / len(tally.server_losses)) if tally.server_losses else None,
            bytes_up=tally.up, bytes_down=bytes_down, seconds=time.perf_counter() - started,
            skipped_steps=tally.skipped, test_loss=evaluation.loss, test_perplexity=evaluation.perplexity)
        self.history.append(record)
        return record

    def _aux_round(self, round_index: int, state) -> RoundTally:
        tally = RoundTally()
        for client in self.clients:
            client.set_state(state)
            result = client.run_round(round_index)
            if self.replicas is None:
                client_state, model_bytes = result.state, state_bytes(result.state)
            else:  # the upload goes through its wire format, as it would over a network
                replica = self.replicas[client.client_id]
                upload = SeedScalarUpload.from_tensors(seed_scalar_upload(client, result).to_tensors(),
                                                       expected_buffers=replica.expected_buffers)
                client_state, model_bytes = replica.rebuild(state, upload), upload.nbytes
            tally.absorb(self.server, result, client_state, model_bytes)
            self.log(f"round {round_index + 1} client {client.client_id}: loss {result.losses[-1]:.4f}")
        return tally

    def _split_round(self, round_index: int, state) -> tuple[RoundTally, int]:
        """SFL-V1/V2: client and server alternate every step. Returns the tally and the bytes of the
        cut-layer gradients sent down."""
        cfg = self.config
        tally = RoundTally()
        down = 0
        base_server = {k: v.detach().clone() for k, v in self.server_model.state_dict().items()}
        server_states = []
        for client in self.clients:
            client.set_state(state)
            if cfg.method == "sflv1":  # every client trains its own copy of the server
                self.server_model.load_state_dict(base_server)
            for step in range(cfg.local_steps):
                upload: Upload = client.forward(round_index, step)
                loss, grad = self.server.forward_backward(upload)
                client.backward(grad)
                tally.up += upload.nbytes
                down += grad.numel() * grad.element_size()
                tally.server_losses.append(loss)
                tally.client_losses.append(loss)
            if cfg.method == "sflv1":
                server_states.append({k: v.detach().clone() for k, v in self.server_model.state_dict().items()})
            result_state = client.state()
            tally.up += state_bytes(result_state)
            tally.states.append(result_state)
            tally.counts.append(client.num_samples)
            self.log(f"round {round_index + 1} client {client.client_id}: loss {tally.client_losses[-1]:.4f}")
        if cfg.method == "sflv1":
            self.server_model.load_state_dict(self.fed.aggregate(server_states, tally.counts))
        return tally, down

    def evaluate(self, batch_size: int = 500) -> float:
        """The task's test metric (accuracy, or next-token accuracy) of server(client(x))."""
        return self.evaluation(batch_size).metric

    @torch.no_grad()
    def evaluation(self, batch_size: int = 500) -> Evaluation:
        """Test metric, loss (and perplexity) of the split model server(client(x)) with the aggregated client part."""
        client_part = self.global_model[0] if self.aux_method else self.global_model
        self.eval_client.load_state_dict(client_part.state_dict())
        self.eval_client.eval()
        self.server_model.eval()
        return self.task.evaluate(lambda x: self.server_model(self.eval_client(x)), self.dataset.x_test,
                                  self.dataset.y_test, batch_size=batch_size, device=self.device,
                                  pad_id=getattr(self.dataset, "pad_id", None))

    # -- profiling ---------------------------------------------------------------------------
    def profile_client(self):
        """Peak memory / FLOPs / time of one client step of client 0, on a copy (the run is not touched)."""
        return profile_client(self.clients[0], self.device)

    # -- checkpoints --------------------------------------------------------------------------
    def _checkpoint_path(self, round_number: int) -> Path:
        return self.checkpoint_dir / f"{self.config.method}-round{round_number:05d}.safetensors"

    def _metadata(self) -> dict[str, Any]:
        return {"config": self.config.identity(), "format": CHECKPOINT_FORMAT}

    def save(self, round_number: int) -> Path:
        clients_state = []
        for client in self.clients:
            if self.replicas is not None:
                clients_state.append({"updater": client.updater.state_dict(),
                                      "replica": self.replicas[client.client_id].state_dict()})
            elif self.aux_method:
                clients_state.append({"updater": client.updater.state_dict()})
            else:
                clients_state.append({"optimizer": client.optimizer.state_dict()})
        tensors, skeleton = pack({
            "global": self.global_model.state_dict(), "server": self.server_model.state_dict(),
            "server_optimizer": self.server.optimizer.state_dict(), "clients": clients_state})
        metadata = {**self._metadata(), "round": round_number, "skeleton": skeleton,
                    "history": [asdict(r) for r in self.history]}
        path = self._checkpoint_path(round_number)
        ckpt.save_checkpoint(path, tensors, metadata)
        return path

    def load(self, path: Path) -> None:
        tensors, metadata = ckpt.load_checkpoint(path, expected_metadata={"format": CHECKPOINT_FORMAT})
        differences = identity_differences(metadata.get("config", {}), self.config)
        if differences:
            raise ckpt.CheckpointError(f"checkpoint {path} does not match this run: " + "; ".join(differences))
        flat = ckpt.flatten_tensors(tensors)
        state = unpack(metadata["skeleton"], flat)
        try:
            self.global_model.load_state_dict(state["global"])
            self.server_model.load_state_dict(state["server"])
            self.server.optimizer.load_state_dict(state["server_optimizer"])
            for client, saved in zip(self.clients, state["clients"], strict=True):
                if self.aux_method:
                    client.updater.load_state_dict(saved["updater"])
                else:
                    client.optimizer.load_state_dict(saved["optimizer"])
                if self.replicas is not None:
                    self.replicas[client.client_id].load_state_dict(saved["replica"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise ckpt.CheckpointError(f"checkpoint {path} does not match this run's model: {error}") from error
        self.history = [RoundRecord(**r) for r in metadata["history"]]
        self.start_round = int(metadata["round"])

    # -- the run ---------------------------------------------------------------------------------
    def run(self, *, on_round: Callable[[RoundRecord], None] | None = None) -> MethodReport:
        if self.resume and self.checkpoint_dir is not None:
            latest = ckpt.latest_checkpoint(self.checkpoint_dir, self.config.method)
            if latest is not None:
                self.load(latest)
                self.log(f"resumed from {latest} after round {self.start_round}")
        profile = self.profile_client()
        for round_index in range(self.start_round, self.config.rounds):
            record = self.run_round(round_index)
            if self.checkpoint_dir is not None:
                self.save(round_index + 1)
            if on_round is not None:
                on_round(record)
        return self.method_report(profile)

    def method_report(self, profile) -> MethodReport:
        """The report of the rounds run so far, with the client cost from `profile` (a StepProfile)."""
        last = self.history[-1] if self.history else None
        return MethodReport(
            method=self.config.method, final_accuracy=last.test_accuracy if last else 0.0,
            client_peak_memory_bytes=profile.peak_memory_bytes, client_flops_per_step=profile.flops,
            client_step_time_s=profile.time_s, bytes_up=sum(r.bytes_up for r in self.history),
            bytes_down=sum(r.bytes_down for r in self.history), rounds=list(self.history),
            metric=self.task.metric_name, final_test_loss=last.test_loss if last else None,
            final_perplexity=last.test_perplexity if last else None)

    def client_parameters(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.global_model.state_dict().items()}

