"""The VM runtime: QEMU driven directly over QMP, guest RAM as a file, memory snapshots.

Modules, one concept each:

- :mod:`.qemu`      finding QEMU and building its command line from a :class:`Hardware`
- :mod:`.hardware`  the hardware description: what must be identical to resume a snapshot
- :mod:`.qmp`       a thin typed session over ``qemu.qmp.QMPClient``
- :mod:`.accel`     the accelerator probe (KVM only if a real guest boots under it)
- :mod:`.ports`     host port forwards
- :mod:`.agent`     host side of the guest agent (virtio-serial)
- :mod:`.vm`        the VM: start, stop, suspend, resume, status
"""

from cloudlet.hypervisor.errors import (
    AgentError,
    GuestNotReadyError,
    HardwareMismatchError,
    QemuStartError,
    QmpCommandError,
    SnapshotError,
)
from cloudlet.hypervisor.hardware import Hardware
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.vm import VM, VMManager, VMState

__all__ = [
    "VM",
    "AgentError",
    "GuestNotReadyError",
    "Hardware",
    "HardwareMismatchError",
    "PortForward",
    "QemuStartError",
    "QmpCommandError",
    "SnapshotError",
    "VMManager",
    "VMState",
]
