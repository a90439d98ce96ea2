"""Handoff errors: each names the step that failed; the cause is chained."""

from __future__ import annotations

from cloudlet.errors import CloudletError, ConflictError


class HandoffError(CloudletError):
    """A handoff failed. ``step`` says where; the source VM was left running."""

    exit_code = 9
    status_code = 502

    def __init__(self, step: str, message: str, *, hint: str | None = None) -> None:
        self.step = step
        super().__init__(f"handoff failed while {step}: {message}", hint=hint)


class HandoffPrepareError(HandoffError):
    """The destination refused the handoff before anything was paused (e.g. lacks the base)."""

    status_code = 409


class HandoffTransferError(HandoffError):
    """The link or the destination failed while memory and disk were being sent."""


class HandoffRestoreError(HandoffError):
    """The destination could not restore and resume the VM."""


class HandoffBusy(ConflictError):
    """A handoff of this VM is already running."""
