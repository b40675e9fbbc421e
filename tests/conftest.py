"""Fixtures shared by the test suite."""

from __future__ import annotations

import os

# Keep every Ray the tests start on loopback: Ray reads this when it is imported, and without it
# a local Ray binds to all interfaces even when told 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pathlib import Path
from typing import Any, Callable

import pytest

# The read-only real tokenizer and tiny checkpoints live beside the repository (see its README).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The repository's ``../shared`` folder; tests that need it skip when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DIR} (real tokenizer and checkpoints live there)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_hf_config() -> Callable[..., Any]:
    """Factory for tiny fp32 ``transformers.LlamaConfig`` objects; keyword arguments override.

    Default shape: hidden 64, 2 layers, 4 heads, 2 KV heads (GQA), FFN 96, vocab 300, untied.
    """
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

    def make(**overrides: Any) -> Any:
        kw: dict[str, Any] = dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            initializer_range=0.02,
        )
        kw.update(overrides)
        return transformers.LlamaConfig(**kw)

    return make
