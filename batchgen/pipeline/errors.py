"""How a run that started can end badly (the spec's own errors are :class:`~batchgen.pipeline.spec.SpecError`)."""

from __future__ import annotations


class JobFailed(Exception):
    """The job ran but could not complete (a replica that cannot start, storage that stays down)."""


class JobStopped(JobFailed):
    """The run was stopped by a signal; the output is resumable. ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
