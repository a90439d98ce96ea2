"""Fetching Debian packages: clear errors on empty package lists, and a cache that works offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudlet.errors import EnvironmentProblem, InvalidInputError
from cloudlet.images.debs import (
    BUSYBOX_PACKAGE,
    KERNEL_METAPACKAGE,
    download_deb,
    fetch_package,
    resolve_package,
)
from cloudlet.images.model import Image


@pytest.fixture
def no_package_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make apt see empty package lists (as on a fresh machine before `apt-get update`)."""
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)
    conf = tmp_path / "apt.conf"
    conf.write_text(
        f'Dir::State::Lists "{lists}/";\nDir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    )
    monkeypatch.setenv("APT_CONFIG", str(conf))


@pytest.mark.usefixtures("no_package_lists")
def test_empty_lists_say_run_apt_get_update(tmp_path: Path) -> None:
    cache = tmp_path / "debs"
    cache.mkdir()
    with pytest.raises(EnvironmentProblem) as e:
        download_deb(BUSYBOX_PACKAGE, cache)
    assert "apt-get update" in (e.value.hint or "")
    with pytest.raises(EnvironmentProblem) as e:
        resolve_package(KERNEL_METAPACKAGE, cache)
    assert "apt-get update" in (e.value.hint or "")
    assert list(cache.iterdir()) == []  # no partial download left behind


def test_metapackage_resolves_to_real_kernel() -> None:
    real = resolve_package(KERNEL_METAPACKAGE)
    assert real.startswith("linux-image-") and real.endswith("-cloud-amd64")
    assert real != KERNEL_METAPACKAGE
    assert resolve_package(BUSYBOX_PACKAGE) == BUSYBOX_PACKAGE


@pytest.mark.usefixtures("no_package_lists")
def test_cache_is_reused_without_apt(fresh_tiny: Image, deb_cache: Path) -> None:
    """After one build, fetching again needs neither apt nor the network."""
    before = {p.name: p.stat().st_mtime_ns for p in deb_cache.glob("*.deb")}
    kernel = fetch_package(KERNEL_METAPACKAGE, deb_cache)
    busybox = fetch_package(BUSYBOX_PACKAGE, deb_cache)
    assert kernel.deb.name == fresh_tiny.extra["kernel_package"]
    assert busybox.deb.name == fresh_tiny.extra["busybox_package"]
    assert (busybox.root / "bin" / "busybox").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in deb_cache.glob("*.deb")} == before


@pytest.mark.parametrize("bad", ["", "-o", "../x", "a/b"])
def test_bad_package_names(bad: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        download_deb(bad, tmp_path)
