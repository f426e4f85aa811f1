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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heron.configs import UPDATERS
from heron.models.split import SplitModel
from heron.profile import profile_step
from heron.sfl import checkpoint as ckpt
from heron.sfl.data import DATASET_KINDS, load_dataset, split_clients
from heron.sfl.methods import AUX_METHODS, UPDATER_OF_METHOD, build_split_model, check_method, check_model_fits
from heron.sfl.replay import ClientReplica, SeedScalarUpload, check_client_upload, seed_scalar_upload
from heron.sfl.roles import Client, ClientRoundResult, FedServer, MainServer, SplitClient, Upload, state_bytes
from heron.sfl.state import pack, unpack
from heron.sfl.tasks import Evaluation, client_batches, task_of
from heron.stream import derive_seed
from heron.updaters import SCHEDULES

USER_MODEL = "user"  # TrainConfig.model of a run on a model the user split (Experiment(split=...))


@dataclass
class TrainConfig:
    """Everything a run depends on. The checkpoint stores it and a resumed run must match it."""

    method: str = "heron"
    model: str = "cnn"
    dataset: str = "mnist"
    clients: int = 5
    rounds: int = 10
    local_steps: int = 10
    upload_every: int = 1
    batch_size: int = 64
    partition: str = "iid"
    alpha: float = 0.5
    client_optimizer: str = "adam"
    client_lr: float = 1e-3
    zo_lr: float = 1e-3
    mu: float = 1e-3
    q: int = 1
    server_optimizer: str = "adam"
    server_lr: float = 1e-3
    weighting: str = "samples"
    seed: int = 0
    device: str = "cpu"
    backend: str | None = None
    client_upload: str = "parameters"  # "seeds": ZO clients upload seed-and-scalar records (heron.sfl.replay)
    zo_schedule: str = "dual"  # ZOUpdater schedule: "dual" (fused streams) or "sequential" (half the activations)
    zo_rank: int = 0  # > 0: rank-r ZO directions on Linear/Conv2d weights (perturbation="lowrank"); 0: full

    cut: int | None = None  # split point / auxiliary-head depth of gpt2* and minilm (None: the model's default)
    aux_layers: int | None = None

    def validate(self) -> TrainConfig:
        check_method(self.method)
        check_client_upload(self.method, self.client_upload)
        if self.zo_schedule not in SCHEDULES:
            raise ValueError(f"zo_schedule must be one of {', '.join(SCHEDULES)}, got {self.zo_schedule!r}")
        if self.zo_rank < 0:
            raise ValueError(f"zo_rank must be >= 0 (0: full directions), got {self.zo_rank}")
        if self.dataset in DATASET_KINDS and self.model != USER_MODEL:  # user datasets: checked when it is built
            check_model_fits(self.model, DATASET_KINDS[self.dataset], self.dataset)
        for name in ("clients", "rounds", "local_steps", "upload_every", "batch_size", "q"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self


@dataclass
class RoundRecord:
    round: int
    test_accuracy: float
    client_loss: float
    server_loss: float | None
    bytes_up: int
    bytes_down: int
    seconds: float
    skipped_steps: int = 0
    test_loss: float | None = None  # mean cross-entropy per prediction (per token for language modelling)
    test_perplexity: float | None = None  # language modelling only


@dataclass
class RoundTally:
    """What a round gathers from its clients, in client order: the states FedAvg averages, their
    sample counts, the losses, the bytes uploaded and the skipped steps."""

    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    client_losses: list[float] = field(default_factory=list)
    server_losses: list[float] = field(default_factory=list)
    up: int = 0
    skipped: int = 0

    def absorb(self, server: MainServer, result: ClientRoundResult, state: dict[str, torch.Tensor],
               model_bytes: int) -> None:
        """An auxiliary-head client's round: the main server trains on its uploads, in order; `state`
        (its parameters, or their rebuild from seeds) joins FedAvg; model_bytes is what its model upload cost."""
        for upload in result.uploads:
            self.server_losses.append(server.train_on(upload))
            self.up += upload.nbytes
        self.up += model_bytes
        self.states.append(state)
        self.counts.append(result.num_samples)
        self.client_losses.extend(result.losses)
        self.skipped += result.skipped_steps


@dataclass
class MethodReport:
    method: str
    final_accuracy: float
    client_peak_memory_bytes: int
    client_flops_per_step: int
    client_step_time_s: float
    bytes_up: int
    bytes_down: int
    rounds: list[RoundRecord] = field(default_factory=list)
    metric: str = "accuracy"  # what final_accuracy measures: "accuracy" or "next-token accuracy"
    final_test_loss: float | None = None
    final_perplexity: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"optimizer must be one of sgd, adam, adamw, got {name!r}")


