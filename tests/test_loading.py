"""Model and data loading through transformers and datasets, on files made here (no downloads)."""

import json
import time

import pytest
import torch

from peers.data import DEFAULT_LANES, DataLoadError, TokenBatcher, embedded_corpus, load_text_dataset
from peers.model import ByteTokenizer, ModelLoadError, embedded_config, load_model
from peers.prefetch import Prefetcher


@pytest.mark.timeout(60)
def test_embedded_model_is_the_same_on_every_peer_with_the_same_seed():
    a, b, c = load_model("embedded", seed=1), load_model("embedded", seed=1), load_model("embedded", seed=2)
    pa, pb, pc = (list(m.model.parameters()) for m in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc, strict=True))
    assert isinstance(a.tokenizer, ByteTokenizer) and a.max_positions == 512


@pytest.mark.timeout(60)
def test_model_from_a_config_file_and_from_a_saved_directory(tmp_path):
    config = embedded_config()
    config.num_hidden_layers = 1
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    from_file = load_model(str(config_file), seed=0)
    assert from_file.model.config.num_hidden_layers == 1

    saved = tmp_path / "saved"
    from_file.model.save_pretrained(saved)
    reloaded = load_model(str(saved), seed=123)  # weights come from the files, not from the seed
    for x, y in zip(from_file.model.parameters(), reloaded.model.parameters(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.timeout(60)
def test_a_config_with_a_too_small_vocabulary_is_refused(tmp_path):
    config = embedded_config()
    config.vocab_size = 100
    path = tmp_path / "small.json"
    path.write_text(json.dumps(config.to_dict()))
    with pytest.raises(ModelLoadError, match="vocab_size"):
        load_model(str(path))


@pytest.mark.timeout(60)
def test_text_jsonl_and_saved_datasets_give_token_batches(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"line {i} " * 20}) for i in range(50)))
    texts = load_text_dataset(str(tmp_path / "a.txt"))
    rows = load_text_dataset(str(tmp_path / "b.jsonl"))
    load_text_dataset("embedded").save_to_disk(str(tmp_path / "saved"))
    saved = load_text_dataset(str(tmp_path / "saved"))
    assert len(saved) == len(embedded_corpus())
    for dataset in (texts, rows, saved):
        batches = TokenBatcher(dataset, ByteTokenizer(), batch_size=2, seq_len=16, seed=0)
        batch = next(batches)
        assert batch.shape == (2, 16) and batch.dtype == torch.long
        assert int(batch.max()) < ByteTokenizer.vocab_size
        assert batches.position == 1


@pytest.mark.timeout(60)
def test_batches_resume_at_the_saved_position():
    dataset = load_text_dataset("embedded")
    first = TokenBatcher(dataset, ByteTokenizer(), 2, 32, seed=5)
    expected = [next(first) for _ in range(5)]
    resumed = TokenBatcher(dataset, ByteTokenizer(), 2, 32, seed=5, skip_batches=3)
    assert torch.equal(next(resumed), expected[3]) and resumed.position == 4


class CountingTokenizer(ByteTokenizer):
    """Counts the examples it encodes: what a batcher had to read."""

    def __init__(self):
        self.encoded = 0

    def encode(self, text: str) -> list[int]:
        self.encoded += 1
        return super().encode(text)


@pytest.mark.timeout(120)
def test_a_far_resume_reads_only_the_examples_the_lanes_point_into_and_gives_the_batches_the_stream_would_have():
    """Three epochs into the embedded corpus (1.3M tokens): a batcher made from the cursor starts there at once,
    reading the one example each row's lane points into, where replaying the stream re-reads everything."""
    dataset = load_text_dataset("embedded")
    stream = TokenBatcher(dataset, ByteTokenizer(), 4, 128, seed=3)
    for _ in range(2600):
        next(stream)
    cursor = stream.cursor
    expected = [next(stream) for _ in range(3)]
    assert cursor["batches"] == 2600 and len(cursor["lanes"]) == DEFAULT_LANES
    assert cursor["next"]["epoch"] >= 2 and any(lane["offset"] > 0 for lane in cursor["lanes"])  # far in

    tokenizer = CountingTokenizer()
    started = time.perf_counter()
    resumed = TokenBatcher(dataset, tokenizer, 4, 128, seed=3, cursor=cursor)
    assert tokenizer.encoded == DEFAULT_LANES, "one example per lane"
    got = [next(resumed) for _ in range(3)]
    assert time.perf_counter() - started < 1.0
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert resumed.position == 2603 and resumed.cursor == stream.cursor


