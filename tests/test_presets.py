"""Model presets have the published parameter counts (built on the meta device: no memory)."""

from __future__ import annotations

import pytest

from batchgen.model import PRESETS, ModelArgs, count_parameters

# Published totals (LLaMA paper / Llama-2 model card parameter counts, in billions).
PUBLISHED_B = {
    "llama-7b": 6.74, "llama-13b": 13.02, "llama-33b": 32.53, "llama-65b": 65.29,
    "llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_preset_parameter_count(name: str) -> None:
    n = count_parameters(ModelArgs.from_preset(name))
    published = PUBLISHED_B[name] * 1e9
    assert abs(n - published) / published < 0.005, f"{name}: {n / 1e9:.3f}B vs published {PUBLISHED_B[name]}B"


def test_every_preset_has_a_published_count() -> None:
    # Chat variants share their base model's shape, so they are covered by the base name.
    bases = {name.removesuffix("-chat") for name in PRESETS}
    assert bases == set(PUBLISHED_B)


def test_llama2_70b_ffn_width_follows_meta_formula() -> None:
    args = ModelArgs.from_preset("llama-2-70b")
    assert args.hidden_dim == 28672
    assert args.n_kv_heads == 8 and args.head_dim == 128
