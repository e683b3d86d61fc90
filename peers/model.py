"""Model and tokenizer loading for a peer: transformers causal LMs, from an embedded config, a local path or a hub id.

The model file knows nothing about the swarm or about distribution: it returns a plain `nn.Module`.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"


class ModelLoadError(RuntimeError):
    """The model or tokenizer named by --model could not be loaded."""


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus an end-of-text token: needs no vocabulary file and no download."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def embedded_config():
    """A small Llama-style model (435K parameters) that trains visibly within minutes on a CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=ByteTokenizer.eos_token_id,
        pad_token_id=None,
    )


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    """Has `encode(text) -> list[int]` (or is a transformers tokenizer) and `eos_token_id`."""
    max_positions: int | None
    source: str


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _has_weights(path: str) -> bool:
    patterns = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json")
    return any(glob.glob(os.path.join(path, p)) for p in patterns)


def _has_tokenizer(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any(os.path.exists(os.path.join(path, n)) for n in names)


def _from_config(config, seed: int, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    if getattr(config, "vocab_size", 0) < ByteTokenizer.vocab_size:
        raise ModelLoadError(
            f"{source}: a model built from a config alone uses the byte tokenizer and needs vocab_size >= "
            f"{ByteTokenizer.vocab_size}, but its vocab_size is {getattr(config, 'vocab_size', None)}"
        )
    # Every peer builds θ0 from the same seed: identical initial parameters across the swarm.
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return LoadedModel(model, ByteTokenizer(), _max_positions(config), source)


def load_model(spec: str = EMBEDDED, seed: int = 0) -> LoadedModel:
    """Load `spec`: "embedded", a config .json file, a local model directory, or a hub model id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = None
    try:
        if spec == EMBEDDED:
            return _from_config(embedded_config(), seed, "embedded Llama-style config")
        if os.path.isfile(spec):
            return _from_config(AutoConfig.from_pretrained(spec), seed, spec)
        if os.path.isdir(spec):
            config = AutoConfig.from_pretrained(spec)
            if not _has_weights(spec):
                loaded = _from_config(config, seed, spec)
                if _has_tokenizer(spec):
                    loaded.tokenizer = AutoTokenizer.from_pretrained(spec)
                return loaded
            model = AutoModelForCausalLM.from_pretrained(spec, torch_dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(spec) if _has_tokenizer(spec) else ByteTokenizer()
            return LoadedModel(model, tokenizer, _max_positions(config), spec)
        # A hub id: downloads on first use (needs network), then comes from the local cache.
        model = AutoModelForCausalLM.from_pretrained(spec, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        return LoadedModel(model, tokenizer, _max_positions(model.config), spec)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"could not load model {spec!r}: {e}. Pass 'embedded', a config .json, a local model directory, "
            "or a model id that is reachable"
        ) from e
