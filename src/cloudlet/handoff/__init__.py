"""VM handoff: move a running VM to another cloudlet, sending only what it lacks.

- :mod:`.wire`         the frame format on the wire (versioned; records shared with overlays)
- :mod:`.adaptive`     per-frame compression choice from measured link and CPU rates
- :mod:`.source`       pre-copy rounds, convergence, stop-and-copy, rollback on failure
- :mod:`.destination`  incoming sessions: rebuild RAM and disk, resume, confirm
- :mod:`.link`         how the source talks to a destination (HTTP, or in-process for tests)
"""

from cloudlet.handoff.errors import (
    HandoffError,
    HandoffPrepareError,
    HandoffRestoreError,
    HandoffTransferError,
)

__all__ = ["HandoffError", "HandoffPrepareError", "HandoffRestoreError", "HandoffTransferError"]
