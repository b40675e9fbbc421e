"""Trust in the output directory: what batchgen wrote there, what it did not, and symlinks.

Two rules, checked by ``writer.check_output`` before a run writes or deletes anything:

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

import pyarrow.fs as pafs

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


def check_no_symlinks(fs: pafs.FileSystem, root: str, uri: str) -> None:
    """Refuse a local output with a symlink where batchgen reads or writes: one of its own names
    at the top level (``shards``, ``manifest.json``...) or anything inside ``shards/``/``parts/``.

    Raises:
        OutputError: naming the symlink and where it points.
    """
    from batchgen.pipeline.writer import OutputError, _is_local

    if not _is_local(fs) or not os.path.isdir(root):
        return
    _, links = _local_entries(root)
    if links:
        target = os.readlink(os.path.join(root, links[0]))
        raise OutputError("output.path", f"{uri} holds a symlink, {links[0]} -> {target}"
                                         f"{f' (and {len(links) - 1} more)' if len(links) > 1 else ''}; batchgen "
                                         "writes none and will not write or delete through one: remove it (or "
                                         "use another output.path)")


def foreign_entries(fs: pafs.FileSystem, root: str) -> list[str]:
    """Relpaths under ``root`` that batchgen did not write (directories and files, any depth)."""
    from batchgen.pipeline.writer import _is_local, with_retries

    if _is_local(fs):
        entries = _local_entries(root)[0] if os.path.isdir(root) else []
    else:
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        infos = with_retries(fs, f"listing {root}", lambda: fs.get_file_info(selector))
        base = root.rstrip("/") + "/"
        entries = [(i.path.removeprefix(base), i.type == pafs.FileType.Directory) for i in infos]
    return sorted(path for path, _ in entries if not is_ours(path))


def delete_ours(fs: pafs.FileSystem, root: str) -> None:
    """Delete what batchgen wrote under ``root`` (``mode: overwrite``), file by file, then its
    directories once empty: a file that appeared since the check is left where it is."""
    from batchgen.pipeline.writer import _is_local, with_retries

    if _is_local(fs):
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
    base = root.rstrip("/")
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    infos = with_retries(fs, f"listing {base}", lambda: fs.get_file_info(selector))
    for info in infos:
        if info.type == pafs.FileType.File and is_ours(info.path.removeprefix(base + "/")):
            with_retries(fs, f"deleting {info.path}", lambda p=info.path: fs.delete_file(p))


__all__ = ["check_no_symlinks", "delete_ours", "foreign_entries", "is_ours"]
