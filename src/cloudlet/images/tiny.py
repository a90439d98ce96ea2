"""``build-tiny``: a small, reproducible service image made only from Debian packages.

Debian's cloud kernel + a busybox-static userland + our guest scripts (``guest/``): it boots
under TCG in a few seconds, serves HTTP on port 80 with a counter that lives both in memory and
on disk (so snapshots and reboots are observable), and runs the cloudlet guest agent. The same
packages give the same content id: file modes and times are fixed, the initramfs is written by
our own cpio writer, and ``mke2fs`` gets a fixed UUID, hash seed and clock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from cloudlet.config import Paths
from cloudlet.errors import ConflictError, EnvironmentProblem
from cloudlet.images.debs import (
    BUSYBOX_PACKAGE,
    KERNEL_METAPACKAGE,
    Package,
    deb_cache_dir,
    fetch_package,
)
from cloudlet.images.digest import content_id
from cloudlet.images.initramfs import FIXED_MTIME, INITRAMFS_APPLETS, MODULES, build_initramfs
from cloudlet.images.model import READY_MARKER, Image
from cloudlet.images.store import ImageStore, now_iso, qemu_img
from cloudlet.util.names import check_name

Progress = Callable[[str], None]

DISK_SIZE = 1 << 30  # virtual size of the root disk
# Fixed so that two builds give the same file system (the UUID also seeds the checksums).
FS_UUID = "c1a0d1e7-0000-4000-8000-000000000001"
FS_HASH_SEED = "c1a0d1e7-0000-4000-8000-000000000002"
FS_LABEL = "cloudlet-root"
# Measured under TCG (QEMU 7.2, Debian 6.1 cloud kernel): marker ~2.5-3.0 s after QEMU starts.
# quiet: printing to the emulated UART is slow. cryptomgr.notests: skips the crypto self-tests
# (~0.2 s). panic=-1: reboot at once instead of hanging (QEMU with -no-reboot then exits).
# Not used: pci=noacpi saves ~0.4 s but makes virtio-pci's MSI-X setup WARN; 8250.nr_uarts=1,
# no_timer_check and mitigations=off made no measurable difference.
TINY_CMDLINE = "console=ttyS0 quiet panic=-1 cryptomgr.notests"
TINY_PORTS = (80,)

# (source file in guest/, path in the root file system, permissions)
GUEST_FILES: tuple[tuple[str, str, int], ...] = (
    ("cloudlet-init.sh", "sbin/cloudlet-init", 0o755),
    ("agent.sh", "usr/lib/cloudlet/agent.sh", 0o755),
    ("httpd.sh", "etc/cloudlet/services.d/httpd.sh", 0o644),
    ("counterd.sh", "etc/cloudlet/services.d/counterd.sh", 0o644),
    ("counter.cgi", "www/cgi-bin/counter", 0o755),
    ("index.html", "www/index.html", 0o644),
    ("acpi-power-button.sh", "etc/acpi/PWRF/00000080", 0o755),
)

STATIC_FILES: tuple[tuple[str, str, int], ...] = (
    ("etc/hostname", "cloudlet\n", 0o644),
    ("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 cloudlet\n", 0o644),
    ("etc/resolv.conf", "nameserver 10.0.2.3\n", 0o644),
    (
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    ),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
    ("etc/os-release", 'NAME="cloudlet tiny"\nID=cloudlet-tiny\n', 0o644),
    ("var/lib/cloudlet/counter", "0\n", 0o644),
    # cloudlet-init prints the ready marker once these TCP ports listen
    ("etc/cloudlet/ports", "".join(f"{p}\n" for p in TINY_PORTS), 0o644),
)

EMPTY_DIRS: tuple[tuple[str, int], ...] = (
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("mnt", 0o755),
    ("var/log", 0o755),
)


def recipe_id() -> str:
    """A hash of what this code puts into the image besides the packages (scripts, settings).

    Stored in ``extra["recipe"]``: a cached tiny image whose recipe differs from the running
    code's was built by older scripts and should be rebuilt. No apt access needed.
    """
    h = hashlib.sha256(b"cloudlet-tiny-recipe-v1\n")
    for src, dst, perm in GUEST_FILES:
        h.update(f"{src} {dst} {perm:o}\n".encode() + guest_file(src))
    h.update(guest_file("init.sh"))
    settings = (
        TINY_CMDLINE,
        TINY_PORTS,
        DISK_SIZE,
        FS_UUID,
        FS_HASH_SEED,
        FIXED_MTIME,
        MODULES,
        STATIC_FILES,
        EMPTY_DIRS,
        INITRAMFS_APPLETS,
    )
    h.update(repr(settings).encode())
    return h.hexdigest()


def guest_file(name: str) -> bytes:
    """A guest-side script shipped as package data in ``cloudlet/images/guest/``."""
    return (resources.files("cloudlet.images") / "guest" / name).read_bytes()


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pkg = {"mke2fs": "e2fsprogs", "debugfs": "e2fsprogs", "qemu-img": "qemu-utils"}.get(
            name, name
        )
        raise EnvironmentProblem(f"{name} is not installed", hint=f"apt-get install {pkg}")
    return path


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of every applet (``bin/sh``, ``usr/sbin/httpd``...), from the binary."""
    r = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        raise EnvironmentProblem(f"cannot list the applets of {busybox}: {r.stderr.strip()}")
    skip = {"bin/busybox", "linuxrc"}
    return sorted({a.strip("/") for a in r.stdout.split() if a.strip("/") not in skip})


