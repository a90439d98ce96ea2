"""The root of every error cloudlet raises on purpose.

Each class carries the exit code the CLI uses and the HTTP status the API uses, so that both
thin layers map errors the same way (borg's ``exit_mcode``; Starlette's handler-by-class).
Messages say what went wrong *and what to do*.

    CloudletError
    ├── NotFoundError           (missing image, VM, base, ...)
    ├── ConflictError           (in use, wrong state, already exists)
    ├── InvalidInputError       (bad name, bad size, bad file)
    ├── EnvironmentProblem      (QEMU missing, tool missing, no disk space)
    ├── IntegrityError          (a checksum or format check failed)
    └── VMError                 (hypervisor/...: start, QMP, snapshot failures)
"""

from __future__ import annotations


class CloudletError(Exception):
    """Base class: a failure we understand and can explain to a user."""

    exit_code: int = 1
    status_code: int = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")

    def to_dict(self) -> dict[str, object]:
        return {"error": type(self).__name__, "message": self.message, "hint": self.hint}


class NotFoundError(CloudletError):
    exit_code = 3
    status_code = 404


class ConflictError(CloudletError):
    exit_code = 4
    status_code = 409


class InvalidInputError(CloudletError):
    exit_code = 2
    status_code = 422


class EnvironmentProblem(CloudletError):
    exit_code = 5
    status_code = 503


class IntegrityError(CloudletError):
    exit_code = 6
    status_code = 422


class VMError(CloudletError):
    exit_code = 7
    status_code = 500
