from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudlet.overlay import BaseRef, CreateStats, create_overlay
from overlay.overlay_testlib import SynthVM, make_base, make_vm

HARDWARE = {"machine": "pc-i440fx-7.2", "cpu": "qemu64", "memory_mib": 64, "qemu": "7.2"}


@dataclass
class Built:
    base: BaseRef
    vm: SynthVM
    overlay: Path
    stats: CreateStats


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """One base, one VM made from it, and its overlay: shared by the read-only tests."""
    root = tmp_path_factory.mktemp("synth")
    base = make_base(root / "base")
    vm = make_vm(base, root / "vm")
    out = root / "out" / "vm.overlay"
    stats = create_overlay(base, vm.vm_dir, out, hardware=HARDWARE, meta={"service": "t"})
    return Built(base, vm, out, stats)
