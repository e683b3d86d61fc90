"""Training data for a peer: a text dataset (datasets library) turned into fixed-length token batches.

Each peer reads the data in its own order (the seed mixes in its peer id), so peers of one run see different data
without anyone handing out shards. The batcher counts the batches it produced, which is the data position that a
checkpoint saves.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
_EXTENSION_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                       ".parquet": "parquet"}  # fmt: skip


class DataLoadError(RuntimeError):
    """The dataset named by --dataset could not be loaded."""


SPLITS = ("train", "heldout")


def embedded_corpus(split: str = "train") -> list[str]:
    """English prose shipped with Python itself (the pydoc help topics, about 460 KB): no download needed.

    "heldout" is every tenth topic in name order and "train" the rest, so a held-out loss measures text the embedded
    training data never contains.
    """
    from pydoc_data.topics import topics

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = sorted(topics)
    return [topics[name] for i, name in enumerate(names) if (i % 10 == 0) == (split == "heldout")]


def load_text_dataset(spec: str = EMBEDDED, split: str = "train"):
    """A datasets Dataset or IterableDataset with text in it.

    `spec` is "embedded", a directory written by `Dataset.save_to_disk`, a directory of text files, one or more
    files or globs (comma-separated; .txt, .md, .json, .jsonl, .csv, .parquet), or a hub dataset name (streamed).
    `split` picks the embedded corpus's part ("train" or "heldout"); other sources are taken whole.
    """
    import datasets

    try:
        if spec == EMBEDDED:
            return datasets.Dataset.from_dict({"text": embedded_corpus(split)})
        if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_info.json")):
            loaded = datasets.load_from_disk(spec)
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        files = _local_files(spec)
        if files:
            extensions = {os.path.splitext(f)[1].lower() for f in files}
            builders = {_EXTENSION_BUILDERS.get(ext) for ext in extensions}
            if len(builders) != 1 or None in builders:
                raise DataLoadError(f"{spec!r}: mixed or unsupported file types {sorted(extensions)}")
            return datasets.load_dataset(builders.pop(), data_files=files, split="train")
        if os.path.exists(spec):
            raise DataLoadError(f"{spec!r} holds no readable text files")
        return datasets.load_dataset(spec, split="train", streaming=True)
    except DataLoadError:
        raise
    except Exception as e:
        raise DataLoadError(
            f"could not load dataset {spec!r}: {e}. Pass 'embedded', local text files, a saved dataset directory,"
            " or a dataset name that is reachable"
        ) from e


def _local_files(spec: str) -> list[str]:
    files = []
    for part in spec.split(","):
        part = part.strip()
        if os.path.isdir(part):
            for ext in _EXTENSION_BUILDERS:
                files += glob.glob(os.path.join(part, "**", f"*{ext}"), recursive=True)
        else:
            files += glob.glob(part)
    return sorted(f for f in set(files) if os.path.isfile(f))


def _text_column(dataset) -> str:
    features = getattr(dataset, "features", None) or {}
    if "text" in features or not features:
        return "text"
    for name, feature in features.items():
        if getattr(feature, "dtype", None) == "string":
            return name
    raise DataLoadError(f"the dataset has no text column (columns: {list(features)})")


class TokenBatcher:
    """Yields [batch_size, seq_len] token tensors forever, packing texts end to end with an end-of-text token.

    `position` counts the batches produced; `cursor` says where the next batch starts in the stream: the epoch, the
    index of an example in that epoch's shuffled order, and a token offset into that example's tokens. A batcher
    made with a saved cursor starts exactly there, reading only the example the cursor points into: resuming far into
    the data costs what resuming at its start costs, where replaying the stream re-tokenized everything seen so far.
    On a streamed dataset (no random access) the cursor also holds the stream's own state (`datasets`'
    `IterableDataset.state_dict`), which restores the stream's place but not its shuffle buffer: the examples after
    such a resume are not the ones an uninterrupted stream would have given.
    """

    def __init__(
        self,
        dataset,
        tokenizer,
        batch_size: int,
        seq_len: int,
        seed: int,
        skip_batches: int = 0,
        cursor: dict | None = None,
    ):
        """Start at `cursor` (a previous batcher's `cursor`) or, without one, replay `skip_batches` batches (what a
        checkpoint without a cursor needs)."""
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.column = _text_column(dataset)
        self.seekable = hasattr(dataset, "__len__")
        start = (0, 0, None) if cursor is None else (int(cursor["epoch"]), int(cursor["index"]), cursor.get("stream"))
        self._examples = self._read_examples(*start)
        # Examples read but not fully batched yet, as (epoch, index, offset, tokens, stream state): their tokens from
        # the offset on are still to come. There is always one: the first one's place is the cursor.
        epoch, index, _, tokens, stream = next(self._examples)
        offset = 0 if cursor is None else int(cursor["offset"])
        self._segments = collections.deque([(epoch, index, offset, tokens, stream)])
        self.position = 0 if cursor is None else int(cursor["batches"])
        for _ in range(0 if cursor is not None else skip_batches):
            next(self)

    @property
    def cursor(self) -> dict:
        """Where the next batch starts (see the class docstring): ints and dicts only, for a checkpoint."""
        epoch, index, offset, _, stream = self._segments[0]
        place = {"batches": self.position, "epoch": epoch, "index": index, "offset": offset}
        if stream is not None:
            place["stream"] = stream
        return place

    def _order(self, epoch: int):
        if self.seekable:
            return self.dataset.shuffle(seed=self.seed + epoch)
        return self.dataset.shuffle(seed=self.seed + epoch, buffer_size=1000)

    def _read_examples(self, epoch: int, index: int, stream: dict | None) -> Iterator[tuple]:
        """(epoch, index, 0, tokens, stream state before it) of every non-empty example from `index` of `epoch`
        on, then of every later epoch, forever."""
        while True:
            order = self._order(epoch)
            if self.seekable:
                rows = iter(order.select(range(index, len(order))) if index else order)
            else:
                if stream is not None:
                    order.load_state_dict(stream)
                rows = iter(order)
            produced = index > 0
            while True:
                before = None if self.seekable else order.state_dict()
                example = next(rows, None)
                if example is None:
                    break
                text = example.get(self.column)
                if isinstance(text, str) and text:
                    produced = True
                    yield epoch, index, 0, self._encode(text), before
                index += 1
            if not produced:
                raise DataLoadError("the dataset yielded no text")
            epoch, index, stream = epoch + 1, 0, None

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return list(ids) + ([eos] if eos is not None else [])

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        need = self.batch_size * self.seq_len
        held = sum(len(tokens) - offset for _, _, offset, tokens, _ in self._segments)
        while held < need:
            self._segments.append(next(self._examples))
            held += len(self._segments[-1][3])
        block: list[int] = []
        while len(block) < need:
            epoch, index, offset, tokens, stream = self._segments.popleft()
            end = min(len(tokens), offset + need - len(block))
            block.extend(tokens[offset:end])
            if end < len(tokens):
                self._segments.appendleft((epoch, index, end, tokens, stream))
        if not self._segments:
            self._segments.append(next(self._examples))  # the cursor is the first segment's place
        self.position += 1
        return torch.tensor(block, dtype=torch.long).view(self.batch_size, self.seq_len)
