"""The demo's LoRA trainer: frozen base, a few steps lower the loss on a task the base cannot do."""

from __future__ import annotations

from pathlib import Path

import torch

from batchgen.checkpoint import load_args, load_model
from batchgen.demo.lora_train import desc_accuracy, desc_answer, desc_examples, train_lora
from batchgen.demo.task import split_of
from batchgen.demo.train import encode_example
from batchgen.lora import load_adapter, save_adapter
from batchgen.model import split_fused_weights
from batchgen.tokenizer import Tokenizer


def test_desc_task() -> None:
    assert desc_answer("desc: 5 1 3 5 =") == "5 5 3 1"
    ex = desc_examples(20, 0, "heldout")
    assert len(ex) == 20 and all(split_of(p) == "heldout" and a == desc_answer(p) for p, a in ex)


def test_a_few_lora_steps_lower_the_loss_and_leave_the_base_alone(model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tok = Tokenizer(model_dir / "tokenizer.model")
    model = load_model(model_dir, dtype="float32", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held = desc_examples(16, 1, "heldout")
    assert desc_accuracy(model, tok, held) < 0.2  # the bundled model cannot do it
    encoded = [encode_example(tok, p, a) for p, a in desc_examples(256, 0, "train")]
    adapter, losses = train_lora(model, encoded, 12, rank=4, batch_size=16, seed=0, log_every=None)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed: the base must stay frozen"
    assert {p for _, p in adapter.weights} == {"wq", "wk", "wv", "wo", "w1", "w3", "w2"}
    assert max(w.rank for w in adapter.weights.values()) == 4
    # Written as PEFT, read back by batchgen: the merged model's loss is the trained one's.
    args = load_args(model_dir)
    back = load_adapter(save_adapter(adapter, args, tmp_path / "desc"), args, "desc")
    merged = split_fused_weights(load_model(model_dir, dtype="float32", device="cpu", adapters=[back]).state_dict(), args)
    torch.testing.assert_close(merged["layers.0.attention.wq.weight"],
                               split_fused_weights(before, args)["layers.0.attention.wq.weight"] + back.delta(0, "wq"))
