"""TEST HOOK, never for production: failures injected into replicas on purpose (see :class:`Faults`).

Production code reaches this module at one marked seam only (:func:`batchgen.pipeline.replica.test_hooks`),
and only when ``BATCHGEN_FAULTS`` is set: the hook then wraps the replica's engine
(:class:`FaultyEngine`, as tensor parallelism wraps the model with its own hooks), so that the
pipeline's own structures carry no test state, and it says loudly that it is active
(:meth:`Faults.announce`) in the driver and in every replica.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from batchgen.pipeline.exits import exit_replica

log = logging.getLogger("batchgen")

#: Environment variable of the driver that turns on :class:`Faults` (a test hook).
FAULTS_ENV = "BATCHGEN_FAULTS"


@dataclass(frozen=True)
class Faults:
    """TEST HOOK, never for production: failures injected into replicas on purpose, so that tests
    can check that recovery really works. Inert unless ``BATCHGEN_FAULTS`` is set (in the
    driver's environment; the driver hands it to its replicas) to a JSON object with any of:

    - ``"raise_on": TEXT``: the first engine step after rows were added of which a prompt
      contains TEXT raises a ``RuntimeError``, like an engine bug triggered by one row.
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

    def announce(self, where: str) -> None:
        """Log, loudly, that the test hook is active in ``where`` (the driver, a replica)."""
        log.warning("!!! TEST HOOK ACTIVE in %s: %s=%s injects failures on purpose; never set it outside "
                    "batchgen's own tests !!!", where, FAULTS_ENV, json.dumps(self._raw(), sort_keys=True))

    def _raw(self) -> dict[str, Any]:
        return {k: v for k, v in (("raise_on", self.raise_on), ("exit_on", self.exit_on),
                                  ("exit_once_at", self.exit_once_at), ("step_delay_s", self.step_delay_s),
                                  ("publish_delay_s", self.publish_delay_s)) if v}

    def wrap(self, engine: Any) -> "FaultyEngine":
        """``engine`` with these faults injected into its steps."""
        return FaultyEngine(engine, self)

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


class FaultyEngine:
    """TEST HOOK: an engine (:class:`~batchgen.engine.LLM` or its tensor-parallel leader) with
    :class:`Faults` injected: every call goes to the real engine, and each :meth:`step` first
    checks the prompts added since the step before (``raise_on``/``exit_on``), then sleeps
    ``step_delay_s`` after it."""

    def __init__(self, engine: Any, faults: Faults) -> None:
        self.engine = engine
        self.faults = faults
        self._new: dict[str, str] = {}  # request id -> prompt text, added since the last step

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def add_request(self, prompt: Any, params: Any, request_id: Optional[str] = None) -> str:
        rid = self.engine.add_request(prompt, params, request_id=request_id)
        if isinstance(prompt, str):
            self._new[rid] = prompt
        elif self.engine.tokenizer is not None:  # a chat row arrives as token ids
            self._new[rid] = self.engine.tokenizer.decode(list(prompt))
        return rid

    def abort(self, request_ids: Any) -> None:
        request_ids = list(request_ids)
        for rid in request_ids:
            self._new.pop(rid, None)
        self.engine.abort(request_ids)

    def abort_all(self) -> None:
        self._new.clear()
        self.engine.abort_all()

    def step(self) -> list:
        prompts, self._new = list(self._new.values()), {}
        if prompts:
            self.faults.on_rows(prompts)
        outs = self.engine.step()
        self.faults.on_step()
        return outs
