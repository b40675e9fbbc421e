"""Check a checkpoint's weight files against its config without reading any weights.

``batchgen validate`` and ``run`` (before Ray starts) call :func:`check_weights` after
:func:`batchgen.checkpoint.load_args` has parsed the config: every tensor the model needs must be
in the weight files with the shape the config implies. Hugging Face ``.safetensors`` headers are
parsed directly (8-byte length + JSON); Meta ``consolidated.NN.pth`` files are opened with
``torch.load(mmap=True, weights_only=True)``, which maps the tensors' storage without reading it,
and model-parallel files are merged along the dimension Meta splits each tensor on.

A problem is a :class:`SpecError` on ``model.path`` naming the file, the tensor, the shape found
and the shape the config implies. (This belongs beside the loaders in ``batchgen/checkpoint.py``;
it lives here while that module is being restructured.)
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from batchgen.pipeline.spec import SpecError

_HF_INDEX = "model.safetensors.index.json"
_META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
#: Dimension along which Meta's model-parallel files split a tensor (None: replicated).
_META_SPLIT = {"tok_embeddings.weight": 1, "output.weight": 0, "attention.wq.weight": 0,
               "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
               "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1}


def expected_shapes(args: Any, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaMA of shape ``args`` (a ``ModelArgs``) needs, by its name in ``layout``
    (``"meta"`` or ``"hf"``): the loader's own table (``checkpoint._full_shapes``, built on the
    meta device), so the check cannot drift from what loading expects."""
    from batchgen.checkpoint import _full_shapes, _to_hf_name

    shapes = _full_shapes(args)
    if args.tie_word_embeddings:
        shapes.pop("output.weight", None)  # the embedding serves as the head: no tensor of its own
    return shapes if layout == "meta" else {_to_hf_name(k): v for k, v in shapes.items()}


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a ``.safetensors`` header (reads the header only).

    Raises:
        SpecError: the file is too short or its header is not safetensors JSON.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20 or 8 + n > path.stat().st_size:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(fh.read(n))
        return {k: tuple(int(x) for x in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise SpecError("model.path", f"{path}: not a readable safetensors file ({exc})") from None


def _hf_found(d: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    single = d / "model.safetensors"
    if single.is_file():
        files = [single]
    else:
        try:
            weight_map = json.loads((d / _HF_INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpecError("model.path", f"{d / _HF_INDEX}: unreadable weight_map ({exc})") from None
        files = [d / n for n in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise SpecError("model.path", f"{d / _HF_INDEX} lists weight files that are not in {d}: "
                                          f"{', '.join(missing[:5])}")
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for p in files:
        found.update({k: (s, p.name) for k, s in safetensors_shapes(p).items()})
    return found


def _meta_found(d: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    import torch

    files = sorted((p for p in d.glob("consolidated.*.pth") if _META_SHARD.match(p.name)),
                   key=lambda p: int(_META_SHARD.match(p.name).group(1)))
    per_file = []
    for p in files:
        try:
            sd = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # a truncated zip, a pickle that is not a state dict, ...
            raise SpecError("model.path", f"{p}: cannot read its tensor index ({type(exc).__name__}: {exc})") from None
        per_file.append({k: tuple(t.shape) for k, t in sd.items() if hasattr(t, "shape")})
        del sd
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    names = files[0].name if len(files) == 1 else f"{files[0].name}..{files[-1].name}"
    for key in per_file[0] if per_file else {}:
        shapes = [f.get(key) for f in per_file]
        if any(s is None for s in shapes):
            raise SpecError("model.path", f"{d}: {key} is in {files[0].name} but not in every consolidated.*.pth")
        split = _META_SPLIT.get(key.split(".", 2)[-1] if key.startswith("layers.") else key)
        shape = list(shapes[0])
        if split is not None and len(shapes) > 1 and len(shape) > split:
            shape[split] = sum(s[split] for s in shapes)
        found[key] = (tuple(shape), names)
    return found


def check_weights(model_dir: str | Path, args: Any, layout: str) -> None:
    """Refuse a checkpoint whose weight files lack a tensor the config needs or hold one of another
    shape (headers only; see the module docstring).

    Raises:
        SpecError: on ``model.path``, naming the file(s), tensor and both shapes.
    """
    d = Path(model_dir)
    found = _hf_found(d) if layout == "hf" else _meta_found(d)
    problems = []
    for name, want in expected_shapes(args, layout).items():
        if name not in found:
            problems.append(f"{name} is missing")
        elif found[name][0] != want:
            problems.append(f"{name} in {found[name][1]} has shape {list(found[name][0])}, the config implies "
                            f"{list(want)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise SpecError("model.path", f"{d}: the weight files do not match the config: "
                                      f"{'; '.join(problems[:5])}{more}")
