"""The hardware description: everything that must be identical to resume a snapshot.

QEMU restores device state only into a machine built exactly like the one that saved it.
We record the guest-visible shape of the machine (not host-side details such as paths, socket
names or host ports, which are overridable at resume, as Firecracker does with its network
overrides) and rebuild the QEMU command line from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cloudlet.errors import IntegrityError

HARDWARE_FORMAT_VERSION = 1

# Guest-visible devices, in the order they are created. Changing this list changes the
# hardware description, so snapshots taken with another list are refused on resume.
DEVICES_V1: tuple[str, ...] = (
    "virtio-blk-pci:disk0",
    "virtio-net-pci:net0:mac=52:54:00:12:34:56",
    "virtio-serial-pci",
    "virtserialport:org.cloudlet.agent",
    "isa-serial:console",
)


@dataclass(frozen=True)
class Hardware:
    machine: str  # concrete versioned machine type, e.g. "pc-i440fx-7.2"
    cpu_model: str
    accel: str  # "tcg" | "kvm"
    memory_mib: int
    cpus: int
    qemu_version: str
    boot: str  # "kernel" (direct kernel boot) or "bios"
    cmdline: str | None = None
    kernel_sha256: str | None = None
    initrd_sha256: str | None = None
    disk_format: str = "qcow2"  # format of the VM's own disk layer
    devices: tuple[str, ...] = field(default=DEVICES_V1)
    format_version: int = HARDWARE_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        if not isinstance(d, dict) or d.get("format_version") != HARDWARE_FORMAT_VERSION:
            raise IntegrityError(
                f"unsupported hardware description (format {d.get('format_version')!r})"
                if isinstance(d, dict)
                else "hardware description is not an object"
            )
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise IntegrityError(f"hardware description has unknown fields {sorted(unknown)}")
        kw = dict(d)
        kw["devices"] = tuple(kw.get("devices", DEVICES_V1))
        try:
            hw = cls(**kw)
        except TypeError as e:
            raise IntegrityError(f"hardware description is incomplete: {e}") from e
        if not (16 <= hw.memory_mib <= 1 << 20) or not (1 <= hw.cpus <= 64):
            raise IntegrityError(
                f"hardware description has absurd sizes: {hw.memory_mib} MiB, {hw.cpus} CPUs"
            )
        if hw.accel not in ("tcg", "kvm"):
            raise IntegrityError(f"hardware description has unknown accelerator {hw.accel!r}")
        return hw

    def differences(self, other: Hardware) -> dict[str, tuple[Any, Any]]:
        """Fields that differ, as ``{name: (self_value, other_value)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024