@pytest.mark.timeout(60)
def test_a_cursor_whose_next_example_is_past_the_epochs_end_goes_on_with_the_next_epoch():
    """A checkpoint taken just after the lanes took an epoch's last example (64 lanes over the embedded corpus's 71
    documents make it common) resumes; it raised IndexError from datasets' select."""
    dataset = load_text_dataset("embedded")
    cursor = {"batches": 5, "lanes": [], "next": {"epoch": 0, "index": len(dataset)}}
    resumed = TokenBatcher(dataset, ByteTokenizer(), 2, 32, seed=5, cursor=cursor, lanes=2)
    first = next(resumed)
    text = dataset.shuffle(seed=5 + 1)[0]["text"]  # epoch 1's first example
    assert first[0].tolist() == ByteTokenizer().encode(text)[:32]
    assert resumed.cursor["lanes"][0]["epoch"] == 1 and resumed.position == 6


@pytest.mark.timeout(60)
def test_each_row_of_a_batch_continues_its_own_document():
    """Rows are lanes: one long document fills one row of batch after batch, not every row of one batch (a peer
    would train its whole inner loop on one document), and a lane that runs out takes the next document."""
    import datasets

    lengths = {c: 40 + 10 * i for i, c in enumerate("abcdefgh")}
    dataset = datasets.Dataset.from_dict({"text": [c * n for c, n in lengths.items()]})
    batcher = TokenBatcher(dataset, ByteTokenizer(), batch_size=4, seq_len=16, seed=0, lanes=4)
    batches = [next(batcher) for _ in range(12)]
    starts = [chr(int(row[0])) for row in batches[0]]
    assert len(set(starts)) == 4, f"the first batch's rows start four documents, got {starts}"
    for r in range(4):
        lane = [t for batch in batches for t in batch[r].tolist()]
        documents = [ByteTokenizer().decode(part) for part in _split(lane, ByteTokenizer.eos_token_id)]
        assert documents[0] == starts[r] * lengths[starts[r]], "the lane holds its first document whole, in order"
        second = documents[1]
        assert second and second[0] not in starts and set(second) == {second[0]}, "then a document of its own"


@pytest.mark.timeout(60)
def test_a_batch_draws_its_rows_from_many_open_documents_each_read_whole_and_in_order():
    """More lanes than rows: consecutive batches read many documents, not the same batch_size ones, and each lane
    still reads its documents whole and in order; a resume draws the same rows."""
    import datasets

    texts = [f"<{i:02d}>" + "".join(chr(97 + (i + j) % 26) for j in range(30 + 7 * i)) for i in range(24)]
    dataset = datasets.Dataset.from_dict({"text": texts})
    batcher = TokenBatcher(dataset, ByteTokenizer(), batch_size=4, seq_len=16, seed=0, lanes=16)
    lanes: dict[int, list[int]] = {}
    batches = []
    for position in range(30):
        batch = next(batcher)
        batches.append(batch)
        rows = batcher.lanes_of(position)
        assert len(set(rows)) == 4 and all(0 <= lane < 16 for lane in rows)
        for row, lane in zip(batch.tolist(), rows, strict=True):
            lanes.setdefault(lane, []).extend(row)
    read = {lane for p in range(8) for lane in batcher.lanes_of(p)}  # 16 lanes hold 16 of the 24 documents
    assert len(read) > 8, f"8 batches of 4 rows read only lanes {sorted(read)}"
    assert len({batcher.lanes_of(p)[0] for p in range(30)}) > 4, "the first row is not always the same lane"
    for lane, tokens in lanes.items():
        for whole in [ByteTokenizer().decode(part) for part in _split(tokens, ByteTokenizer.eos_token_id)][1:-1]:
            assert whole in texts, f"lane {lane} read {whole!r}, not a document whole and in order"

    resumed = TokenBatcher(dataset, ByteTokenizer(), 4, 16, seed=0, lanes=16)
    for _ in range(10):
        next(resumed)
    again = TokenBatcher(dataset, ByteTokenizer(), 4, 16, seed=0, cursor=resumed.cursor, lanes=16)
    assert all(torch.equal(next(again), expected) for expected in batches[10:])


