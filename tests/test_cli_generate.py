"""`python -m batchgen generate` on the real checkpoints and on a model with a tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from batchgen.checkpoint_save import save_hf
from batchgen.model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[1]
# The first ten greedy tokens after [1], from ../shared/README.md (llama2.c and transformers agree).
STORIES_REFERENCE = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456]


def generate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "batchgen", "generate", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_generate_json_from_both_layouts_matches_the_reference(shared_dir: Path) -> None:
    for layout in ("stories260K-meta", "stories260K-hf"):
        res = generate("--model", str(shared_dir / "models" / layout), "--prompt-ids", "1",
                       "--prompt-ids", "1,461,461", "--max-tokens", "10", "--ignore-eos", "--json")
        assert res.returncode == 0, res.stderr
        first, second = [json.loads(line) for line in res.stdout.splitlines()]
        assert first["token_ids"] == STORIES_REFERENCE  # the completion only, not the prompt
        assert first["finish_reason"] == "length" and first["text"] is None  # no tokenizer ships with it
        assert second["token_ids"][:8] == STORIES_REFERENCE[2:]  # same text, continued in the same batch


def test_generate_text_prompts_stop_strings_and_errors(shared_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=64)
    save_hf(Transformer(args).state_dict(), args, tmp_path / "m")
    shutil.copy(shared_dir / "tokenizers" / "llama" / "tokenizer.model", tmp_path / "m")

    res = generate("--model", str(tmp_path / "m"), "--prompt", "Hello world", "--prompt", "Bonjour",
                   "--max-tokens", "12", "--json", "--logprobs")
    assert res.returncode == 0, res.stderr
    outs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [o["prompt"] for o in outs] == ["Hello world", "Bonjour"]
    assert all(isinstance(o["text"], str) and len(o["logprobs"]) == len(o["token_ids"]) for o in outs)
    assert outs[0]["prompt_tokens"] == 3  # BOS + "Hello" + " world"

    text = outs[0]["text"]
    if len(text) > 4:
        stop = text[2:4]
        stopped = generate("--model", str(tmp_path / "m"), "--prompt", "Hello world", "--max-tokens", "12",
                           "--stop", stop, "--json")
        out = json.loads(stopped.stdout)
        assert out["finish_reason"] == "stop" and out["text"] == text[:text.find(stop)]

    too_long = generate("--model", str(tmp_path / "m"), "--prompt", "word " * 100, "--json")
    assert too_long.returncode == 1
    assert json.loads(too_long.stdout)["error"].startswith("prompt_too_long")

    missing = generate("--model", str(tmp_path / "nowhere"), "--prompt", "x")
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
