"""The image record: what a guest image is made of and how to boot it.

An image lives in ``<home>/images/<name>/`` with an ``image.json`` manifest (this class, format
version 1) beside its files. File names in the manifest are bare names inside that directory,
never paths, so a manifest cannot point outside its image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cloudlet.errors import IntegrityError
from cloudlet.util.names import check_name

IMAGE_MANIFEST = "image.json"
IMAGE_FORMAT_VERSION = 1

# The guest prints this on its serial console once its services and agent are up.
READY_MARKER = "CLOUDLET-READY"


@dataclass
class Image:
    name: str
    disk: str  # file name inside the image dir
    disk_format: str  # "qcow2" or "raw"
    content_id: str  # hex digest of the guest-visible content (kernel, initrd, raw disk)
    kernel: str | None = None  # file name, or None for BIOS boot from the disk
    initrd: str | None = None
    cmdline: str | None = None  # kernel command line
    ports: list[int] = field(default_factory=list)  # guest ports the image serves
    agent: bool = False  # runs the cloudlet guest agent on virtio-serial
    ready_marker: str | None = None  # serial console line that means "ready"
    source: str = "import"  # "build-tiny" | "import"
    created: str = ""
    disk_size: int = 0  # virtual size in bytes
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = IMAGE_FORMAT_VERSION
    dir: Path = field(default=Path("."), compare=False, repr=False)

    def file(self, name: str | None) -> Path | None:
        if name is None:
            return None
        check_name(name, "image file name")
        return self.dir / name

    @property
    def disk_path(self) -> Path:
        p = self.file(self.disk)
        assert p is not None
        return p

    @property
    def kernel_path(self) -> Path | None:
        return self.file(self.kernel)

    @property
    def initrd_path(self) -> Path | None:
        return self.file(self.initrd)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("dir")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path) -> Image:
        if d.get("format_version") != IMAGE_FORMAT_VERSION:
            raise IntegrityError(
                f"image manifest in {directory} has format version {d.get('format_version')!r}, "
                f"this cloudlet reads {IMAGE_FORMAT_VERSION}",
                hint="rebuild or re-import the image",
            )
        known = {f for f in cls.__dataclass_fields__ if f != "dir"}
        img = cls(**{k: v for k, v in d.items() if k in known}, dir=directory)
        check_name(img.name, "image name")
        for f in (img.disk, img.kernel, img.initrd):
            if f is not None:
                check_name(f, "image file name")
        if img.disk_format not in ("qcow2", "raw"):
            raise IntegrityError(f"image {img.name}: unknown disk format {img.disk_format!r}")
        return img
