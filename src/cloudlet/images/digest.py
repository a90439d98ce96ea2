"""The content id of an image: one sha256 over what the guest sees (kernel, initrd, raw disk).

It names the guest-visible bytes, not the container: the same disk stored as raw or as qcow2
(any cluster size) has the same id, so base VMs and overlays can refer to an image by content.
Each part is framed by its label and length, so moving bytes between parts changes the id.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 4 * 1024 * 1024
_DOMAIN = b"cloudlet-image-content-v1\n"


def _feed(h: hashlib._Hash, label: str, path: Path | None) -> None:
    if path is None:
        h.update(f"{label} -\n".encode())
        return
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        h.update(f"{label} {size}\n".encode())
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])


def content_id(kernel: Path | None, initrd: Path | None, raw_disk: Path) -> str:
    """Hex sha256 over the kernel, the initrd and the disk's raw (guest-visible) bytes."""
    h = hashlib.sha256(_DOMAIN)
    _feed(h, "kernel", kernel)
    _feed(h, "initrd", initrd)
    _feed(h, "disk", raw_disk)
    return h.hexdigest()