def build_client(config: TrainConfig, client_id: int, data, model: nn.Module, loss_fn: Callable,
                 device: torch.device | str = "cpu", *, dataset=None) -> Client | SplitClient:
    """Client `client_id` of a run, as the engine builds it (shared with the Flower ClientApp).

    data: the client's ClientData (x (n, C, H, W), y (n,)); model: the client's own copy of the
    global client model (client part + aux head for the auxiliary-head methods, the client part
    alone for SFL-V1/V2), already on `device`. Batches, updater seed and optimizer depend only on
    (config, client_id), so every process that builds client i builds the same client. dataset:
    the run's dataset when its batches need it (padded token ids are trimmed per batch).
    """
    cfg = config
    batches = client_batches(dataset, data.x, data.y, cfg.batch_size, cfg.seed, client_id)
    if cfg.method not in AUX_METHODS:
        optimizer = _optimizer(cfg.client_optimizer, model.parameters(), cfg.client_lr)
        return SplitClient(client_id, model, optimizer, batches, local_steps=cfg.local_steps, device=device)
    kind = UPDATER_OF_METHOD[cfg.method]
    kwargs: dict[str, Any] = {"optimizer": cfg.client_optimizer, "seed": derive_seed(cfg.seed, client_id),
                              "cut": "0", "lr": cfg.client_lr}
    if kind in ("zo", "mezo"):
        kwargs.update(mu=cfg.mu, q=cfg.q, lr=cfg.zo_lr)
    if kind == "zo":
        kwargs["schedule"] = cfg.zo_schedule
        if cfg.zo_rank:
            kwargs.update(perturbation="lowrank", rank=cfg.zo_rank)
        if cfg.backend is not None:
            kwargs["backend"] = cfg.backend
    updater = UPDATERS[kind](model, loss_fn, **kwargs)
    return Client(client_id, model, updater, batches, local_steps=cfg.local_steps,
                  upload_every=cfg.upload_every, device=device)


class _SplitClientStep:
    """Profiling stand-in for an SFL-V1/V2 client step: forward, backward with a server-shaped gradient."""

    def __init__(self, client: SplitClient):
        self.model, self.client = client.model, client

    def step(self, batch):
        x, _ = batch
        out = self.client.model(x)
        out.backward(torch.ones_like(out) / out.numel())
        self.client.optimizer.step()
        self.client.optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        return self.client.optimizer.state_dict()


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
        self.server = MainServer(self.server_model, _optimizer(cfg.server_optimizer, self.server_model.parameters(),
                                                               cfg.server_lr), self.loss_fn)
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
        client = self.clients[0]
        batch = tuple(t.to(self.device) for t in client.batches.batch(0, 0))
        stepper = client.updater if self.aux_method else _SplitClientStep(client)
        return profile_step(stepper, batch, warmup=1, repeats=1)

    # -- checkpoints --------------------------------------------------------------------------
    def _checkpoint_path(self, round_number: int) -> Path:
        return self.checkpoint_dir / f"{self.config.method}-round{round_number:05d}.safetensors"

    def _metadata(self) -> dict[str, Any]:
        # `rounds` is left out so a finished run can be resumed to train further; the ZO schedule
        # changes only how a step is executed (and its rounding), not what the run computes; an unset
        # split (cut/aux_layers None) and client_upload "parameters" are left out so checkpoints
        # written before those options existed still resume (likewise full directions, zo_rank 0).
        identity = {k: v for k, v in asdict(self.config).items()
                    if k not in ("rounds", "zo_schedule") and not (k in ("cut", "aux_layers") and v is None)
                    and not (k == "zo_rank" and v == 0)}
        if identity["client_upload"] == "parameters":
            del identity["client_upload"]
        return {"config": identity, "format": 1}

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
        tensors, metadata = ckpt.load_checkpoint(path, expected_metadata=self._metadata())
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

