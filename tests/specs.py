"""Job specs shared by the pipeline tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchgen.pipeline.spec import JobSpec, validate_spec


def make_spec(tmp_path: Path, **changes: Any) -> JobSpec:
    """A spec over ``tmp_path/in`` writing ``tmp_path/out``; ``changes`` update whole sections
    (a mapping is merged into the section, anything else replaces it)."""
    data: dict[str, Any] = {
        "model": {"path": "m"},
        "input": {"path": str(tmp_path / "in"), "id_column": "id", "prompt_column": "text"},
        "output": {"path": str(tmp_path / "out")},
        "execution": {"shard_rows": 10},
    }
    for section, values in changes.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return validate_spec(data)
