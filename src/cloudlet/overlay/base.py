"""What the overlay engine needs to know about a base VM (the base-VM code constructs it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BaseRef:
    """A base VM's files as the overlay engine sees them.

    ``ram`` is the raw guest memory file, ``disk`` the raw disk that VM top layers use as
    backing file, and ``ram_index``/``disk_index`` their page hash indexes (``.npy`` from
    :func:`cloudlet.overlay.index.page_index`). ``base_id`` is the content id that overlays
    record and that apply checks before writing anything.
    """

    base_id: str
    ram: Path
    disk: Path
    ram_index: Path
    disk_index: Path
