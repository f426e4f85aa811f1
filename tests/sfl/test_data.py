"""heron.sfl.data: built-in datasets, user datasets, partitions and client batches."""

from __future__ import annotations

import math

import pytest
import torch

from heron.sfl.data import (
    ClientData,
    Dataset,
    dataset_from_tensors,
    load_dataset,
    partition,
    partition_dirichlet,
    partition_iid,
    split_clients,
    train_test_indices,
)

# Ten balanced classes of 100 samples each, in shuffled order.
LABELS = torch.arange(10).repeat(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist", seed=0)


def mean_label_entropy(parts: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    entropies = []
    for index in parts:
        p = torch.bincount(labels[index], minlength=10).double() / len(index)
        entropies.append(float(-(p[p > 0] * p[p > 0].log()).sum()))
    return sum(entropies) / len(entropies)


def assert_exact_cover(parts: list[torch.Tensor], n: int) -> None:
    merged = torch.cat(parts)
    assert merged.dtype == torch.int64
    assert torch.equal(merged.sort().values, torch.arange(n))


# -- datasets -------------------------------------------------------------------------------------

def test_mnist_shapes_and_ranges(mnist: Dataset) -> None:
    assert mnist.name == "mnist"
    assert (mnist.num_classes, mnist.in_channels, mnist.image_size) == (10, 1, 28)
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert float(mnist.x_train.min()) == 0.0 and float(mnist.x_train.max()) == 1.0
    assert float(mnist.x_test.min()) >= 0.0 and float(mnist.x_test.max()) <= 1.0
    # Stratified: MNIST-5k has 500 of each digit, so the test set has exactly 100 of each.
    assert torch.equal(torch.bincount(mnist.y_test), torch.full((10,), 100))


def test_digits_shapes_and_ranges(digits: Dataset) -> None:
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert digits.x_train.shape == (1438, 1, 8, 8) and digits.x_test.shape == (359, 1, 8, 8)
    assert float(digits.x_train.min()) == 0.0 and float(digits.x_train.max()) == 1.0
    assert int(digits.y_train.min()) == 0 and int(digits.y_train.max()) == 9
    counts = torch.bincount(digits.y_test)
    assert int(counts.max() - counts.min()) <= 2  # classes of 174..183 samples, 20% each


def test_split_is_deterministic_from_the_seed(digits: Dataset) -> None:
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    random_split = load_dataset("digits", seed=0, stratify=False)
    assert len(random_split.y_test) == len(digits.y_test) and not torch.equal(random_split.y_test, digits.y_test)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.y_train, digits.y_train)
    assert torch.equal(torch.bincount(other.y_test), torch.bincount(digits.y_test))


@pytest.mark.parametrize("stratify", [True, False])
def test_train_test_indices_partition_the_samples(stratify: bool) -> None:
    train, test = train_test_indices(LABELS, 0.25, seed=3, stratify=stratify)
    assert len(test) == 250
    assert_exact_cover([train, test], len(LABELS))
    if stratify:
        assert torch.equal(torch.bincount(LABELS[test]), torch.full((10,), 25))


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(KeyError, match="unknown dataset 'cifar'.*mnist, digits"):
        load_dataset("cifar")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, float("nan")])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_dataset("digits", test_fraction=fraction)


# -- user datasets --------------------------------------------------------------------------------

def make_user_tensors(n_train: int = 12, n_test: int = 4) -> tuple[torch.Tensor, ...]:
    return (torch.rand(n_train, 3, 5, 5), torch.arange(n_train) % 4, torch.rand(n_test, 3, 5, 5),
            torch.arange(n_test) % 4)


def test_dataset_from_tensors() -> None:
    x_train, y_train, x_test, y_test = make_user_tensors()
    data = dataset_from_tensors(x_train, y_train.int(), x_test, y_test)
    assert (data.num_classes, data.in_channels, data.image_size, data.name) == (4, 3, 5, "custom")
    assert data.y_train.dtype == torch.int64 and torch.equal(data.y_train, y_train)
    assert dataset_from_tensors(x_train, y_train, x_test, y_test, num_classes=7).num_classes == 7


