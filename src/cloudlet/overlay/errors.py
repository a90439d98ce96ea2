"""Errors of the overlay package, each naming what failed and where.

    CloudletError
    ├── InvalidInputError
    │   ├── OverlayInputError        (create: missing or inconsistent VM/base files)
    │   ├── OverlayVersionError      (format major differs, or minor is newer than ours)
    │   ├── OverlayFeatureUnsupported(the manifest requires a feature we do not know)
    │   └── Qcow2Error               (qemu-img failed, or a qcow2 we cannot read/write)
    ├── ConflictError
    │   ├── OverlayBaseMismatch      (the overlay was made for another base VM)
    │   └── OverlayOutputExists      (apply would overwrite existing files)
    ├── EnvironmentProblem
    │   └── OverlayIOError           (reading inputs or writing outputs failed: ENOSPC, EIO)
    ├── IntegrityError
    │   └── OverlayCorrupt           (hash, magic or bounds check failed; names the part)
    │       └── OverlayTruncated     (the stream ended early)
    └── OverlayStreamError           (the chunk source raised, e.g. a network error)

``OverlayStreamError`` is deliberately not an ``IntegrityError``: a dropped download is worth
retrying, a corrupt file is not.
"""

from __future__ import annotations

import errno as _errno

from cloudlet.errors import (
    CloudletError,
    ConflictError,
    EnvironmentProblem,
    IntegrityError,
    InvalidInputError,
)


class OverlayInputError(InvalidInputError):
    """The VM or base files given to ``create_overlay`` are missing or inconsistent."""


class Qcow2Error(InvalidInputError):
    """qemu-img failed on a qcow2 file, or the file uses something we cannot handle."""


class OverlayVersionError(InvalidInputError):
    """The file's format version is not one this reader accepts."""

    def __init__(self, found: tuple[int, int], supported: tuple[int, int]) -> None:
        self.found = found
        self.supported = supported
        f, s = f"{found[0]}.{found[1]}", f"{supported[0]}.{supported[1]}"
        if found[0] != supported[0]:
            why = f"overlay format {f} has another major version than this reader's {s}"
        else:
            why = f"overlay format {f} is newer than this reader's {s}"
        super().__init__(why, hint="upgrade cloudlet on this host, or re-create the overlay")


class OverlayFeatureUnsupported(InvalidInputError):
    """The manifest lists a required feature this reader does not implement."""

    def __init__(self, features: list[str]) -> None:
        self.features = features
        super().__init__(
            f"overlay requires unsupported feature(s): {', '.join(features)}",
            hint="upgrade cloudlet on this host",
        )


class OverlayBaseMismatch(ConflictError):
    """The overlay was made against a different base VM than the one offered."""

    def __init__(self, overlay_base: str, local_base: str, detail: str = "") -> None:
        self.overlay_base = overlay_base
        self.local_base = local_base
        msg = f"overlay is for base {overlay_base!r}, but the base given is {local_base!r}"
        super().__init__(msg + (f" ({detail})" if detail else ""), hint="fetch the right base VM")


class OverlayOutputExists(ConflictError):
    """apply would overwrite files that already exist in the output directory."""


class OverlayIOError(EnvironmentProblem):
    """An OS-level read or write failed; ``step`` says which, ``errno`` why."""

    def __init__(self, step: str, exc: OSError) -> None:
        self.step = step
        self.errno = exc.errno
        hint = None
        if exc.errno == _errno.ENOSPC:
            hint = "free space on the target filesystem and retry"
        elif exc.errno == _errno.EDQUOT:
            hint = "raise the disk quota and retry"
        super().__init__(f"I/O error while {step}: {exc.strerror or exc}", hint=hint)


class OverlayCorrupt(IntegrityError):
    """A magic, hash, length or bounds check failed.

    ``part`` names where: ``"header"``, ``"manifest"``, ``"segment 7"``, ``"trailer"``;
    ``segment`` is the segment number (or None).
    """

    def __init__(self, part: str, detail: str, *, segment: int | None = None) -> None:
        self.part = part
        self.segment = segment
        super().__init__(
            f"overlay is corrupt in {part}: {detail}",
            hint="download or copy the overlay again; it cannot be applied",
        )


class OverlayTruncated(OverlayCorrupt):
    """The overlay ended before ``part`` was complete."""


class OverlayStreamError(CloudletError):
    """The source of overlay bytes (a file read loop, an HTTP download) raised."""

    status_code = 502

    def __init__(self, offset: int, exc: BaseException) -> None:
        self.offset = offset
        super().__init__(
            f"reading the overlay failed after {offset} bytes: {type(exc).__name__}: {exc}",
            hint="retry the download",
        )


__all__ = [
    "OverlayBaseMismatch",
    "OverlayCorrupt",
    "OverlayFeatureUnsupported",
    "OverlayIOError",
    "OverlayInputError",
    "OverlayOutputExists",
    "OverlayStreamError",
    "OverlayTruncated",
    "OverlayVersionError",
    "Qcow2Error",
]
