"""TEST HOOK, never for production: failures injected into replicas on purpose (see :class:`Faults`)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

#: Environment variable of the driver that turns on :class:`Faults` (a test hook).
FAULTS_ENV = "BATCHGEN_FAULTS"
#: Exit status of a replica process that a fault hook or a CUDA error ends on purpose.
FAULT_EXIT_CODE = 87


@dataclass(frozen=True)
class Faults:
    """TEST HOOK, never for production: failures injected into replicas on purpose, so that tests
    can check that recovery really works. Inert unless ``BATCHGEN_FAULTS`` is set (in the
    driver's environment; the driver hands it to its replicas) to a JSON object with any of:

    - ``"raise_on": TEXT``: generating a group of rows in which a prompt contains TEXT raises a
      ``RuntimeError`` (after the first engine step), like an engine bug triggered by one row.
    - ``"exit_on": TEXT``: the same, but the replica process dies (``os._exit``), like a crash.
    - ``"exit_once_at": {POINT: MARKER_PATH}``: the first replica process that reaches POINT
      (``load``: before the model loads; ``publish``: output bytes staged, not yet visible)
      and manages to create the file MARKER_PATH exits; later ones find the file and go on.
    - ``"step_delay_s": SECONDS``: sleep after every engine step, as a bigger model would take,
      so that a test's kills land in the middle of a job made for a tiny model.
    - ``"publish_delay_s": SECONDS``: sleep before every shard's output is made visible, as a
      slow object store would, so that a test can check what happens meanwhile.
    """

    raise_on: Optional[str] = None
    exit_on: Optional[str] = None
    exit_once_at: dict[str, str] = field(default_factory=dict)
    step_delay_s: float = 0.0
    publish_delay_s: float = 0.0

    POINTS = ("load", "publish")

    @classmethod
    def parse(cls, raw: Optional[str]) -> Optional["Faults"]:
        """The faults described by ``raw`` (JSON), or None when it is empty.

        Raises:
            ValueError: naming the unknown key or point, or saying why the JSON is invalid.
        """
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{FAULTS_ENV} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{FAULTS_ENV} must be a JSON object")
        unknown = set(data) - {"raise_on", "exit_on", "exit_once_at", "step_delay_s", "publish_delay_s"}
        if unknown:
            raise ValueError(f"{FAULTS_ENV}: unknown key(s) {sorted(unknown)}")
        points = data.get("exit_once_at", {})
        if not isinstance(points, dict) or set(points) - set(cls.POINTS):
            raise ValueError(f"{FAULTS_ENV}: exit_once_at maps points {cls.POINTS} to marker files")
        return cls(data.get("raise_on"), data.get("exit_on"), dict(points), float(data.get("step_delay_s", 0)),
                   float(data.get("publish_delay_s", 0)))

    def on_step(self) -> None:
        """Called after every engine step."""
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def on_rows(self, prompts: Sequence[Optional[str]]) -> None:
        """Called while a group of rows is being generated."""
        if self.exit_on and any(p and self.exit_on in p for p in prompts):
            exit_replica(f"a prompt contains {self.exit_on!r}")
        if self.raise_on and any(p and self.raise_on in p for p in prompts):
            raise RuntimeError(f"injected fault: a prompt contains {self.raise_on!r}")

    def at(self, point: str) -> None:
        """Called when a replica reaches ``point``; exits if this process is the first there."""
        if point == "publish" and self.publish_delay_s:
            time.sleep(self.publish_delay_s)
        marker = self.exit_once_at.get(point)
        if marker is None:
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        exit_replica(f"first replica at {point!r}")


def exit_replica(why: str) -> None:
    """End this replica process on purpose (Ray restarts it), saying why on stderr."""
    print(f"batchgen replica pid {os.getpid()}: exiting on purpose ({why})", file=sys.stderr, flush=True)
    os._exit(FAULT_EXIT_CODE)
