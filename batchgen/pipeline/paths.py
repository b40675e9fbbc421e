"""Where a job's paths point when its driver runs under Ray Jobs (``ray job submit``).

Under ``ray job submit --working-dir .`` the driver's CWD is Ray's unpacked copy of the working
dir (``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/``), which Ray
deletes when it garbage-collects the package, and which exists only on the nodes the job ran on.
So batchgen decides:

- a relative ``output.path`` is **refused** before any work (exit 2): results written there would
  vanish with the package, and each node would write to its own copy. Write an absolute path that
  every node sees (a shared filesystem), an ``s3://``/``gs://`` URI, or ``--set
  output.path=$PWD/out/x`` (``$PWD`` is expanded by the submitting shell, on the client);
  an absolute path that lies inside Ray's working-dir copy is refused the same way;
- relative ``input.path``, ``model.path`` and ``model.tokenizer`` resolve inside the uploaded
  working dir (the same directory on every node). A relative path that does not exist there is
  refused with a hint: ``--working-dir`` skips git-ignored files and files over Ray's size limit,
  so large or generated data (weights, ``demo-out/``) must be named by an absolute path.

Detection: the job supervisor starts the entrypoint with ``RAY_JOB_CONFIG_JSON_ENV_VAR`` holding a
JSON job config whose ``metadata`` has ``job_submission_id`` (Ray 2.x,
``ray/dashboard/modules/job/job_supervisor.py``); as a second sign, the CWD lying under a
``runtime_resources/working_dir_files`` directory. A plain ``python -m batchgen run`` started
with ``RAY_ADDRESS`` set is not a Ray Job: its CWD is the user's own.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Mapping, Optional

from batchgen.pipeline.spec import JobSpec, SpecError, is_uri, resolve_path

#: Set by Ray's job supervisor for the entrypoint process (a JSON job config).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
#: Where Ray unpacks ``--working-dir`` packages (under its session dir).
WORKING_DIR_MARK = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep


def ray_job_id(environ: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> Optional[str]:
    """The submission id when this process is a Ray Job's entrypoint (``"?"`` when only the CWD
    says so), else None."""
    environ = os.environ if environ is None else environ
    raw = environ.get(JOB_CONFIG_ENV)
    if raw:
        try:
            meta = json.loads(raw).get("metadata") or {}
        except (ValueError, AttributeError):
            meta = {}
        return str(meta.get("job_submission_id") or "?")
    cwd = os.getcwd() if cwd is None else cwd
    return "?" if in_ray_working_dir(cwd) else None


def in_ray_working_dir(path: str) -> bool:
    """True when ``path`` lies inside a package that Ray unpacked for ``--working-dir``."""
    return WORKING_DIR_MARK in os.path.join(os.path.abspath(path), "")


def absolute_uri(path: str) -> str:
    """``path`` as the absolute location it names from this process (URIs unchanged)."""
    if is_uri(path):
        return path
    return os.path.abspath(resolve_path(path))


def _is_relative(path: str) -> bool:
    return not is_uri(path) and not os.path.isabs(os.path.expanduser(path))


def check_job_paths(spec: JobSpec, environ: Optional[Mapping[str, str]] = None,
                    cwd: Optional[str] = None) -> None:
    """Refuse paths that would not work under Ray Jobs (see the module docstring); a no-op when
    this process is not a Ray Job's entrypoint.

    Raises:
        SpecError: naming the field, why, and what to write instead.
    """
    job = ray_job_id(environ, cwd)
    if job is None:
        return
    cwd = os.getcwd() if cwd is None else cwd
    errors: list[tuple[str, str]] = []
    out = spec.output.path
    target = None if is_uri(out) else os.path.join(cwd, os.path.expanduser(out))
    # Where the user most likely meant: the same relative path under the directory they submit from.
    suggested = os.path.normpath(out) if _is_relative(out) and not out.startswith("..") else "out"
    if target is not None and (_is_relative(out) or in_ray_working_dir(target)):
        errors.append(("output.path", (
            f"{out!r} would be written inside Ray's temporary copy of the working dir ({cwd}), which Ray "
            "deletes after the job and which differs on every node, so the results would be lost. Write an "
            "absolute path that every node sees (a shared filesystem), an s3:// or gs:// URI, or submit with "
            f"`-- python -m batchgen run SPEC --set output.path=$PWD/{suggested}` ($PWD is expanded by your "
            "shell, on the client)")))
    hint = ("`ray job submit --working-dir` uploads neither git-ignored files nor large files, so data and "
            "weights outside the repository must be named by an absolute path that every node sees "
            "(or an s3:// / gs:// URI for input)")
    for name, value in (("model.path", spec.model.path), ("model.tokenizer", spec.model.tokenizer),
                        ("input.path", spec.input.path)):
        if value is None or not _is_relative(value):
            continue
        local = os.path.join(cwd, os.path.expanduser(value))
        found = glob.glob(local) if any(c in value for c in "*?[") else os.path.exists(local)
        if not found:
            errors.append((name, f"{value!r} is not in the job's uploaded working dir ({cwd}); {hint}"))
    if errors:
        raise SpecError(errors)
