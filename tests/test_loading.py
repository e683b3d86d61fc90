"""Model and data loading through transformers and datasets, on files made here (no downloads)."""

import json
import time

import pytest
import torch

from peers.data import DataLoadError, TokenBatcher, embedded_corpus, load_text_dataset
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


@pytest.mark.timeout(120)
def test_a_far_resume_is_fast_and_gives_the_batch_the_stream_would_have():
    """Three epochs into the embedded corpus (1.3M tokens): the uninterrupted stream takes seconds to get there; a
    batcher made from the cursor starts there at once, reading only the example the cursor points into."""
    dataset = load_text_dataset("embedded")
    stream = TokenBatcher(dataset, ByteTokenizer(), 4, 128, seed=3)
    started = time.perf_counter()
    for _ in range(2600):
        next(stream)
    reach = time.perf_counter() - started
    cursor = stream.cursor
    expected = [next(stream) for _ in range(3)]
    assert cursor["epoch"] >= 2 and cursor["batches"] == 2600 and cursor["offset"] > 0

    started = time.perf_counter()
    resumed = TokenBatcher(dataset, ByteTokenizer(), 4, 128, seed=3, cursor=cursor)
    got = [next(resumed) for _ in range(3)]
    resume = time.perf_counter() - started
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert resumed.position == 2603 and resumed.cursor == stream.cursor
    assert resume < 1.0 and resume < reach / 5, f"resume {resume:.3f}s against {reach:.3f}s to stream there"


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


@pytest.mark.timeout(60)
def test_missing_or_unreadable_data_gives_a_clear_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataLoadError, match="no readable text files"):
        load_text_dataset(str(tmp_path))
    (tmp_path / "y.txt").write_text("text")
    with pytest.raises(DataLoadError, match="mixed or unsupported"):
        load_text_dataset(f"{tmp_path / 'y.txt'},{tmp_path / 'x.bin'}")
