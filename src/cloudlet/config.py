"""Where cloudlet keeps its data.

Everything lives under ``CLOUDLET_HOME`` (default ``~/.local/share/cloudlet``)::

    images/<name>/      guest images (image.json, kernel, initrd, disk)
    bases/<name>/       base VMs
    vms/<id>/           one directory per VM
    cache/              downloaded .deb files, accelerator probe result
    tmp/                work areas; renamed into place when complete
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def images(self) -> Path:
        return self.home / "images"

    @property
    def bases(self) -> Path:
        return self.home / "bases"

    @property
    def vms(self) -> Path:
        return self.home / "vms"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    def ensure(self) -> Paths:
        """Create the layout. A new home is private (0700): it holds the VMs' RAM files, that
        is their guests' memory, and the catalog. An existing one is left as its owner set it."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        for p in (self.images, self.bases, self.vms, self.cache, self.tmp):
            p.mkdir(parents=True, exist_ok=True)
        return self


def default_home() -> Path:
    env = os.environ.get("CLOUDLET_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path("~/.local/share/cloudlet").expanduser().resolve()


def paths(home: Path | str | None = None) -> Paths:
    """The data layout for ``home`` (or ``CLOUDLET_HOME``), created if missing."""
    return Paths(Path(home).resolve() if home is not None else default_home()).ensure()
