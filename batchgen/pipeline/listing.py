"""Listing files under an input root, safely: symlink cycles and hostile glob patterns.

``list_files`` walks a local directory following symlinks but entering each real directory
once and listing each real file once; ``GlobMatcher`` matches a glob in time linear in the path
times the pattern. :mod:`batchgen.pipeline.shards` uses both to find a job's Parquet files.
"""

from __future__ import annotations

import errno
import os
import re

import pyarrow.fs as pafs

from batchgen.pipeline.spec import SpecError


def list_files(fs: pafs.FileSystem, root: str, recursive: bool) -> list[tuple[str, int]]:
    """``(path relative to root, size)`` of every file below ``root`` (or in it, not ``recursive``).

    On a local disk symlinks are followed, but each real directory is entered once and each real
    file is listed once (under the first path the sorted walk meets it at), so a symlink cycle
    neither repeats files nor makes the walk exponential. Object stores have no links.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        selector = pafs.FileSelector(root, recursive=recursive, allow_not_found=True)
        return [(_relative(i.path, root), i.size) for i in fs.get_file_info(selector)
                if i.type == pafs.FileType.File]
    found: list[tuple[str, int]] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def walk(directory: str, rel: str) -> None:
        try:
            st = os.stat(directory)
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:  # a glob's root that does not exist: nothing matches
            return
        except OSError as exc:  # unreadable: refuse rather than silently leave its files out
            raise SpecError("input.path", f"cannot list {directory}: {exc.strerror or exc}") from None
        if (st.st_dev, st.st_ino) in seen_dirs:
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                est = entry.stat()  # follows links
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP):  # a dangling link or one to itself: no file
                    continue
                raise SpecError("input.path", f"cannot read {entry.path}: {exc.strerror or exc}") from None
            if entry.is_dir():
                if recursive:
                    walk(entry.path, path)
            elif entry.is_file() and (est.st_dev, est.st_ino) not in seen_files:
                seen_files.add((est.st_dev, est.st_ino))
                found.append((path, est.st_size))

    walk(root, "")
    return found


def _relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if path.startswith(root) else path


class GlobMatcher:
    """A glob over ``/``-separated paths, matched in ``O(len(path) * len(pattern))`` steps.

    ``*`` and ``?`` stay within a segment, ``[...]`` (``[!...]`` negated) is one character, ``**/``
    is zero or more whole directories and any other ``**`` is any run of characters. A regular
    expression of the same pattern backtracks: ``**/**/**/...`` against a deep path that does not
    match took 13 s and more. Here the path is read once, carrying the set of pattern positions
    it can be at (an NFA simulation), so no pattern can cost more than that product.
    """

    # Markers of the wildcards: never equal to a literal, which is one character.
    _STAR, _DSTAR, _DIRS, _ONE = "<*>", "<**>", "<**/>", "<?>"

    def __init__(self, pattern: str) -> None:
        self.tokens: list[str | re.Pattern[str]] = []
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                if self.tokens[-1:] != [self._DIRS]:  # **/**/ is the same as **/
                    self.tokens.append(self._DIRS)
                i += 3
            elif pattern.startswith("**", i):
                self.tokens.append(self._DSTAR)
                i += 2
            elif pattern[i] in "*?":
                self.tokens.append(self._STAR if pattern[i] == "*" else self._ONE)
                i += 1
            elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
                body = pattern[i + 1:end]
                body = "^" + body[1:] if body.startswith("!") else body
                self.tokens.append(re.compile("[" + body.replace("\\", "\\\\") + "]"))
                i = end + 1
            else:
                self.tokens.append(pattern[i])
                i += 1

    def _close(self, states: set[tuple[int, bool]]) -> set[tuple[int, bool]]:
        # Tokens that can match nothing let a position move past them for free; ``**/`` only
        # from its start, not from inside a directory name (the bool).
        todo, out = list(states), set(states)
        while todo:
            i, inside = todo.pop()
            if i < len(self.tokens) and not inside and self.tokens[i] in (self._STAR, self._DSTAR, self._DIRS):
                if (i + 1, False) not in out:
                    out.add((i + 1, False))
                    todo.append((i + 1, False))
        return out

    def _step(self, i: int, inside: bool, ch: str) -> list[tuple[int, bool]]:
        if i == len(self.tokens):
            return []
        tok = self.tokens[i]
        if tok == self._DIRS:  # (name/)*: inside a name until its '/'
            return [(i, False)] if ch == "/" else [(i, True)]
        if tok == self._DSTAR:
            return [(i, False)]
        if tok == self._STAR:
            return [(i, False)] if ch != "/" else []
        if tok == self._ONE:
            return [(i + 1, False)] if ch != "/" else []
        if isinstance(tok, re.Pattern):
            return [(i + 1, False)] if tok.fullmatch(ch) else []
        return [(i + 1, False)] if tok == ch else []

    def match(self, path: str) -> bool:
        """Whether the whole of ``path`` matches the pattern."""
        states = self._close({(0, False)})
        for ch in path:
            states = self._close({nxt for i, inside in states for nxt in self._step(i, inside, ch)})
            if not states:
                return False
        return (len(self.tokens), False) in states
