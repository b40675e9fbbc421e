"""Trust in the output directory: what batchgen wrote there, what it did not, and symlinks.

Two rules, applied by ``writer.check_output`` before a run writes or deletes anything:

- **No symlinks in batchgen's layout under a local output path.** batchgen writes none; a
  ``shards`` (or ``parts``, or ``shards/<id>.parquet``...) symlink would send the results, and a
  later overwrite's deletions, somewhere else, or pass a foreign file off as a committed shard.
  The output path itself may be a symlink (a big disk mounted elsewhere is a user's choice).
- **``mode: overwrite`` deletes only what batchgen writes**, recognised by name
  (:func:`is_ours`): the top-level files of its layout, ``shards/<shard id>.parquet``,
  ``parts/<shard id>/<shard id>@<rows>.parquet`` and the hidden temp files of killed writers.
  Anything else, at any depth, makes it refuse, naming the file.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import pyarrow.fs as pafs

#: ``retry(what, call)``: runs one storage call with the writer's retries (``writer.with_retries``).
Retry = Callable[[str, Callable[[], Any]], Any]

# Names as writer.py and shards._make_shard / driver._pieces make them.
_SHARD_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{10}"
_TMP = r"\.tmp-[0-9a-f]{32}-[^/]+\.partial"
_OURS = re.compile(
    r"(manifest\.json|runs\.json|summary\.parquet|_SUCCESS|" + _TMP + r")"
    r"|shards(/(" + _SHARD_ID + r"\.parquet|" + _TMP + r"))?"
    r"|parts(/" + _SHARD_ID + r"(/(" + _SHARD_ID + r"@\d+-\d+\.parquet|" + _TMP + r"))?)?"
)


def is_ours(relpath: str) -> bool:
    """Whether ``relpath`` (``/``-separated, relative to the output root) is a file or directory
    that batchgen writes."""
    return _OURS.fullmatch(relpath) is not None


def _local_entries(root: str) -> tuple[list[tuple[str, bool]], list[str]]:
    """What lies under a local ``root`` as (relpath, is a directory), and the symlinks among it.

    Symlinks are not followed, and only batchgen's own directories are entered (a foreign
    directory is listed, not walked): an output path that holds a large unrelated tree costs one
    listing of it."""
    entries: list[tuple[str, bool]] = []
    links: list[str] = []
    for top, dirs, files in os.walk(root, followlinks=False):
        rel = os.path.relpath(top, root)
        enter = []
        for name in sorted(dirs) + sorted(files):
            path = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
            full = os.path.join(top, name)
            is_dir = name in dirs and not os.path.islink(full)
            if os.path.islink(full):
                if rel != "." or is_ours(path):  # a foreign top-level link is no part of the output
                    links.append(path)
            elif is_dir and is_ours(path):
                enter.append(name)
            entries.append((path, is_dir))
        dirs[:] = enter
    return entries, links


def symlink_problem(root: str) -> str | None:
    """Why a local output directory ``root`` may not be used: a symlink where batchgen reads or
    writes (one of its own names at the top level, ``shards``, ``manifest.json``..., or anything
    inside ``shards/``/``parts/``), or None."""
    if not os.path.isdir(root):
        return None
    links = _local_entries(root)[1]
    if not links:
        return None
    more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
    return (f"holds a symlink, {links[0]} -> {os.readlink(os.path.join(root, links[0]))}{more}; batchgen writes "
            "none and will not write or delete through one: remove it (or use another output.path)")


def foreign_entries(fs: pafs.FileSystem, root: str, local: bool, retry: Retry) -> list[str]:
    """Relpaths under ``root`` that batchgen did not write (directories and files, any depth;
    a foreign directory is named, not walked). ``retry(what, call)`` runs a storage call."""
    if local:
        entries = _local_entries(root)[0] if os.path.isdir(root) else []
    else:
        entries = [(path, info.type == pafs.FileType.Directory) for path, info in _remote(fs, root, retry)]
    return sorted(path for path, _ in entries if not is_ours(path))


def delete_ours(fs: pafs.FileSystem, root: str, local: bool, retry: Retry) -> None:
    """Delete what batchgen wrote under ``root`` (``mode: overwrite``), file by file, then its
    directories once empty: a file that appeared since the check is left where it is."""
    if local:
        if not os.path.isdir(root):
            return
        entries = _local_entries(root)[0]
        for path, is_dir in entries:
            if not is_dir and is_ours(path):
                os.remove(os.path.join(root, path))
        for path, is_dir in sorted(entries, key=lambda e: -e[0].count("/")):  # deepest first
            if is_dir and is_ours(path):
                try:
                    os.rmdir(os.path.join(root, path))  # only ever removes an empty directory
                except OSError:
                    pass
        return
    for path, info in _remote(fs, root, retry):
        if info.type == pafs.FileType.File and is_ours(path):
            retry(f"deleting {info.path}", lambda p=info.path: fs.delete_file(p))


def _remote(fs: pafs.FileSystem, root: str, retry: Retry) -> list[tuple[str, pafs.FileInfo]]:
    """Everything under ``root`` on an object store, as (relpath, info)."""
    base = root.rstrip("/")
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return [(i.path.removeprefix(base + "/"), i) for i in retry(f"listing {base}", lambda: fs.get_file_info(selector))]


__all__ = ["delete_ours", "foreign_entries", "is_ours", "symlink_problem"]
