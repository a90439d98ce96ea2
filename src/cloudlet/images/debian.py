"""``build-debian``: a realistic Debian service image (debootstrap minbase + the cloud kernel).

Where the tiny image is a busybox toy, this one is the Debian a user would customize: dpkg, apt
(with sources pointing at the mirror the host's apt uses), bash, perl-base, coreutils. It boots
the same way as the tiny image: Debian's cloud kernel and our initramfs (``initramfs.py``),
whose ``/init`` switch_roots into the ext4 disk and runs ``/sbin/cloudlet-init``. systemd would
take tens of seconds to boot under TCG, so PID 1 is the tiny image's cloudlet-init, run by
busybox-static copied into ``/usr/lib/cloudlet/bin``. The guest scripts are the tiny image's,
with their shebang and PATH rewritten (:data:`DEBIAN_GUEST_FILES`): one copy of the agent and
init to maintain. Our scripts and services run in busybox sh, which prefers its own applets;
commands sent through the agent run in Debian's ``/bin/sh`` with the busybox directory last on
PATH, so users get Debian's tools and busybox only fills in what minbase lacks (``ip``,
``wget``, ``usleep``...).

debootstrap is slow and needs the network, so its tree is cached as
``<home>/cache/debootstrap/<suite>-<key>.tar.zst`` (key: suite, variant, mirror, packages);
a finished image records a recipe id, and building again with the same inputs returns it as is.
Unlike the tiny image this one is not byte-for-byte reproducible (debootstrap is not).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloudlet.config import Paths
from cloudlet.errors import ConflictError, EnvironmentProblem, InvalidInputError, NotFoundError
from cloudlet.images.debs import (
    BUSYBOX_PACKAGE,
    KERNEL_METAPACKAGE,
    deb_cache_dir,
    fetch_package,
)
from cloudlet.images.initramfs import FIXED_MTIME, MODULES, build_initramfs
from cloudlet.images.model import Image
from cloudlet.images.store import ImageStore
from cloudlet.images.tiny import TINY_CMDLINE, busybox_applets, guest_file, seal_image
from cloudlet.images.tiny import _find_vmlinuz as find_vmlinuz
from cloudlet.util.names import check_name

Progress = Callable[[str], None]

DEBIAN_DISK_SIZE = 4 << 30  # virtual; the ext4 is sparse, ~200 MB in use after the build
DEBIAN_CMDLINE = TINY_CMDLINE
DEBIAN_PORTS = (80,)
VARIANT = "minbase"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
FS_UUID = "c1a0d1e7-0000-4000-8000-0000000000d1"
FS_HASH_SEED = "c1a0d1e7-0000-4000-8000-0000000000d2"
FS_LABEL = "cloudlet-root"

BUSYBOX_DIR = "usr/lib/cloudlet/bin"
GUEST_PATH = f"/usr/sbin:/usr/bin:/sbin:/bin:/{BUSYBOX_DIR}"
_BB_SHEBANG = ("#!/bin/sh\n", f"#!/{BUSYBOX_DIR}/sh\n")
_BB_PATH = ("export PATH=/sbin:/bin:/usr/sbin:/usr/bin\n", f"export PATH={GUEST_PATH}\n")
# busybox sh prefers its own applets to PATH (FEATURE_SH_STANDALONE): agent commands must run
# in Debian's /bin/sh, so that users get Debian's tools.
_DEBIAN_SH = ("(cd / && sh -c ", "(cd / && /bin/sh -c ")

# (tiny guest file, path in the Debian root, mode, textual substitutions). Scripts that need
# busybox sh features (read -t, usleep) get busybox's sh; services run under Debian's sh (dash).
# Every substitution must apply: a changed tiny script fails the build instead of booting wrong.
DEBIAN_GUEST_FILES: tuple[tuple[str, str, int, tuple[tuple[str, str], ...]], ...] = (
    ("cloudlet-init.sh", "usr/sbin/cloudlet-init", 0o755, (_BB_SHEBANG, _BB_PATH)),
    ("agent.sh", "usr/lib/cloudlet/agent.sh", 0o755, (_BB_SHEBANG, _BB_PATH, _DEBIAN_SH)),
    ("httpd.sh", "etc/cloudlet/services.d/httpd.sh", 0o644, ()),
    ("counterd.sh", "etc/cloudlet/services.d/counterd.sh", 0o644, ()),
    ("counter.cgi", "www/cgi-bin/counter", 0o755, (_BB_SHEBANG,)),
    ("index.html", "www/index.html", 0o644, ()),
    (
        "acpi-power-button.sh",
        "etc/acpi/PWRF/00000080",
        0o755,
        (_BB_SHEBANG, ("exec /sbin/poweroff\n", f"exec /{BUSYBOX_DIR}/poweroff\n")),
    ),
)

STATIC_FILES: tuple[tuple[str, str, int], ...] = (
    ("etc/hostname", "cloudlet\n", 0o644),
    ("etc/hosts", "127.0.0.1 localhost\n127.0.1.1 cloudlet\n", 0o644),
    # QEMU user-mode networking's DNS forwarder (debootstrap copied the host's resolv.conf).
    ("etc/resolv.conf", "nameserver 10.0.2.3\n", 0o644),
    ("var/lib/cloudlet/counter", "0\n", 0o644),
    ("etc/cloudlet/ports", "".join(f"{p}\n" for p in DEBIAN_PORTS), 0o644),
)

_SUITE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


@dataclass(frozen=True)
class Mirrors:
    """Where apt fetches Debian from: the archive and the security archive."""

    debian: str = DEFAULT_MIRROR
    security: str | None = DEFAULT_SECURITY_MIRROR

    def sources_list(self, suite: str) -> str:
        lines = [f"deb {self.debian} {suite} main", f"deb {self.debian} {suite}-updates main"]
        if self.security:
            lines.append(f"deb {self.security} {suite}-security main")
        return "\n".join(lines) + "\n"


def _apt_entries(etc_apt: Path) -> list[tuple[list[str], list[str]]]:
    """``(URIs, suites)`` of every ``deb`` entry apt reads (sources.list, *.list, *.sources)."""
    out: list[tuple[list[str], list[str]]] = []
    one_line = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for f in one_line:
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(parts) >= 3 and parts[0] == "deb":
                out.append(([parts[1]], [parts[2]]))
    for f in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                out.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
    return out


def host_mirrors(suite: str, etc_apt: Path = Path("/etc/apt")) -> Mirrors:
    """The Debian mirrors the host's apt uses for ``suite`` (this machine may reach no other).

    Falls back to deb.debian.org when the host's apt has no entry for the suite.
    """
    debian = security = None
    for uris, suites in _apt_entries(etc_apt):
        uri = next((u.rstrip("/") for u in uris if u.startswith(("http://", "https://"))), None)
        if uri is None:
            continue
        if debian is None and suite in suites:
            debian = uri
        if security is None and f"{suite}-security" in suites:
            security = uri
    return Mirrors(debian or DEFAULT_MIRROR, security or DEFAULT_SECURITY_MIRROR)


def _check_inputs(suite: str, packages: Sequence[str]) -> list[str]:
    if not _SUITE.match(suite):
        raise InvalidInputError(f"invalid Debian suite {suite!r}", hint="e.g. bookworm")
    pkgs = sorted(set(packages))
    bad = [p for p in pkgs if not _PACKAGE.match(p)]
    if bad:
        raise InvalidInputError(f"invalid Debian package name(s): {', '.join(bad)}")
    return pkgs


def debootstrap_key(suite: str, mirror: str, packages: Sequence[str]) -> str:
    """Names a cached debootstrap tree: same key, same debootstrap command."""
    text = f"cloudlet-debootstrap-v1\n{suite}\n{VARIANT}\n{mirror}\n{','.join(packages)}\n"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_id(suite: str, mirrors: Mirrors, packages: Sequence[str], debs: Sequence[str]) -> str:
    """Everything that goes into the image: a cached image with another recipe is stale."""
    h = hashlib.sha256(b"cloudlet-debian-recipe-v1\n")
    for src, dst, perm, subs in DEBIAN_GUEST_FILES:
        h.update(f"{src} {dst} {perm:o} {subs!r}\n".encode() + guest_file(src))
    h.update(guest_file("init.sh"))
    settings = (
        suite,
        VARIANT,
        mirrors,
        tuple(packages),
        tuple(debs),
        DEBIAN_CMDLINE,
        DEBIAN_PORTS,
        DEBIAN_DISK_SIZE,
        FS_UUID,
        FS_HASH_SEED,
        MODULES,
        STATIC_FILES,
        GUEST_PATH,
    )
    h.update(repr(settings).encode())
    return h.hexdigest()


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise EnvironmentProblem(f"{name} is not installed", hint=f"apt-get install {package}")
    return path


def _run(
    argv: list[str], what: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-5:]
        raise EnvironmentProblem(f"{what} failed (exit {r.returncode}): {' | '.join(tail)}")
    return r


def _umount_under(tree: Path) -> None:
    """Unmount anything a failed debootstrap left mounted inside ``tree`` (before removing it)."""
    prefix = str(tree.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [ln.split()[1] for ln in f if ln.split()[1].startswith(prefix)]
    for p in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True, check=False)


def _rmtree(tree: Path) -> None:
    if tree.exists():
        _umount_under(tree)
        shutil.rmtree(tree)


def debootstrap_tree(
    tree: Path, suite: str, mirror: str, packages: Sequence[str], cache: Path, say: Progress
) -> bool:
    """Fill ``tree`` with ``debootstrap --variant=minbase``, from the tar cache if possible.

    Returns True if the cache was used. Needs root, for debootstrap (chroot, device nodes)
    and for unpacking the cache with its owners.
    """
    cached = cache / f"{suite}-{debootstrap_key(suite, mirror, packages)}.tar.zst"
    tar_flags = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]
    zstd = _tool("zstd", "zstd")
    if os.geteuid() != 0:  # also to unpack the cache: the tree's owners must be kept
        raise EnvironmentProblem(
            "building the Debian image needs root (debootstrap chroots and makes device "
            "nodes; the root file system keeps its files' owners)",
            hint="build it as root (or with sudo)",
        )
    tree.mkdir(parents=True, exist_ok=True)
    if cached.is_file():
        say(f"unpacking the cached debootstrap tree {cached.name}")
        with subprocess.Popen([zstd, "-dcq", str(cached)], stdout=subprocess.PIPE) as dec:
            r = subprocess.run(
                ["tar", *tar_flags, "-C", str(tree), "-xpf", "-"],
                stdin=dec.stdout,
                capture_output=True,
                text=True,
                check=False,
            )
        if dec.returncode == 0 and r.returncode == 0:
            return True
        say(f"the cached tree {cached.name} is unreadable; running debootstrap again")
        cached.unlink(missing_ok=True)
        _rmtree(tree)
        tree.mkdir()
    argv = [_tool("debootstrap", "debootstrap"), f"--variant={VARIANT}", "--arch=amd64"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    say(f"debootstrap --variant={VARIANT} {suite} from {mirror} (about a minute)")
    try:
        _run([*argv, suite, str(tree), mirror], "debootstrap")
    finally:
        _umount_under(tree)
    cache.mkdir(parents=True, exist_ok=True)
    say(f"caching the debootstrap tree as {cached.name}")
    fd, part = tempfile.mkstemp(prefix=f".{cached.name}.", dir=cache)
    try:
        with os.fdopen(fd, "wb") as out:
            with subprocess.Popen(
                ["tar", *tar_flags, "-C", str(tree), "-cf", "-", "."], stdout=subprocess.PIPE
            ) as tar:
                z = subprocess.run(
                    [zstd, "-q", "-3", "-T0"], stdin=tar.stdout, stdout=out, check=False
                )
            if tar.returncode != 0 or z.returncode != 0:
                raise EnvironmentProblem(f"tar | zstd of {tree} failed ({tar.returncode})")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(part, 0o644)
        os.replace(part, cached)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    return False


def _write(tree: Path, rel: str, data: bytes, perm: int) -> None:
    p = tree / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink():
        p.unlink()
    p.write_bytes(data)
    p.chmod(perm)


def debian_guest_file(src: str, subs: Sequence[tuple[str, str]]) -> bytes:
    """A tiny-image guest script adapted to Debian; every substitution must apply once."""
    text = guest_file(src).decode()
    for old, new in subs:
        if text.count(old) != 1:
            raise EnvironmentProblem(
                f"guest script {src} no longer contains {old.strip()!r} exactly once",
                hint="update DEBIAN_GUEST_FILES in cloudlet/images/debian.py",
            )
        text = text.replace(old, new)
    return text.encode()


def customize_tree(tree: Path, busybox: Path, suite: str, mirrors: Mirrors) -> None:
    """Turn a debootstrap tree into a cloudlet guest: busybox dir, scripts, apt sources."""
    # Like Debian's container images: no package lists or downloaded .debs in the image
    # (a user runs apt-get update first; stale lists would point at superseded versions).
    for d in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for p in (tree / d).glob("*"):
            if p.is_file() or p.is_symlink():
                p.unlink()
    for p in (tree / "var/cache/apt").glob("*.bin"):
        p.unlink()
    bbdir = tree / BUSYBOX_DIR
    bbdir.mkdir(parents=True, exist_ok=True)
    _write(tree, f"{BUSYBOX_DIR}/busybox", busybox.read_bytes(), 0o755)
    for applet in sorted({Path(a).name for a in busybox_applets(busybox)}):
        link = bbdir / applet
        if not link.exists():
            link.symlink_to("busybox")
    for src, dst, perm, subs in DEBIAN_GUEST_FILES:
        _write(tree, dst, debian_guest_file(src, subs), perm)
    for dst, text, perm in STATIC_FILES:
        _write(tree, dst, text.encode(), perm)
    _write(tree, "etc/apt/sources.list", mirrors.sources_list(suite).encode(), 0o644)
    for d in ("var/log", "var/lib/cloudlet", "run", "tmp"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)


def make_ext4(tree: Path, raw: Path, size: int = DEBIAN_DISK_SIZE) -> None:
    """ext4 populated from ``tree``, keeping owners, modes, hard links and xattrs.

    lazy_itable_init=0/lazy_journal_init=0: the guest kernel must not zero inode tables in the
    background after boot, which would dirty the disk of every VM made from this image.
    """
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FIXED_MTIME))
    argv = [
        _tool("mke2fs", "e2fsprogs"),
        "-q", "-F", "-t", "ext4", "-b", "4096", "-L", FS_LABEL, "-U", FS_UUID,
        "-E", f"hash_seed={FS_HASH_SEED},lazy_itable_init=0,lazy_journal_init=0",
        "-d", str(tree), str(raw), f"{size // 1024}k",
    ]  # fmt: skip
    _run(argv, "mke2fs -d", env=env)


def build_debian(
    paths: Paths,
    name: str = "debian",
    *,
    suite: str = "bookworm",
    packages: Sequence[str] = (),
    progress: Progress | None = None,
    rebuild: bool = False,
    deb_cache: Path | None = None,
) -> Image:
    """Build (or return the cached) Debian image ``name`` in ``<home>/images/<name>/``.

    ``packages`` are extra Debian packages installed by debootstrap (``--include``). An
    existing image with the same recipe is returned unchanged unless ``rebuild``; one made
    from other inputs is replaced only if it is a build-debian image no VM uses (an imported
    or tiny image of that name is a ConflictError). ``deb_cache`` overrides where the kernel
    and busybox .debs are cached.
    """
    say = progress or (lambda _msg: None)
    check_name(name, "image name")
    pkgs = _check_inputs(suite, packages)
    store = ImageStore(paths)
    mirrors = host_mirrors(suite)
    debs = deb_cache if deb_cache is not None else deb_cache_dir(paths)
    debs.mkdir(parents=True, exist_ok=True)
    say(f"fetching {KERNEL_METAPACKAGE} and {BUSYBOX_PACKAGE}")
    kernel_pkg = fetch_package(KERNEL_METAPACKAGE, debs)
    busybox_pkg = fetch_package(BUSYBOX_PACKAGE, debs)
    recipe = recipe_id(suite, mirrors, pkgs, (kernel_pkg.deb_name, busybox_pkg.deb_name))

    replace = False
    if store.dir(name).exists():
        try:
            old: Image | None = store.get(name)
        except NotFoundError:
            old = None
        if old is not None and old.extra.get("recipe") == recipe and not rebuild:
            say(f"image {name} is up to date")
            return old
        if old is not None and old.source != "build-debian":
            raise ConflictError(
                f"an image named {name!r} already exists (source: {old.source})",
                hint=f"choose another name, or `cloudlet image delete {name}` first",
            )
        from cloudlet.hypervisor.vm import VMManager  # VM disks are layered over the image

        users = VMManager(paths).users_of("image", name)
        if users:
            raise ConflictError(
                f"image {name!r} is stale but used by VM(s) {', '.join(users)}",
                hint="remove those VMs first (`cloudlet vm rm ID --force`)",
            )
        replace = True

    vmlinuz = find_vmlinuz(kernel_pkg)
    busybox = busybox_pkg.root / "bin" / "busybox"
    if not busybox.is_file():
        raise EnvironmentProblem(f"{busybox_pkg.deb_name} has no bin/busybox")

    with store.staging(name, force=replace) as work:
        tree = work / ".rootfs"
        try:
            from_cache = debootstrap_tree(
                tree, suite, mirrors.debian, pkgs, paths.cache / "debootstrap", say
            )
            say("adding the cloudlet guest (busybox, init, agent, services)")
            customize_tree(tree, busybox, suite, mirrors)
            say("making the ext4 root file system")
            raw = work / ".disk.raw"
            make_ext4(tree, raw)
        finally:
            _rmtree(tree)

        say("writing kernel and initramfs")
        shutil.copyfile(vmlinuz, work / "vmlinuz")
        initrd = build_initramfs(kernel_pkg.root, busybox.read_bytes(), guest_file("init.sh"))
        (work / "initrd.img").write_bytes(initrd)

        img = seal_image(
            store,
            work,
            raw,
            say,
            name=name,
            cmdline=DEBIAN_CMDLINE,
            ports=DEBIAN_PORTS,
            source="build-debian",
            disk_size=DEBIAN_DISK_SIZE,
            extra={
                "suite": suite,
                "variant": VARIANT,
                "mirror": mirrors.debian,
                "security_mirror": mirrors.security,
                "packages": pkgs,
                "kernel_package": kernel_pkg.deb_name,
                "busybox_package": busybox_pkg.deb_name,
                "debootstrap_cached": from_cache,
                "recipe": recipe,
            },
        )
        store.save(img, work)
    say("done")
    return img
