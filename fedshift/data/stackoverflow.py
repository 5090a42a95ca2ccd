"""Stack Overflow next-word prediction (TensorFlow Federated's federated Stack Overflow): questions and answers.

The paper's third task (Zhu et al., ICLR 2022; FEDTKM.md section 2): day clients write questions, night clients
write answers, one next-word model over a 10,000-word vocabulary. TFF's data (``tff.simulation.datasets.
stackoverflow.load_data``) holds one example per sentence with the columns ``tokens`` (the sentence, lowercased
and split into space-separated tokens), ``type`` ("question" or "answer"), ``title``, ``tags``, ``score`` and
``creation_date``; its clients are the users (342,477 in the train split).

Where the files come from: no copy of TFF's Stack Overflow on the Hugging Face hub was found (searched for
``flwrlabs/`` and ``tensorflow/`` copies and for hub datasets with its ``tokens`` / ``type`` columns), so the
source reads local parquet files, in the hub layout that fedshift.data.hf reads (``data/train-*.parquet``, and
``data/test-*.parquet`` if there is a test split), with the columns

- ``client_id`` (string or integer): the user, one natural client;
- ``tokens`` (string): the sentence, tokens separated by spaces, as TFF stores it;
- ``type`` (string): "question" or "answer".

On a machine with ``tensorflow_federated`` installed, TFF's own data becomes such a folder with::

    import pyarrow as pa, pyarrow.parquet as pq, tensorflow_federated as tff
    train, _, test = tff.simulation.datasets.stackoverflow.load_data()
    for split, data in (("train", train), ("test", test)):
        rows = {"client_id": [], "tokens": [], "type": []}
        for cid in data.client_ids[:N]:  # N users: the whole split is 135 million sentences
            for ex in data.create_tf_dataset_for_client(cid):
                rows["client_id"].append(cid)
                rows["tokens"].append(ex["tokens"].numpy().decode())
                rows["type"].append(ex["type"].numpy().decode())
        pq.write_table(pa.table(rows), f"DIR/data/{split}-00000-of-00001.parquet")
    words = tff.simulation.datasets.stackoverflow.load_word_counts(vocab_size=10000)
    open("DIR/vocab.txt", "w").write("\\n".join(words))

and ``path: DIR, vocab_path: vocab.txt`` then uses the paper's exact vocabulary (TFF's 10,000 most frequent words
of the whole train split). ``repo`` names a hub copy in the same columns, should one appear.

Sequences follow TFF's preprocessing (``build_to_ids_fn``, as the reference code uses it): a sentence's first
``sequence_length`` (20) tokens become ids (word i of the vocabulary -> i + 1, any other word -> OOV); EOS follows
when the sentence is shorter than that; BOS goes in front and pad (0) fills up to ``sequence_length + 1``; the
input is the first ``sequence_length`` ids and the target the last ``sequence_length`` (the input shifted by one).
Ids: pad 0, words 1..V, OOV V + 1, BOS V + 2, EOS V + 3 (``SpecialTokens``), V + 4 in all; target pads are -1
(``UNLABELLED``), so every loss and metric skips them. Sentences are split on any whitespace (TFF splits on single
spaces; its text has no repeated whitespace).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from fedshift.core.errors import DatasetUnavailable

from ..core.seeding import DataStream, Stream, rng_of
from ..core.tensors import UNLABELLED
from .hf import HubImageSource, HubParams, whole_groups_under_cap, writer_holdout
from .sources import DATASETS, SourceData


@dataclass(frozen=True)
class SpecialTokens:
    """TFF's id layout for a vocabulary of ``vocab_size`` words and one OOV bucket."""

    vocab_size: int

    pad: ClassVar[int] = 0

    @property
    def oov(self) -> int:
        return self.vocab_size + 1

    @property
    def bos(self) -> int:
        return self.vocab_size + 2

    @property
    def eos(self) -> int:
        return self.vocab_size + 3

    @property
    def size(self) -> int:
        """Every id: pad, the words, OOV, BOS, EOS (the model's embedding rows and output classes)."""
        return self.vocab_size + 4

    @property
    def excluded_from_accuracy(self) -> tuple[int, ...]:
        """Target ids that token accuracy skips: pad (-1 in targets, 0 in inputs), OOV and EOS (TFF's
        ``accuracy_without_out_of_vocab_or_end_of_sentence``; BOS never is a target)."""
        return (UNLABELLED, self.pad, self.oov, self.eos)

    @classmethod
    def for_output_size(cls, size: int) -> SpecialTokens:
        """The layout whose ``size`` is a model's number of output classes."""
        if size < 5:
            raise ValueError(f"a next-word model needs at least 5 output classes (pad, a word, OOV, BOS, EOS), "
                             f"got {size}")
        return cls(size - 4)


