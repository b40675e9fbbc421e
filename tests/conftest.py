"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

# Keep every Ray the tests start on loopback: Ray reads this when it is imported, and without it
# a local Ray binds to all interfaces even when told 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pathlib import Path
from typing import Any, Callable

import pytest
from ray_head import free_port

# The read-only real tokenizer and tiny checkpoints live beside the repository (see its README),
# or inside it where only the repository travels (a GPU machine: see bench/NOTES.md).
_REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = next((d for d in (_REPO / "shared", _REPO.parent / "shared") if d.is_dir()), _REPO.parent / "shared")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The bundled demo model (``batchgen/demo/model``): tiny, trained, with its tokenizer."""
    return Path(__file__).resolve().parents[1] / "batchgen" / "demo" / "model"


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


@pytest.fixture()
def head_env() -> Iterator[dict[str, str]]:
    """Environment for the scripts: free ports, a short temp dir, a token file of our own."""
    if not Path("/proc/net/tcp").exists() or shutil.which("pgrep") is None:
        pytest.skip("needs Linux /proc and pgrep")
    # Short: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="bgray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        VENV=sys.prefix, RAY_TMPDIR=str(tmp / "ray"), NUM_CPUS="1",
        RAY_PORT=str(free_port()), DASHBOARD_PORT=str(free_port()),
        METRICS_PORT=str(free_port()), CLIENT_PORT=str(free_port()),
        RAY_AUTH_TOKEN_PATH=str(tmp / "token"),
        # The dashboard agent's default port (52365) may be held by another local Ray.
        AGENT_PORT=str(free_port()),
    )
    try:
        yield env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


