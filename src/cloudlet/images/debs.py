"""Debian packages as build inputs: ``apt-get download`` + ``dpkg-deb -x``, nothing installed.

The tiny image's kernel, modules and busybox come from the distribution's signed packages
rather than from prebuilt images or the host's own binaries, so a build is auditable and
repeatable. Files are cached under ``<home>/cache/debs/`` (or ``$CLOUDLET_DEB_CACHE``, which
lets tests and several homes share one download)::

    <cache>/<package>_<version>_<arch>.deb      as apt-get names them
    <cache>/unpacked/<same name without .deb>/  dpkg-deb -x of it

A cached .deb is reused as is; delete the cache directory to pick up a newer version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cloudlet.config import Paths
from cloudlet.errors import EnvironmentProblem, InvalidInputError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
DEB_CACHE_ENV = "CLOUDLET_DEB_CACHE"
# metapackage -> (prefix, suffix) of the real package it depends on
METAPACKAGES: dict[str, tuple[str, str]] = {
    KERNEL_METAPACKAGE: ("linux-image-", "-cloud-amd64"),
}

_UPDATE_HINT = "run `apt-get update` (as root) so that apt knows the Debian packages, then retry"


@dataclass(frozen=True)
class Package:
    """A fetched and unpacked package: its .deb and the directory it was extracted into."""

    name: str  # the real package name (a metapackage resolved)
    deb: Path
    root: Path

    @property
    def deb_name(self) -> str:
        return self.deb.name


def deb_cache_dir(paths: Paths) -> Path:
    """Where .debs are cached: ``$CLOUDLET_DEB_CACHE`` if set, else ``<home>/cache/debs``."""
    env = os.environ.get(DEB_CACHE_ENV)
    d = Path(env).expanduser().resolve() if env else paths.cache / "debs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise EnvironmentProblem(
            f"{argv[0]} is not installed", hint="build images on a Debian or Ubuntu host"
        ) from e


def _lists_empty(stderr: str) -> bool:
    return any(
        s in stderr
        for s in ("Unable to locate package", "No packages found", "has no installation candidate")
    )


def resolve_package(name: str, cache: Path | None = None) -> str:
    """The package that really holds the files: a metapackage resolves to its dependency.

    ``linux-image-cloud-amd64`` only depends on ``linux-image-<abi>-cloud-amd64``; we follow
    that one ``Depends:`` edge with ``apt-cache depends``. If apt knows nothing (empty package
    lists) but ``cache`` holds exactly one matching .deb, that one is used, so cached builds
    work offline.
    """
    if name not in METAPACKAGES:
        return name
    prefix, suffix = METAPACKAGES[name]
    r = _run(["apt-cache", "depends", name])
    if r.returncode == 0 and not _lists_empty(r.stderr):
        for line in r.stdout.splitlines():
            key, _, dep = line.strip().partition(":")
            dep = dep.strip()
            if key == "Depends" and dep.startswith(prefix) and dep.endswith(suffix):
                return dep
    if cache is not None:
        cached = {p.name.split("_")[0] for p in cache.glob(f"{prefix}*{suffix}_*.deb")}
        if len(cached) == 1:
            return cached.pop()
    raise EnvironmentProblem(
        f"apt cannot resolve the package {name}: {r.stderr.strip() or 'no dependency found'}",
        hint=_UPDATE_HINT,
    )


def _cached_deb(cache: Path, package: str) -> Path | None:
    found = sorted(cache.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def download_deb(package: str, cache: Path) -> Path:
    """``apt-get download`` ``package`` into ``cache`` unless a .deb of it is already there."""
    if not package or package.startswith("-") or "/" in package:
        raise InvalidInputError(f"invalid package name {package!r}")
    cached = _cached_deb(cache, package)
    if cached is not None:
        return cached
    # Download into a private directory, then rename: concurrent builds never see a partial file.
    work = Path(tempfile.mkdtemp(prefix=".download.", dir=cache))
    try:
        argv = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            # apt's _apt user cannot write into a root-only cache: download as root, quietly.
            argv += ["-o", "APT::Sandbox::User=root"]
        r = _run([*argv, package], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if r.returncode != 0 or len(debs) != 1:
            if _lists_empty(r.stderr):
                raise EnvironmentProblem(
                    f"apt-get cannot find the package {package} (are the package lists empty?)",
                    hint=_UPDATE_HINT,
                )
            raise EnvironmentProblem(
                f"apt-get download {package} failed: {r.stderr.strip() or r.stdout.strip()}",
                hint="check the network access to the Debian mirror, or run `apt-get update`",
            )
        final = cache / debs[0].name
        os.replace(debs[0], final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unpack_deb(deb: Path, cache: Path) -> Path:
    """``dpkg-deb -x`` ``deb`` into ``cache/unpacked/<name>/`` once; return that directory."""
    dest = cache / "unpacked" / deb.name.removesuffix(".deb")
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unpack.", dir=dest.parent))
    try:
        r = _run(["dpkg-deb", "-x", str(deb), str(work)])
        if r.returncode != 0:
            deb.unlink(missing_ok=True)  # a broken download: fetch it again next time
            raise EnvironmentProblem(
                f"dpkg-deb -x {deb.name} failed: {r.stderr.strip()}",
                hint="the cached .deb was removed; build again to download it anew",
            )
        try:
            os.rename(work, dest)
        except OSError:
            if not dest.is_dir():  # lost a race with another build: theirs is as good
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def fetch_package(name: str, cache: Path) -> Package:
    """Resolve, download (once) and unpack (once) a Debian package."""
    real = resolve_package(name, cache)
    deb = download_deb(real, cache)
    return Package(real, deb, unpack_deb(deb, cache))