@pytest.mark.parametrize(("change", "error", "match"), [
    (lambda t: (t[0][:5],) + t[1:], ValueError, "y_train has 12 labels but x_train has 5 samples"),
    (lambda t: (t[0], t[1].float()) + t[2:], TypeError, "y_train must be integer class ids, got torch.float32"),
    (lambda t: (t[0], t[1].bool()) + t[2:], TypeError, "y_train must be integer"),
    (lambda t: (t[0][:, 0],) + t[1:], ValueError, r"x_train must have shape \(N, C, H, W\), got \(12, 5, 5\)"),
    (lambda t: ((t[0] * 255).to(torch.uint8),) + t[1:], TypeError, "x_train must be floating point"),
    (lambda t: (t[0][..., :4],) + t[1:], ValueError, "x_train images must be square.*5x4"),
    (lambda t: t[:2] + (t[2][:, :1],) + t[3:], ValueError, r"share \(C, H, W\)"),
    (lambda t: (t[0].index_fill(0, torch.tensor([2]), float("nan")),) + t[1:], ValueError, "x_train contains NaN"),
    (lambda t: t[:3] + (t[3] - 1,), ValueError, "y_test must be non-negative, found -1"),
    (lambda t: t[:3] + (t[3][:, None],), ValueError, r"y_test must have shape \(N,\)"),
    (lambda t: (t[0][:0], t[1][:0]) + t[2:], ValueError, "x_train is empty"),
    (lambda t: t[:3] + ([0, 1, 2, 3],), TypeError, "y_test must be a torch.Tensor, got list"),
])
def test_dataset_from_tensors_checks(change, error, match) -> None:
    with pytest.raises(error, match=match):
        dataset_from_tensors(*change(make_user_tensors()))


