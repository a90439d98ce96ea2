"""Long-running actions (create a base, start an instance, import a package) as operations.

Every such action gets an id, persisted state and progress, live events and cancellation;
see :mod:`.runner`.
"""

from cloudlet.operations.runner import (
    CANCELLED,
    FAILED,
    FINAL,
    PENDING,
    RUNNING,
    SUCCEEDED,
    OperationContext,
    OperationRunner,
)

__all__ = [
    "CANCELLED",
    "FAILED",
    "FINAL",
    "PENDING",
    "RUNNING",
    "SUCCEEDED",
    "OperationContext",
    "OperationRunner",
]