def _write(root: Path, rel: str, data: bytes, perm: int) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    p.chmod(perm)


def build_rootfs(tree: Path, busybox: Path) -> None:
    """Lay out the root file system in ``tree`` with fixed modes and times."""
    _write(tree, "bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        link = tree / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    for src, dst, perm in GUEST_FILES:
        _write(tree, dst, guest_file(src), perm)
    for dst, text, perm in STATIC_FILES:
        _write(tree, dst, text.encode(), perm)
    for d, perm in EMPTY_DIRS:
        (tree / d).mkdir(parents=True, exist_ok=True)
        (tree / d).chmod(perm)
    normalize_tree(tree)


def normalize_tree(tree: Path) -> None:
    """Fixed mtimes everywhere; directories 0755 unless set on purpose (umask-independent)."""
    special = {(tree / d).resolve() for d, _ in EMPTY_DIRS}
    for dirpath, dirnames, filenames in os.walk(tree, topdown=False):
        for n in filenames + dirnames:
            p = Path(dirpath) / n
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode) and p.resolve() not in special:
                p.chmod(0o755)
            os.utime(p, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    tree.chmod(0o755)
    os.utime(tree, (FIXED_MTIME, FIXED_MTIME))


def make_ext4(tree: Path, raw: Path, size: int = DISK_SIZE) -> None:
    """A reproducible ext4 raw image populated from ``tree``.

    lazy_itable_init=0/lazy_journal_init=0: the guest kernel must not zero inode tables in the
    background after boot, which would dirty the disk of every VM made from this image.
    """
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FIXED_MTIME))
    argv = [
        _tool("mke2fs"),
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-L",
        FS_LABEL,
        "-U",
        FS_UUID,
        "-E",
        f"hash_seed={FS_HASH_SEED},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        "-d",
        str(tree),
        str(raw),
        f"{size // 1024}k",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise EnvironmentProblem(
            f"mke2fs failed: {r.stderr.strip() or r.stdout.strip()}",
            hint="the tiny image needs e2fsprogs >= 1.43 (mke2fs -d)",
        )
    fix_inodes(tree, raw, env)


def fix_inodes(tree: Path, raw: Path, env: dict[str, str]) -> None:
    """Set ctime (copied from the host, where it cannot be set) and owner 0:0 on every inode.

    ``mke2fs -d`` copies st_ctime and st_uid/st_gid from the source tree; the ctime is the
    moment the build wrote the file, so without this two builds would differ.
    """
    cmds = []
    for rel in ["", *sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))]:
        if any(c in rel for c in ' "\\\n'):
            raise EnvironmentProblem(f"unexpected file name in the root file system: {rel!r}")
        for field, value in (("ctime", f"@{FIXED_MTIME}"), ("uid", "0"), ("gid", "0")):
            cmds.append(f'sif "/{rel}" {field} {value}\n')
    script = raw.with_suffix(".debugfs")
    script.write_text("".join(cmds))
    try:
        r = subprocess.run(
            [_tool("debugfs"), "-w", "-f", str(script), str(raw)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    finally:
        script.unlink()
    errors = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if r.returncode != 0 or errors:
        raise EnvironmentProblem(f"debugfs failed: {(errors or [r.stderr.strip()])[0]}")


def build_tiny(
    paths: Paths,
    name: str = "tiny",
    *,
    force: bool = False,
    progress: Progress | None = None,
    deb_cache: Path | None = None,
) -> Image:
    """Build the tiny image into ``<home>/images/<name>/`` and return its record.

    ``deb_cache`` overrides where .debs are cached (default ``deb_cache_dir(paths)``).
    """
    say = progress or (lambda _msg: None)
    check_name(name, "image name")
    store = ImageStore(paths)
    if store.dir(name).exists() and not force:
        raise ConflictError(
            f"an image named {name!r} already exists",
            hint=f"use --force to rebuild it, or `cloudlet image delete {name}`",
        )
    cache = deb_cache if deb_cache is not None else deb_cache_dir(paths)
    cache.mkdir(parents=True, exist_ok=True)
    say(f"fetching {KERNEL_METAPACKAGE}")
    kernel_pkg = fetch_package(KERNEL_METAPACKAGE, cache)
    say(f"fetching {BUSYBOX_PACKAGE}")
    busybox_pkg = fetch_package(BUSYBOX_PACKAGE, cache)
    vmlinuz = _find_vmlinuz(kernel_pkg)
    busybox = busybox_pkg.root / "bin" / "busybox"
    if not busybox.is_file():
        raise EnvironmentProblem(f"{busybox_pkg.deb_name} has no bin/busybox")

    with store.staging(name, force=force) as work:
        say("writing kernel and initramfs")
        shutil.copyfile(vmlinuz, work / "vmlinuz")
        initrd = build_initramfs(kernel_pkg.root, busybox.read_bytes(), guest_file("init.sh"))
        (work / "initrd.img").write_bytes(initrd)

        say("building the root file system")
        tree = work / ".rootfs"
        tree.mkdir()
        build_rootfs(tree, busybox)
        raw = work / ".disk.raw"
        make_ext4(tree, raw)
        shutil.rmtree(tree)

        img = seal_image(
            store,
            work,
            raw,
            say,
            name=name,
            cmdline=TINY_CMDLINE,
            ports=TINY_PORTS,
            source="build-tiny",
            disk_size=DISK_SIZE,
            extra={
                "kernel_package": kernel_pkg.deb_name,
                "busybox_package": busybox_pkg.deb_name,
                "recipe": recipe_id(),
            },
        )
        store.save(img, work)
    say("done")
    return img


def seal_image(
    store: ImageStore,
    work: Path,
    raw: Path,
    say: Callable[[str], None],
    *,
    name: str,
    cmdline: str,
    ports: Sequence[int],
    source: str,
    disk_size: int,
    extra: dict[str, Any],
) -> Image:
    """The last steps every built image shares: content id over kernel, initrd and the raw
    disk, the raw disk converted to qcow2 (and removed), and the image record."""
    say("hashing")
    cid = content_id(work / "vmlinuz", work / "initrd.img", raw)
    say("converting the disk to qcow2")
    r = qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2"))
    if r.returncode != 0:
        raise EnvironmentProblem(f"qemu-img convert failed: {r.stderr.strip()}")
    raw.unlink()
    return Image(
        name=name,
        disk="disk.qcow2",
        disk_format="qcow2",
        content_id=cid,
        kernel="vmlinuz",
        initrd="initrd.img",
        cmdline=cmdline,
        ports=list(ports),
        agent=True,
        ready_marker=READY_MARKER,
        source=source,
        created=now_iso(),
        disk_size=disk_size,
        extra=extra,
        dir=store.dir(name),
    )


def _find_vmlinuz(pkg: Package) -> Path:
    found = sorted((pkg.root / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise EnvironmentProblem(
            f"expected one boot/vmlinuz-* in {pkg.deb_name}, found {len(found)}"
        )
    return found[0]
