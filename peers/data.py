"""Training data for a peer: a text dataset (datasets library) turned into fixed-length token batches.

Each peer reads the data in its own order (the seed mixes in its peer id), so peers of one run see different data
without anyone handing out shards. The batcher counts the batches it produced, which is the data position that a
checkpoint saves.
"""

from __future__ import annotations

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
    """Yields [batch_size, seq_len] token tensors forever, packing texts end to end with an end-of-text token."""

    def __init__(self, dataset, tokenizer, batch_size: int, seq_len: int, seed: int, skip_batches: int = 0):
        self.dataset, self.tokenizer = dataset, tokenizer
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.column = _text_column(dataset)
        self.position = 0
        self._stream = self._token_stream()
        for _ in range(skip_batches):  # resume where a checkpoint left off
            next(self)

    def _texts(self) -> Iterator[str]:
        epoch = 0
        while True:
            if hasattr(self.dataset, "__len__"):
                order = self.dataset.shuffle(seed=self.seed + epoch)
            else:
                order = self.dataset.shuffle(seed=self.seed + epoch, buffer_size=1000)
            produced = False
            for example in order:
                text = example.get(self.column)
                if isinstance(text, str) and text:
                    produced = True
                    yield text
            if not produced:
                raise DataLoadError("the dataset yielded no text")
            epoch += 1

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return list(ids) + ([eos] if eos is not None else [])

    def _token_stream(self) -> Iterator[torch.Tensor]:
        need = self.batch_size * self.seq_len
        buffer: list[int] = []
        for text in self._texts():
            buffer.extend(self._encode(text))
            while len(buffer) >= need:
                block, buffer = buffer[:need], buffer[need:]
                yield torch.tensor(block, dtype=torch.long).view(self.batch_size, self.seq_len)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self._stream)
        self.position += 1
        return batch