def _split(tokens: list[int], separator: int) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for t in tokens:
        if t == separator:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


@pytest.mark.timeout(60)
def test_a_streamed_dataset_resumes_where_it_was_after_a_resume_too():
    """Lanes of a streamed dataset keep the stream's state before their example. Resumed twice, each row must go on
    with its own document (the state read before a resumed stream's first example was the epoch's start, so after a
    second resume every row re-read one and the same document)."""
    import datasets

    texts = [f"document {i:04d} " * 3 for i in range(3000)]
    stream = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()
    first = TokenBatcher(stream, ByteTokenizer(), 8, 16, seed=1)
    for _ in range(3):
        next(first)
    second = TokenBatcher(stream, ByteTokenizer(), 8, 16, seed=1, cursor=first.cursor)
    next(second)
    third = TokenBatcher(stream, ByteTokenizer(), 8, 16, seed=1, cursor=second.cursor)
    expected = next(second)
    got = next(third)
    rows = [ByteTokenizer().decode(row.tolist()) for row in got]
    assert len({row[:13] for row in rows}) > 1, rows
    assert torch.equal(got, expected)


@pytest.mark.timeout(60)
def test_a_cursor_resumes_with_another_batch_size_and_an_old_cursor_starts_at_its_place():
    dataset = load_text_dataset("embedded")
    stream = TokenBatcher(dataset, ByteTokenizer(), 4, 32, seed=5, lanes=4)  # row r continues lane r
    for _ in range(7):
        next(stream)
    cursor = stream.cursor
    expected = next(stream)
    fewer = next(TokenBatcher(dataset, ByteTokenizer(), 2, 32, seed=5, cursor=cursor, lanes=2))
    more = next(TokenBatcher(dataset, ByteTokenizer(), 6, 32, seed=5, cursor=cursor, lanes=6))
    assert torch.equal(fewer, expected[:2]) and torch.equal(more[:4], expected)
    assert not any(torch.equal(more[4], row) for row in expected), "a new lane takes a document of its own"

    # A checkpoint written before lanes existed holds one stream's place in the same shuffled order: the lanes start
    # there at once (no replay), the first one at the start of the example it points into.
    old = {"batches": 7, "epoch": 1, "index": 3, "offset": 100}
    tokenizer = CountingTokenizer()
    resumed = TokenBatcher(dataset, tokenizer, 4, 32, seed=5, cursor=old, lanes=4)
    first = next(resumed)
    assert resumed.position == 8 and tokenizer.encoded <= 8
    text = dataset.shuffle(seed=5 + 1)[3]["text"]
    assert first[0].tolist() == ByteTokenizer().encode(text)[:32]


@pytest.mark.timeout(60)
def test_the_prefetcher_hands_out_the_stream_in_order_and_counts_what_was_taken():
    dataset = load_text_dataset("embedded")
    expected = TokenBatcher(dataset, ByteTokenizer(), 2, 32, seed=5)
    prefetcher = Prefetcher(TokenBatcher(dataset, ByteTokenizer(), 2, 32, seed=5), torch.device("cpu"), depth=3)
    try:
        for i in range(20):
            assert torch.equal(next(prefetcher), next(expected))
            # Made ahead, but only what the training took counts: a checkpoint resumes after batch i.
            assert prefetcher.position == i + 1 and prefetcher.cursor == expected.cursor
    finally:
        prefetcher.close()
    assert not prefetcher._thread.is_alive()


class SilentTokenizer(ByteTokenizer):
    """Encodes nothing and ends nothing: text that no token stands for."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return []


@pytest.mark.timeout(60)
def test_text_that_encodes_to_no_tokens_is_a_clear_error_not_a_hang():
    with pytest.raises(DataLoadError, match="no text"):
        TokenBatcher(load_text_dataset("embedded"), SilentTokenizer(), 2, 16, seed=0)


@pytest.mark.timeout(60)
def test_missing_or_unreadable_data_gives_a_clear_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataLoadError, match="no readable text files"):
        load_text_dataset(str(tmp_path))
    (tmp_path / "y.txt").write_text("text")
    with pytest.raises(DataLoadError, match="mixed or unsupported"):
        load_text_dataset(f"{tmp_path / 'y.txt'},{tmp_path / 'x.bin'}")
