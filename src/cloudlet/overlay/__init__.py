"""VM overlays: the difference between a VM and its base VM, as one verifiable file.

``create_overlay`` makes one (memory pages, disk clusters, device state), ``apply_overlay``
streams one onto a base (synthesis), ``overlay_info`` describes one. The byte format is in
:mod:`cloudlet.overlay.format` and docs/overlay-format.md.
"""

from cloudlet.overlay.apply import ApplyStats, apply_overlay, overlay_info
from cloudlet.overlay.base import BaseRef
from cloudlet.overlay.create import CreateStats, create_overlay
from cloudlet.overlay.errors import (
    OverlayBaseMismatch,
    OverlayCorrupt,
    OverlayFeatureUnsupported,
    OverlayInputError,
    OverlayIOError,
    OverlayOutputExists,
    OverlayStreamError,
    OverlayTruncated,
    OverlayVersionError,
    Qcow2Error,
)
from cloudlet.overlay.format import FORMAT_VERSION, file_chunks
from cloudlet.overlay.index import PageLookup, load_index, page_index, save_index

__all__ = [
    "FORMAT_VERSION",
    "ApplyStats",
    "BaseRef",
    "CreateStats",
    "OverlayBaseMismatch",
    "OverlayCorrupt",
    "OverlayFeatureUnsupported",
    "OverlayIOError",
    "OverlayInputError",
    "OverlayOutputExists",
    "OverlayStreamError",
    "OverlayTruncated",
    "OverlayVersionError",
    "PageLookup",
    "Qcow2Error",
    "apply_overlay",
    "create_overlay",
    "file_chunks",
    "load_index",
    "overlay_info",
    "page_index",
    "save_index",
]