def read_vocabulary(path: Path, vocab_size: int) -> list[str]:
    """The first ``vocab_size`` words of a vocabulary file: one word per line, most frequent first; anything after
    the word on a line (TFF's word_count file has 'word count') is ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetUnavailable(f"dataset 'stackoverflow': cannot read the vocabulary file {str(path)!r}: "
                                 f"{exc.strerror or exc}") from None
    words = [line.split()[0] for line in lines if line.strip()][:vocab_size]
    repeated = sorted(w for w, n in Counter(words).items() if n > 1)
    if repeated:
        raise DatasetUnavailable(f"dataset 'stackoverflow': the vocabulary file {str(path)!r} repeats the words "
                                 f"{repeated[:5]}")
    return words


def most_frequent(sentences: Iterable[str], vocab_size: int) -> list[str]:
    """The ``vocab_size`` most frequent words, ties broken alphabetically (so the vocabulary is deterministic)."""
    counts = Counter(word for s in sentences for word in s.split())
    return [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:vocab_size]]


def encode(sentences: Iterable[str], words: list[str], vocab_size: int,
           sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Input and target ids, int64 [N, sequence_length] each, as TFF builds them (module docstring)."""
    special = SpecialTokens(vocab_size)
    ids = {w: i + 1 for i, w in enumerate(words)}
    rows = []
    for s in sentences:
        row = [special.bos] + [ids.get(w, special.oov) for w in s.split()[:sequence_length]]
        if len(row) <= sequence_length:  # shorter than sequence_length words: the sentence ends inside the window
            row.append(special.eos)
        rows.append(row + [special.pad] * (sequence_length + 1 - len(row)))
    full = np.array(rows, dtype=np.int64).reshape(-1, sequence_length + 1)
    x, y = full[:, :-1].copy(), full[:, 1:].copy()
    y[y == special.pad] = UNLABELLED
    return x, y


class StackOverflowParams(HubParams):
    path: str | None = Field(None, description="folder with data/train-*.parquet (and data/test-*.parquet) holding "
                                               "the columns client_id, tokens, type (see fedshift.data.stackoverflow)")
    repo: str = Field("", description="Hugging Face hub dataset id of a copy with the columns client_id, tokens and "
                                      "type (none is known: use path)")
    max_examples: int | None = Field(None, ge=1, description="cap on the train split's sentences: whole users, drawn "
                                                             "at random, until the next would pass the cap")
    type: Literal["question", "answer", "all"] = Field("all", description="posts kept: question (the paper's day), "
                                                                          "answer (night) or all")
    vocab_size: int = Field(10000, ge=1, description="words in the vocabulary (ids 1..vocab_size); the model's output "
                                                     "has vocab_size + 4 classes (pad, OOV, BOS, EOS)")
    vocab_path: str | None = Field(None, description="vocabulary file, one word per line, most frequent first "
                                                     "(relative to path); not set: the most frequent words of the "
                                                     "train split")
    sequence_length: int = Field(20, ge=1, description="tokens per input and per target sequence")


