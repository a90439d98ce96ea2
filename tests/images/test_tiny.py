"""build-tiny: reproducible content id, layout, conflicts, and what the root disk holds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cloudlet.config import Paths, paths
from cloudlet.errors import ConflictError, InvalidInputError
from cloudlet.images.model import IMAGE_MANIFEST, READY_MARKER, Image
from cloudlet.images.store import ImageStore
from cloudlet.images.tiny import DISK_SIZE, build_tiny, guest_file, recipe_id


def debugfs(raw: Path, cmd: str) -> str:
    r = subprocess.run(["debugfs", "-R", cmd, str(raw)], capture_output=True, text=True, check=True)
    return r.stdout


@pytest.fixture(scope="module")
def raw_disk(fresh_tiny: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("raw") / "disk.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(fresh_tiny.disk_path), str(raw)], check=True
    )
    return raw


def test_same_inputs_same_content_id(fresh_tiny: Image, deb_cache: Path, tmp_path: Path) -> None:
    other = build_tiny(paths(tmp_path / "other"), "tiny", deb_cache=deb_cache)
    assert other.content_id == fresh_tiny.content_id
    assert len(other.content_id) == 64
    for f in ("vmlinuz", "initrd.img"):
        assert (other.dir / f).read_bytes() == (fresh_tiny.dir / f).read_bytes()


def test_layout_and_manifest(fresh_tiny: Image, fresh_home: Paths) -> None:
    d = fresh_home.images / "tiny"
    assert sorted(p.name for p in d.iterdir()) == [
        "disk.qcow2",
        IMAGE_MANIFEST,
        "initrd.img",
        "vmlinuz",
    ]
    m = json.loads((d / IMAGE_MANIFEST).read_text())
    assert m["source"] == "build-tiny" and m["ports"] == [80] and m["agent"] is True
    assert m["ready_marker"] == READY_MARKER
    assert "console=ttyS0" in m["cmdline"]
    assert m["extra"]["recipe"] == recipe_id()
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(d / "disk.qcow2")],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == DISK_SIZE == m["disk_size"]
    assert info["cluster-size"] == 65536 and "backing-filename" not in info
    assert ImageStore(fresh_home).verify("tiny") == fresh_tiny
    # nothing left in the scratch area
    assert not (fresh_home.images / ".work").exists()


def test_root_filesystem(raw_disk: Path) -> None:
    assert debugfs(raw_disk, "cat /var/lib/cloudlet/counter") == "0\n"
    assert debugfs(raw_disk, "cat /etc/cloudlet/ports") == "80\n"
    init = debugfs(raw_disk, "cat /sbin/cloudlet-init")
    assert f"echo {READY_MARKER}\n" in init
    assert debugfs(raw_disk, "cat /www/cgi-bin/counter") == guest_file("counter.cgi").decode()
    listing = debugfs(raw_disk, "ls -l /etc/cloudlet/services.d")
    assert "httpd.sh" in listing and "counterd.sh" in listing
    stat = debugfs(raw_disk, "stat /usr/lib/cloudlet/agent.sh")
    assert "User:     0   Group:     0" in stat and "Mode:  0755" in stat
    assert 'Fast link dest: "/bin/busybox"' in debugfs(raw_disk, "stat /bin/sh")
    assert 'Fast link dest: "/bin/busybox"' in debugfs(raw_disk, "stat /usr/sbin/httpd")
    # the lazy init features are off: nothing zeroes inode tables after the first boot
    sb = debugfs(raw_disk, "stats")
    assert "Filesystem UUID:          c1a0d1e7-0000-4000-8000-000000000001" in sb
    fsck = subprocess.run(["e2fsck", "-fn", str(raw_disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_busybox_comes_from_the_deb(fresh_tiny: Image, raw_disk: Path, deb_cache: Path) -> None:
    pkg = fresh_tiny.extra["busybox_package"].removesuffix(".deb")
    deb_busybox = (deb_cache / "unpacked" / pkg / "bin" / "busybox").read_bytes()
    out = subprocess.run(
        ["debugfs", "-R", "cat /bin/busybox", str(raw_disk)], capture_output=True, check=True
    ).stdout
    assert out == deb_busybox


def test_existing_name_is_a_conflict(fresh_home: Paths, deb_cache: Path) -> None:
    before = (fresh_home.images / "tiny" / IMAGE_MANIFEST).read_bytes()
    with pytest.raises(ConflictError):
        build_tiny(fresh_home, "tiny", deb_cache=deb_cache)
    assert (fresh_home.images / "tiny" / IMAGE_MANIFEST).read_bytes() == before


def test_force_replaces(empty_home: Paths, deb_cache: Path) -> None:
    first = build_tiny(empty_home, "t", deb_cache=deb_cache)
    (first.dir / "marker-file").write_text("old")
    second = build_tiny(empty_home, "t", deb_cache=deb_cache, force=True)
    assert second.content_id == first.content_id
    assert not (second.dir / "marker-file").exists()
    assert [i.name for i in ImageStore(empty_home).list()] == ["t"]
    assert sorted(p.name for p in empty_home.images.iterdir()) == ["t"]


@pytest.mark.parametrize("bad", ["../evil", "a/b", ".hidden", "", "x" * 64, "..", "-x"])
def test_bad_names_refused(bad: str, empty_home: Paths, deb_cache: Path) -> None:
    with pytest.raises(InvalidInputError):
        build_tiny(empty_home, bad, deb_cache=deb_cache)
    assert list(empty_home.images.iterdir()) == []
    assert not (empty_home.home / "evil").exists()
