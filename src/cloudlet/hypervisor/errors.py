"""Errors of the VM runtime; each names the step that failed and keeps its cause chained."""

from __future__ import annotations

from typing import Any

from cloudlet.errors import ConflictError, VMError


class QemuStartError(VMError):
    """QEMU refused to start (bad option, missing file, port taken...)."""


class GuestNotReadyError(VMError):
    """The guest did not print its readiness marker in time; carries the console tail."""

    def __init__(self, message: str, *, console_tail: list[str], hint: str | None = None):
        self.console_tail = console_tail
        super().__init__(message, hint=hint)


class QmpCommandError(VMError):
    """A QMP command failed; keeps the command, QEMU's error class and the raw reply."""

    def __init__(self, command: str, error_class: str, desc: str, reply: Any = None) -> None:
        self.command = command
        self.error_class = error_class
        self.reply = reply
        super().__init__(f"QMP command {command!r} failed: {error_class}: {desc}")


class SnapshotError(VMError):
    """Saving or restoring a memory snapshot failed at a named step."""


class HardwareMismatchError(ConflictError):
    """A snapshot's hardware description does not match what this host would run."""

    def __init__(self, differences: dict[str, tuple[Any, Any]]) -> None:
        self.differences = differences
        parts = ", ".join(
            f"{k}: snapshot has {a!r}, this host {b!r}" for k, (a, b) in differences.items()
        )
        super().__init__(
            f"cannot resume: the snapshot's hardware description does not match ({parts})",
            hint="resume it on a cloudlet with the same QEMU version and accelerator, "
            "or boot a fresh VM from the image",
        )


class AgentError(VMError):
    """The guest agent did not answer or answered garbage."""
