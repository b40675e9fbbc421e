"""The shape of ``manifest.json``, checked whenever batchgen reads one back.

A resume and ``batchgen status`` trust the manifest under the output path to say what the job
is. A damaged or hand-edited one (``{"shards": [1]}``, ``[]``, a string where a count belongs)
used to crash them with a ``TypeError``/``AttributeError``; now it is an :class:`OutputError`
naming the file and the field (exit 2 for ``run``/``validate``, non-zero for ``status``).

Fields are optional where older batchgen versions did not write them (a manifest without
``model_fingerprint`` still resumes); where a field is present its type is checked strictly.
Unknown fields are allowed (a newer batchgen may add some).
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ManifestShard(_Loose):
    """One planned shard: its id and row count (the rest is informational)."""

    shard_id: StrictStr
    rows: StrictInt


class ManifestModel(_Loose):
    """The model fingerprint block (``provenance.model_fingerprint``)."""

    digest: Optional[StrictStr] = None


class Manifest(_Loose):
    """What batchgen reads from ``manifest.json`` (see ``writer._manifest`` for what it writes)."""

    name: Optional[StrictStr] = None
    created: Optional[StrictStr] = None
    spec_fingerprint: Optional[StrictStr] = None
    input_fingerprint: Optional[StrictStr] = None
    model_fingerprint: Optional[ManifestModel] = None
    result_fields: dict[str, Any] = {}
    provenance: Optional[dict[str, Any]] = None
    shard_rows: Optional[StrictInt] = None
    num_shards: Optional[StrictInt] = None
    total_rows: Optional[StrictInt] = None
    shards: list[ManifestShard] = []


def manifest_problem(obj: Any, path: str) -> str | None:
    """Why ``obj`` (the parsed JSON of ``manifest.json`` at ``path``) is not a batchgen manifest,
    naming ``path``, the first bad field and what to do; None when it is one."""
    if not isinstance(obj, dict):
        return (f"{path} is not a batchgen manifest (a JSON {type(obj).__name__}, not an object); move it away, "
                "or use mode: overwrite to start again")
    try:
        Manifest.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        return (f"{path} is not a valid batchgen manifest: {where}: {err['msg']} (got {err.get('input')!r:.80}); "
                "move it away, or use mode: overwrite to start again")
    return None


__all__ = ["Manifest", "ManifestShard", "manifest_problem"]
