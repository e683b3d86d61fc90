"""Training data for a peer: a text dataset (datasets library) turned into fixed-length token batches.

Each peer reads the data in its own order (the seed mixes in its peer id), so peers of one run see different data
without anyone handing out shards. The batcher counts the batches it produced, which is the data position that a
checkpoint saves.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import zlib
from array import array
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


def data_seed(run_seed: int, peer_id: bytes) -> int:
    """The seed of one peer's (or one worker's) data order: the run's seed mixed with its peer id, so every peer of a
    run reads its own order and nobody hands out shards. A restarted peer with its identity reads the same order."""
    return run_seed * 1_000_003 + zlib.crc32(peer_id)


def _place(epoch: int, index: int, stream: dict | None) -> dict:
    """An example's place in a cursor: its epoch, its index in that epoch's order, a stream's state before it."""
    return {"epoch": epoch, "index": index, **({} if stream is None else {"stream": stream})}


DEFAULT_LANES = 64
"""Documents a peer's batcher reads at once (TokenBatcher's `lanes`); see README, Training quality."""


class TokenBatcher:
    """Yields [batch_size, seq_len] token tensors forever, read from `lanes` open documents at once. A lane is a
    stream of its own that packs examples end to end with an end-of-text token; a lane that runs out takes the next
    example of the shared, shuffled order (lanes fill in order, so they take examples in a fixed order). Each batch
    draws its rows from batch_size different lanes, picked afresh for every batch from the seed and the batch's
    position; with as many lanes as rows, row r of every batch continues lane r.

    Why lanes: packing every row from one stream put one long document into every row of batch after batch (most of
    the embedded corpus's tokens are in documents of more than 8192 tokens, a batch holds 1024), so a peer trained
    for whole inner loops on one document, and its local model drifted towards it. Why more lanes than rows: with
    one lane per row, consecutive batches still continue the same batch_size documents, so a peer's inner loop of
    30 steps saw a dozen documents; drawing the rows from many open documents makes consecutive batches nearly
    independent samples of the data, as a shuffle of packed sequences does.

    `position` counts the batches produced; `cursor` says where the next batch starts: for each lane the example it
    reads (epoch, index in that epoch's shuffled order) and the token offset into it, and where the shared order goes
    on. A batcher made with a saved cursor starts exactly there, reading only the examples the lanes point into:
    resuming far into the data costs what resuming at its start costs. On a streamed dataset (no random access) the
    cursor also holds the stream's own state (`datasets`' `IterableDataset.state_dict`), which restores the stream's
    place but not its shuffle buffer: the examples after such a resume are not the ones an uninterrupted stream would
    have given. A cursor saved with another number of lanes keeps the lanes both have; new lanes take fresh
    examples. A cursor from before lanes (one stream's place) starts every lane afresh from that place in the same
    order.
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
        lanes: int = DEFAULT_LANES,
    ):
        """Start at `cursor` (a previous batcher's `cursor`) or, without one, replay `skip_batches` batches (what a
        checkpoint without a cursor needs; ignored with a cursor). `lanes`: documents read at once, at least
        batch_size."""
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.column = _text_column(dataset)
        self.seekable = hasattr(dataset, "__len__")
        self._orders: dict[int, object] = {}
        if cursor is not None and "lanes" not in cursor:
            # Written before lanes existed: one stream's place, in the same shuffled order. The lanes start there,
            # from the start of the example it points into (its offset was that one stream's).
            logger.info("the saved data cursor predates per-row lanes: every row starts afresh at its place")
            place = {key: cursor[key] for key in ("epoch", "index", "stream") if key in cursor}
            cursor = {"batches": cursor["batches"], "lanes": [], "next": place}
        shared = cursor["next"] if cursor is not None else {"epoch": 0, "index": 0}
        self._examples = self._read_examples(int(shared["epoch"]), int(shared["index"]), shared.get("stream"))
        self._next = (int(shared["epoch"]), int(shared["index"]), shared.get("stream"))
        # Per lane: (epoch, index, offset, tokens, stream state before the example); its tokens from offset on are
        # still to come. A lane always holds an example: its place is the lane's part of the cursor.
        self.lanes = max(batch_size, lanes)
        saved = [] if cursor is None else cursor["lanes"][: self.lanes]
        self._lanes = [self._reread(lane) for lane in saved]
        while len(self._lanes) < self.lanes:
            self._lanes.append(self._take())
        self.position = 0 if cursor is None else int(cursor["batches"])
        for _ in range(0 if cursor is not None else skip_batches):
            next(self)

    @property
    def cursor(self) -> dict:
        """Where the next batch starts (see the class docstring): ints, lists and dicts only, for a checkpoint."""
        lanes = [{**_place(epoch, index, stream), "offset": offset} for epoch, index, offset, _, stream in self._lanes]
        return {"batches": self.position, "lanes": lanes, "next": _place(*self._next)}

    def _order(self, epoch: int):
        if self.seekable:
            # Kept: a resume reads each lane's example from it, and shuffling a large dataset's index takes a while.
            if epoch not in self._orders:
                if len(self._orders) >= 2:
                    del self._orders[min(self._orders)]
                self._orders[epoch] = self.dataset.shuffle(seed=self.seed + epoch)
            return self._orders[epoch]
        # A stream's order is a fresh object each time: loading a saved state changes it in place.
        return self.dataset.shuffle(seed=self.seed + epoch, buffer_size=1000)

    def _read_examples(self, epoch: int, index: int, stream: dict | None) -> Iterator[tuple]:
        """(epoch, index, tokens, stream state before it, stream state after it) of every non-empty example from
        `index` of `epoch` on, then of every later epoch, forever."""
        while True:
            order = self._order(epoch)
            if self.seekable:
                # A place at the epoch's very end (the last example was taken) goes on with the next epoch;
                # `datasets` refuses an empty select there.
                rows = iter(
                    order.select(range(index, len(order))) if 0 < index < len(order) else [] if index else order
                )
            else:
                if stream is not None:
                    order.load_state_dict(stream)
                rows = iter(order)
            produced = index > 0
            # A stream's state before an example is the state after the one before it. Read from the stream before
            # the first example it would be wrong after a resume: `datasets` applies a loaded state only once
            # iteration begins, so until then state_dict() still says "the epoch's start".
            before = None if self.seekable else (stream if stream is not None else order.state_dict())
            while True:
                example = next(rows, None)
                if example is None:
                    break
                after = None if self.seekable else order.state_dict()
                text = example.get(self.column)
                # Text that encodes to no tokens counts as empty: a lane holding it would never fill its row.
                tokens = self._encode(text) if isinstance(text, str) and text else []
                if tokens:
                    produced = True
                    yield epoch, index, tokens, before, after
                before = after
                index += 1
            if not produced:
                raise DataLoadError("the dataset yielded no text")
            epoch, index, stream = epoch + 1, 0, None

    def _take(self) -> tuple:
        """The shared order's next example, for a lane that ran out."""
        epoch, index, tokens, before, after = next(self._examples)
        self._next = (epoch, index + 1, after)
        return epoch, index, 0, tokens, before

    def _reread(self, lane: dict) -> tuple:
        """The example a saved lane points into, read anew."""
        epoch, index, stream = int(lane["epoch"]), int(lane["index"]), lane.get("stream")
        epoch, index, tokens, before, _ = next(self._read_examples(epoch, index, stream))
        return epoch, index, int(lane["offset"]), tokens, before

    def _encode(self, text: str) -> array:
        ids = self.tokenizer.encode(text)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        # 8 bytes a token, where a list of ints takes about 36: a lane may hold a whole book.
        return array("q", list(ids) + ([eos] if eos is not None else []))

    def lanes_of(self, position: int) -> list[int] | range:
        """The lanes that batch `position` reads, one per row: a function of the seed and the position alone, so a
        resumed batcher draws what the uninterrupted one would have."""
        if self.lanes == self.batch_size:
            return range(self.batch_size)
        return random.Random(self.seed * 1_000_003 + position).sample(range(self.lanes), self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        rows = []
        for lane in self.lanes_of(self.position):
            row: list[int] = []
            while len(row) < self.seq_len:
                epoch, index, offset, tokens, stream = self._lanes[lane]
                end = min(len(tokens), offset + self.seq_len - len(row))
                row.extend(tokens[offset:end])
                # A lane that used up its example takes the next one at once: its place is then that one's start.
                self._lanes[lane] = (epoch, index, end, tokens, stream) if end < len(tokens) else self._take()
            rows.append(row)
        self.position += 1
        return torch.tensor(rows, dtype=torch.long)
