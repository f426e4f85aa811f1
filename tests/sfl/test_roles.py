"""The three HERON-SFL roles on their own (heron.sfl.roles): a client's deterministic batches, its round
(h steps, an upload every k, the ZO steps it can be replayed from), the SFL-V1/V2 client's two halves of
a step, the main server's first-order steps, and FedAvg."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from heron.sfl.roles import Client, ClientBatches, FedServer, MainServer, SplitClient, Upload, state_bytes
from heron.zo.updaters import FOUpdater, ZOUpdater


def client_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Linear(8, 3))


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def test_batches_depend_on_seed_client_round_and_step_only():
    x, y = data()
    batches = ClientBatches(x, y, batch_size=8, seed=5, client_id=1)
    torch.manual_seed(123)  # the global RNG plays no part
    first = batches.batch(2, 3)
    torch.manual_seed(456)
    assert all(torch.equal(a, b) for a, b in zip(first, batches.batch(2, 3), strict=True))
    assert first[0].shape == (8, 6)
    others = [batches.batch(2, 4), batches.batch(3, 3), ClientBatches(x, y, 8, 5, client_id=2).batch(2, 3),
              ClientBatches(x, y, 8, 6, client_id=1).batch(2, 3)]
    assert all(not torch.equal(first[1], other[1]) for other in others)
    assert ClientBatches(x[:5], y[:5], batch_size=8, seed=5, client_id=1).batch(0, 0)[0].shape == (5, 6)
    with pytest.raises(ValueError, match="client 4 has no samples"):
        ClientBatches(x[:0], y[:0], 8, 5, client_id=4)


@pytest.mark.parametrize("updater", ["zo", "fo"])
def test_client_round_runs_h_steps_uploading_every_k(updater):
    model = client_model()
    steps = {"zo": lambda m: ZOUpdater(m, nn.functional.cross_entropy, lr=0.01, seed=3, cut="0"),
             "fo": lambda m: FOUpdater(m, nn.functional.cross_entropy, lr=0.01, cut="0")}[updater](model)
    x, y = data()
    client = Client(7, model, steps, ClientBatches(x, y, 8, seed=1, client_id=7), local_steps=5, upload_every=2)
    start = copy.deepcopy(model.state_dict())
    result = client.run_round(0)
    assert result.client_id == 7 and result.num_samples == 40 and client.num_samples == 40
    assert len(result.losses) == 5 and result.skipped_steps == 0
    assert len(result.uploads) == 2  # after steps 2 and 4
    batch_x, batch_y = client.batches.batch(0, 1)
    assert torch.equal(result.uploads[0].labels, batch_y)
    assert result.uploads[0].smashed.shape == (8, 8) and not result.uploads[0].smashed.requires_grad
    assert result.uploads[0].nbytes == 8 * 8 * 4 + 8 * 8
    assert set(result.state) == set(start) and any(not torch.equal(result.state[k], start[k]) for k in start)
    assert [s for s, _, _ in result.zo_steps] == ([0, 1, 2, 3, 4] if updater == "zo" else [])
    client.set_state(start)
    assert all(torch.equal(v, start[k]) for k, v in client.model.state_dict().items())


def test_client_checks_its_schedule():
    with pytest.raises(ValueError, match="local_steps and upload_every must be >= 1, got 0, 1"):
        Client(0, client_model(), None, ClientBatches(*data(), 8, 0, 0), local_steps=0, upload_every=1)


def test_split_client_step_is_the_servers_gradient_applied():
    """forward uploads the cut output; backward(grad) finishes the step as if the loss's gradient had
    flowed through the server: the same update as plain backprop through both halves."""
    torch.manual_seed(0)
    client_part, server_part = nn.Linear(6, 8), nn.Linear(8, 3)
    twin_client, twin_server = copy.deepcopy(client_part), copy.deepcopy(server_part)
    x, y = data()
    client = SplitClient(0, client_part, torch.optim.SGD(client_part.parameters(), lr=0.1),
                         ClientBatches(x, y, 8, seed=1, client_id=0), local_steps=1)
    server = MainServer(server_part, torch.optim.SGD(server_part.parameters(), lr=0.1), nn.functional.cross_entropy)
    upload = client.forward(0, 0)
    loss, grad = server.forward_backward(upload)
    client.backward(grad)
    bx, by = client.batches.batch(0, 0)
    twin_loss = nn.functional.cross_entropy(twin_server(twin_client(bx)), by)
    twin_loss.backward()
    with torch.no_grad():
        for p in (*twin_client.parameters(), *twin_server.parameters()):
            p -= 0.1 * p.grad
    assert loss == pytest.approx(twin_loss.item())
    for a, b in zip((*client_part.parameters(), *server_part.parameters()),
                    (*twin_client.parameters(), *twin_server.parameters()), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="backward called without a pending forward"):
        client.backward(grad)
    client.forward(0, 1)
    with pytest.raises(ValueError, match=r"server gradient has shape \(2, 8\), smashed data \(8, 8\)"):
        client.backward(torch.zeros(2, 8))


def test_main_server_trains_on_uploads_without_sending_a_gradient():
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    before = copy.deepcopy(model.state_dict())
    server = MainServer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy)
    smashed = torch.randn(4, 8, requires_grad=True)
    loss = server.train_on(Upload(smashed, torch.tensor([0, 1, 2, 0])))
    assert isinstance(loss, float) and smashed.grad is None
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fedavg_weights_by_samples_or_uniformly():
    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)},
              {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}]
    by_samples = FedServer("samples").aggregate(states, [1, 3])
    torch.testing.assert_close(by_samples["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(by_samples["n"], torch.tensor(3))  # integer buffers: the first client's
    torch.testing.assert_close(FedServer("uniform").aggregate(states, [1, 3])["w"], torch.tensor([2.0, 4.0]))
    half = [{"w": torch.tensor([1.0], dtype=torch.bfloat16)}, {"w": torch.tensor([2.0], dtype=torch.bfloat16)}]
    assert FedServer().aggregate(half, [1, 1])["w"].dtype == torch.bfloat16


def test_fedavg_refuses_what_it_cannot_average():
    with pytest.raises(ValueError, match="weighting must be one of"):
        FedServer("median")
    with pytest.raises(ValueError, match="at least one client state"):
        FedServer().aggregate([], [])
    with pytest.raises(ValueError, match="2 states but 1 sample counts"):
        FedServer().aggregate([{"w": torch.zeros(1)}] * 2, [1])
    with pytest.raises(ValueError, match=r"client state 1 has keys \['v', 'w'\] that differ from client 0's"):
        FedServer().aggregate([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}], [1, 1])


def test_state_bytes_counts_every_tensor():
    assert state_bytes({"a": torch.zeros(3, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.int64)}) == 28
