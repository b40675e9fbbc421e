"""What made an output: a cheap fingerprint of the model, and the provenance block of a job.

The spec fingerprint covers ``model.path`` as a string, so weights replaced under the same path
would go unnoticed by a resume. :func:`model_fingerprint` identifies the checkpoint itself,
reading a few MiB however large it is (a 130 GB checkpoint is never read whole):

- every ``*.json`` next to the weights (``config.json``/``params.json``, the safetensors index,
  generation config...): sha256 of the whole file;
- every weight file (``*.safetensors``, ``*.pth``, ``*.pt``, ``*.bin``): name and size, plus
  - a ``.safetensors`` file: sha256 of its JSON header (every tensor's name, dtype, shape and byte
    range) and of :data:`SAMPLES` byte ranges of :data:`SAMPLE_BYTES` spread evenly over the
    tensor data (first and last included);
  - a zip checkpoint (``torch.save``'s ``.pth``/``.pt``/``.bin``): its central directory, which
    lists every member's name, size and CRC-32 of its uncompressed bytes, so any change to any
    tensor's bytes changes it (short of a CRC-32 collision), plus the sampled ranges;
  - anything else: the sampled ranges;
- the tokenizer file (``tokenizer.model``, ~0.5 MB): sha256 of the whole file;
- adapters (a hook for LoRA and the like): each extra directory fingerprinted the same way.

What it can miss: in a ``.safetensors`` file, a change confined to bytes outside the sampled
ranges that keeps every size and the header (say one tensor edited in place). Fine-tuned or
re-trained weights change nearly every byte and are caught by any sample; a different model
changes sizes or headers. File times and names of unrelated files are ignored on purpose: the
same checkpoint copied elsewhere has the same fingerprint.

This module imports neither ray, pyarrow nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from batchgen import __version__

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
#: Sampled byte ranges per weight file, and the bytes of each.
SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
_MAX_JSON_BYTES = 64 * 2**20  # a safetensors index of a big model is a few hundred kB
_FORMAT = 1


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _sample_ranges(h: "hashlib._Hash", f: Any, start: int, end: int) -> None:
    """Feed ``SAMPLES`` ranges of ``[start, end)`` (evenly spaced, first and last included) to ``h``."""
    span = end - start
    if span <= SAMPLES * SAMPLE_BYTES:
        f.seek(start)
        h.update(f.read(span))
        return
    step = (span - SAMPLE_BYTES) / (SAMPLES - 1)
    for k in range(SAMPLES):
        f.seek(start + int(k * step))
        h.update(f.read(SAMPLE_BYTES))


def weight_file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"name", "size", "kind", "sha256"}`` of one weight file (see the module docstring)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    kind = "bytes"
    with open(path, "rb") as f:
        data_start = 0
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len <= size:
                kind = "safetensors"
                h.update(f.read(header_len))
                data_start = 8 + header_len
        if kind == "bytes" and zipfile.is_zipfile(f):
            f.seek(0)
            with zipfile.ZipFile(f) as z:  # reads the central directory only
                kind = "zip"
                for info in sorted(z.infolist(), key=lambda i: i.filename):
                    h.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\n".encode())
        _sample_ranges(h, f, data_start, size)
    return {"name": path.name, "size": size, "kind": kind, "sha256": h.hexdigest()}


def _dir_fingerprint(d: Path) -> dict[str, Any]:
    files = sorted(p for p in d.iterdir() if p.is_file())
    configs = {p.name: _sha256_file(p) for p in files
               if p.suffix == ".json" and p.stat().st_size <= _MAX_JSON_BYTES}
    weights = [weight_file_fingerprint(p) for p in files if p.suffix in WEIGHT_SUFFIXES]
    return {"configs": configs, "weights": weights}


def model_fingerprint(model_dir: str | os.PathLike[str], tokenizer: Optional[str | os.PathLike[str]] = None,
                      adapters: Sequence[str | os.PathLike[str]] = ()) -> dict[str, Any]:
    """The fingerprint of the checkpoint in ``model_dir`` with its tokenizer and ``adapters``.

    ``tokenizer``: the tokenizer file (default ``model_dir/tokenizer.model`` when present).
    The result's ``digest`` (sha256 of everything else) is what a resume compares; the rest says
    what changed (:func:`fingerprint_changes`).

    Raises:
        OSError: when a file cannot be read.
    """
    d = Path(model_dir)
    fp: dict[str, Any] = {"format": _FORMAT, **_dir_fingerprint(d)}
    tok = Path(tokenizer) if tokenizer is not None else d / "tokenizer.model"
    fp["tokenizer"] = {"name": tok.name, "sha256": _sha256_file(tok)} if tok.is_file() else None
    fp["adapters"] = [{"name": Path(a).name, **_dir_fingerprint(Path(a))} for a in adapters]
    canonical = json.dumps(fp, sort_keys=True, separators=(",", ":"))
    fp["digest"] = hashlib.sha256(canonical.encode()).hexdigest()
    return fp


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`model_fingerprint` results, one line per file."""
    out: list[str] = []
    if old.get("format") != new.get("format"):
        return [f"fingerprint format {old.get('format')} -> {new.get('format')}"]
    for name in sorted(set(old.get("configs", {})) | set(new.get("configs", {}))):
        a, b = old.get("configs", {}).get(name), new.get("configs", {}).get(name)
        if a != b:
            out.append(f"{name} {'added' if a is None else 'removed' if b is None else 'changed'}")
    wa = {w["name"]: w for w in old.get("weights", [])}
    wb = {w["name"]: w for w in new.get("weights", [])}
    for name in sorted(wa.keys() | wb.keys()):
        a, b = wa.get(name), wb.get(name)
        if a is None or b is None:
            out.append(f"weight file {name} {'added' if a is None else 'removed'}")
        elif a["size"] != b["size"]:
            out.append(f"weight file {name} changed size ({a['size']} -> {b['size']} bytes)")
        elif a != b:
            out.append(f"weight file {name} changed content")
    if old.get("tokenizer") != new.get("tokenizer"):
        out.append("tokenizer changed")
    if old.get("adapters") != new.get("adapters"):
        out.append("adapters changed")
    if not out and old.get("digest") != new.get("digest"):
        out.append("fingerprint differs")
    return out


def provenance(spec_fp: str, sampling: Mapping[str, Any], model_fp: Optional[Mapping[str, Any]],
               input_fp: str) -> dict[str, Any]:
    """The block every shard file's Parquet metadata carries (``batchgen.provenance``): what
    reproduces any of its rows together with the row's id and per-row override columns."""
    return {
        "batchgen_version": __version__,
        "spec_fingerprint": spec_fp,
        "input_fingerprint": input_fp,
        "sampling": dict(sampling),
        "model_fingerprint": None if model_fp is None else model_fp.get("digest"),
        "model": None if model_fp is None else dict(model_fp),
    }
