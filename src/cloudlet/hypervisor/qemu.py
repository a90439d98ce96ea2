"""Finding QEMU and its tools, and learning their version."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

from cloudlet.errors import EnvironmentProblem

QEMU_SYSTEM = "qemu-system-x86_64"
INSTALL_HINT = "install QEMU: sudo apt-get install qemu-system-x86 qemu-utils (or run bin/setup)"


# Which Debian package ships each tool we run.
_PACKAGES = {
    QEMU_SYSTEM: "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
}


def find_tool(name: str) -> str:
    """Absolute path of a QEMU tool, or an EnvironmentProblem that says how to install it."""
    path = shutil.which(name)
    if path is None:
        pkg = _PACKAGES.get(name, "qemu-system-x86 qemu-utils")
        raise EnvironmentProblem(
            f"{name} is not installed (not found on PATH)",
            hint=f"install QEMU: sudo apt-get install {pkg} (or run bin/setup)",
        )
    return path


def qemu_binary() -> str:
    return find_tool(QEMU_SYSTEM)


@functools.cache
def qemu_version(binary: str | None = None) -> str:
    """QEMU's version string, e.g. ``"7.2.22"`` (part of every hardware description)."""
    out = subprocess.run(
        [binary or qemu_binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    if not m:
        raise EnvironmentProblem(f"cannot parse the QEMU version from {out!r}", hint=INSTALL_HINT)
    return m.group(1)


@functools.cache
def default_machine(binary: str | None = None) -> str:
    """The concrete versioned machine type behind the ``pc`` alias (e.g. ``pc-i440fx-7.2``).

    Snapshots must record the versioned name: the alias moves between QEMU releases.
    """
    out = subprocess.run(
        [binary or qemu_binary(), "-machine", "help"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"^pc\s+.*\(alias of (\S+)\)", out, re.MULTILINE)
    if not m:
        raise EnvironmentProblem("cannot find QEMU's default 'pc' machine type", hint=INSTALL_HINT)
    return m.group(1)