def test_dataset_from_tensors_num_classes_too_small() -> None:
    with pytest.raises(ValueError, match="labels must be < num_classes=3, found label 3"):
        dataset_from_tensors(*make_user_tensors(), num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        dataset_from_tensors(*make_user_tensors(), num_classes=0)


# -- partitions -----------------------------------------------------------------------------------

def test_iid_covers_every_index_once_in_even_sizes() -> None:
    parts = partition_iid(LABELS, 7, seed=0)
    assert len(parts) == 7
    assert_exact_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(torch.equal(p, p.sort().values) for p in parts)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_covers_every_index_once(alpha: float) -> None:
    parts = partition_dirichlet(LABELS, 8, alpha, seed=0)
    assert len(parts) == 8 and min(len(p) for p in parts) >= 1
    assert_exact_cover(parts, len(LABELS))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_deterministic_from_the_seed(scheme: str) -> None:
    first = partition(LABELS, 5, scheme, alpha=0.3, seed=4)
    again = partition(LABELS, 5, scheme, alpha=0.3, seed=4)
    other = partition(LABELS, 5, scheme, alpha=0.3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_near_iid() -> None:
    iid = mean_label_entropy(partition_iid(LABELS, 10, seed=0), LABELS)
    skewed = mean_label_entropy(partition_dirichlet(LABELS, 10, 0.1, seed=0), LABELS)
    near_iid = mean_label_entropy(partition_dirichlet(LABELS, 10, 1000.0, seed=0), LABELS)
    assert iid > 0.95 * math.log(10)
    assert skewed < 0.6 * iid
    assert abs(near_iid - iid) < 0.05


def test_dirichlet_resamples_until_min_size() -> None:
    parts = partition_dirichlet(LABELS, 20, 0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    assert_exact_cover(parts, len(LABELS))


def test_dirichlet_gives_up_after_max_tries() -> None:
    one_class = torch.zeros(50, dtype=torch.int64)  # tiny alpha puts the whole class on one client
    with pytest.raises(ValueError, match="no draw in max_tries=20 gave each of 3 clients min_size=1"):
        partition_dirichlet(one_class, 3, 1e-3, seed=0, max_tries=20)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize(("num_clients", "match"), [
    (0, "num_clients must be >= 1, got 0"),
    (-2, "num_clients must be >= 1, got -2"),
    (1001, "num_clients=1001 is more than the 1000 samples"),
])
def test_bad_num_clients(scheme: str, num_clients: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(LABELS, num_clients, scheme, seed=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match=f"alpha must be a finite number > 0, got {alpha}"):
        partition_dirichlet(LABELS, 4, alpha, seed=0)


def test_other_partition_errors() -> None:
    with pytest.raises(ValueError, match="unknown partition scheme 'pathological'; valid schemes: iid, dirichlet"):
        partition(LABELS, 4, "pathological", seed=0)
    with pytest.raises(ValueError, match="min_size=300 for 4 clients needs 1200 samples"):
        partition_dirichlet(LABELS, 4, 1.0, seed=0, min_size=300)
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        partition_iid(LABELS.float(), 4, seed=0)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        partition_iid(LABELS[None], 4, seed=0)
    with pytest.raises(ValueError, match="seed must be non-negative, got -1"):
        partition_iid(LABELS, 4, seed=-1)


# -- clients --------------------------------------------------------------------------------------

def test_split_clients(digits: Dataset) -> None:
    clients = split_clients(digits, 4, "dirichlet", 0.5, 0)
    assert [c.client_id for c in clients] == [0, 1, 2, 3]
    assert_exact_cover([c.indices for c in clients], len(digits.y_train))
    for client in clients:
        assert torch.equal(client.x, digits.x_train[client.indices])
        assert torch.equal(client.y, digits.y_train[client.indices])


def make_client(n: int = 23) -> ClientData:
    return ClientData(torch.arange(n).float().reshape(n, 1, 1, 1), torch.arange(n), torch.arange(n))


def test_batches_cover_the_client_once_in_a_seeded_order() -> None:
    client = make_client()
    batches = list(client.batches(5, seed=7, epoch=0))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]  # drop_last=False
    order = torch.cat([y for _, y in batches])
    assert torch.equal(order.sort().values, torch.arange(23))
    assert all(torch.equal(x.flatten().long(), y) for x, y in batches)
    again = torch.cat([y for _, y in client.batches(5, seed=7, epoch=0)])
    assert torch.equal(order, again)
    assert not torch.equal(order, torch.cat([y for _, y in client.batches(5, seed=7, epoch=1)]))
    assert not torch.equal(order, torch.cat([y for _, y in client.batches(5, seed=8, epoch=0)]))


def test_batches_order_does_not_depend_on_global_rng() -> None:
    client = make_client()
    torch.manual_seed(123)
    first = torch.cat([y for _, y in client.batches(4, seed=1, epoch=2)])
    torch.manual_seed(456)
    assert torch.equal(first, torch.cat([y for _, y in client.batches(4, seed=1, epoch=2)]))


def test_sample_batch() -> None:
    client = make_client()
    x, y = client.sample_batch(6, torch.Generator().manual_seed(0))
    assert x.shape == (6, 1, 1, 1) and len(y.unique()) == 6
    _, again = client.sample_batch(6, torch.Generator().manual_seed(0))
    assert torch.equal(y, again)
    assert len(client.sample_batch(100, torch.Generator())[1]) == 23


def test_empty_client_yields_no_batches() -> None:
    assert list(make_client(0).batches(4, seed=0, epoch=0)) == []
    with pytest.raises(ValueError, match="client 0 has no samples"):
        make_client(0).sample_batch(4, torch.Generator())


def test_client_data_errors() -> None:
    client = make_client()
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        client.batches(0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        client.batches(2, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="one length"):
        ClientData(torch.zeros(3, 1, 1, 1), torch.zeros(2, dtype=torch.int64), torch.arange(3))