@DATASETS.register
class StackOverflow(HubImageSource):
    """TFF's federated Stack Overflow as next-word prediction; ``type`` picks questions (day) or answers (night).

    Local parquet files with the columns ``client_id``, ``tokens``, ``type`` (module docstring: how to write them
    from TFF's data); no hub copy is known. Inputs are int64 token ids [N, sequence_length] starting with BOS,
    targets the next token at each position, -1 on padding; natural client ids are the users.

    Parameters:
        path (None): folder with ``data/train-*.parquet`` (and ``data/test-*.parquet``).
        repo (""): hub dataset id of a copy with the same columns; used when path is not set.
        type ("all"): question | answer | all. A scenario's day mode sets question and its night mode answer.
        vocab_size (10000): words in the vocabulary; ids: pad 0, words 1..V, OOV V + 1, BOS V + 2, EOS V + 3.
        vocab_path (None): vocabulary file (one word per line, most frequent first; relative to path), e.g. TFF's
            load_word_counts; not set: the vocab_size most frequent words of the train split, ties alphabetical.
        sequence_length (20): tokens per sequence.
        max_examples (None): cap on the train split's sentences; whole users are kept, drawn at random.

    The vocabulary, the cap and the test hold-out are computed on every post, before ``type`` selects some: the
    question and answer modes of one scenario share token ids. Without a test split, round(n * data.test_fraction)
    sentences of each user go to the test split (at least one stays for training), before the vocabulary is
    counted on the rest.
    """

    name = "stackoverflow"
    Params = StackOverflowParams
    has_natural_ids = True
    user_column: ClassVar[str] = "client_id"
    text_column: ClassVar[str] = "tokens"
    type_column: ClassVar[str] = "type"

    @property
    def columns(self) -> list[str]:
        return [self.user_column, self.text_column, self.type_column]

    def read_splits(self) -> dict[str, Any]:
        if not self.params.path and not self.params.repo:
            raise DatasetUnavailable("dataset 'stackoverflow': set path to a folder of parquet files with the columns "
                                     "client_id, tokens and type (fedshift.data.stackoverflow's docstring shows how to "
                                     "write them from TFF's data); no Hugging Face hub copy is known")
        return super().read_splits()

    def user_codes(self, table: Any) -> np.ndarray:
        ids = table.column(self.user_column).to_numpy(zero_copy_only=False)
        return np.unique(ids.astype(str), return_inverse=True)[1].astype(np.int64)

    def subset_rows(self, table: Any, seed: int) -> np.ndarray | None:
        cap = self.params.max_examples
        if cap is None or cap >= table.num_rows:
            return None
        return whole_groups_under_cap(self.user_codes(table), cap, seed)

    def vocabulary(self, train_sentences: list[str]) -> list[str]:
        p: StackOverflowParams = self.params  # type: ignore[assignment]
        if p.vocab_path is None:
            return most_frequent(train_sentences, p.vocab_size)
        path = Path(p.vocab_path)
        if not path.is_absolute() and p.path:
            path = Path(p.path) / path
        return read_vocabulary(path, p.vocab_size)

    def sentences(self, table: Any) -> list[str]:
        return [s or "" for s in table.column(self.text_column).to_pylist()]

    def kept(self, table: Any) -> np.ndarray:
        types = np.asarray([t or "" for t in table.column(self.type_column).to_pylist()], dtype=object)
        return np.ones(len(types), dtype=bool) if self.params.type == "all" else types == self.params.type

    def load(self, seed: int, test_fraction: float) -> SourceData:
        p: StackOverflowParams = self.params  # type: ignore[assignment]
        tables = self.read_splits()
        train = self.capped_train(tables, seed)
        groups, text, keep = self.user_codes(train), self.sentences(train), self.kept(train)
        if "test" in tables:
            test_mask = np.zeros(len(groups), dtype=bool)
            test_text, test_keep = self.sentences(tables["test"]), self.kept(tables["test"])
        else:
            rng = rng_of(seed, Stream.DATA, DataStream.HOLDOUT)
            test_mask = writer_holdout(groups, test_fraction, rng)
            test_text = [s for s, held in zip(text, test_mask) if held]
            test_keep = keep[test_mask]
        words = self.vocabulary([s for s, held in zip(text, test_mask) if not held])
        train_rows = np.flatnonzero(~test_mask & keep)
        if len(train_rows) == 0:
            raise DatasetUnavailable(f"dataset 'stackoverflow': {self._where()} has no training sentence of type "
                                     f"{p.type!r} (column {self.type_column!r} holds 'question' or 'answer')")
        x, y = encode([text[i] for i in train_rows], words, p.vocab_size, p.sequence_length)
        test_x, test_y = encode([s for s, k in zip(test_text, test_keep) if k], words, p.vocab_size, p.sequence_length)
        return SourceData(x, y, test_x, test_y, groups[train_rows])
