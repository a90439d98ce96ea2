"""create -> apply on real files: the rebuilt VM must equal the VM byte for byte (memory,
device state) and in guest-visible disk content (qemu-img compare)."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudlet.cli.overlay_cmd import app as overlay_app
from cloudlet.overlay import (
    OverlayInputError,
    apply_overlay,
    create_overlay,
    file_chunks,
    overlay_info,
)
from cloudlet.overlay.qcow2 import top_layer_extents
from overlay.conftest import HARDWARE, Built
from overlay.overlay_testlib import MiB, make_vm, our_files, run


def check_same_vm(vm_dir: Path, out: Path, backing: Path) -> None:
    assert filecmp.cmp(vm_dir / "memory.ram", out / "memory.ram", shallow=False)
    assert filecmp.cmp(vm_dir / "devstate", out / "devstate", shallow=False)
    disk = out / "disk.qcow2"
    chk = json.loads(run("qemu-img", "check", "--output=json", str(disk)).stdout)
    assert chk["check-errors"] == 0 and not chk.get("leaks") and not chk.get("corruptions")
    info = json.loads(run("qemu-img", "info", "--output=json", str(disk)).stdout)
    assert info["backing-filename"] == str(backing)
    assert info["backing-filename-format"] == "raw"
    assert info["cluster-size"] == 65536
    r = subprocess.run(
        ["qemu-img", "compare", str(vm_dir / "disk.qcow2"), str(disk)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["devstate", "disk.qcow2", "memory.ram"]


def test_roundtrip_is_exact(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "vm"
    progress: list[tuple[str, int, int]] = []
    st = apply_overlay(
        file_chunks(built.overlay, 7777),
        built.base,
        out,
        backing=str(built.base.disk),
        expected_base_id=built.base.base_id,
        progress=lambda *a: progress.append(a),
    )
    check_same_vm(built.vm.vm_dir, out, built.base.disk)
    size = (out / "memory.ram").stat()
    assert size.st_blocks * 512 < size.st_size // 2  # the RAM copy stayed sparse
    assert st.records == built.stats.records
    assert st.bytes_read == built.overlay.stat().st_size == built.stats.file_bytes
    assert st.segments == built.stats.segments
    assert st.hardware == HARDWARE and st.meta == {"service": "t"}
    assert progress and progress[-1][1] == progress[-1][2] - 40  # all but the trailer
    assert {"copy_base", "read_decode", "apply", "finish", "total"} <= set(st.seconds)
    d = st.to_dict()
    assert d["decode_s"] >= 0 and d["apply_s"] > 0


def test_outputs_in_place_for_an_early_qemu_and_private(built: Built, tmp_path: Path) -> None:
    """``on_outputs``: the files exist under their final names when it is called (a QEMU may
    open them then), and the VM they end as is the same. Either way they are 0600: guest
    memory, device state and disk."""
    seen: list[list[str]] = []
    out = tmp_path / "vm"
    apply_overlay(
        file_chunks(built.overlay),
        built.base,
        out,
        backing=str(built.base.disk),
        on_outputs=lambda: seen.append(sorted(p.name for p in out.iterdir())),
    )
    assert seen == [["devstate", "disk.qcow2", "memory.ram"]]
    check_same_vm(built.vm.vm_dir, out, built.base.disk)
    hidden = tmp_path / "hidden"
    apply_overlay(file_chunks(built.overlay), built.base, hidden, backing=str(built.base.disk))
    for d in (out, hidden):
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == dict.fromkeys(
            ("devstate", "disk.qcow2", "memory.ram"), 0o600
        )


@pytest.mark.parametrize("chunk", [None, 1, 4093, 1 << 22])
def test_apply_with_any_chunking(built: Built, tmp_path: Path, chunk: int | None) -> None:
    data = built.overlay.read_bytes()
    if chunk is None:
        chunks: list[bytes] = [data]
    elif chunk == 1:  # a byte at a time through the header, manifest and first segment
        head = 200_000
        chunks = [data[i : i + 1] for i in range(head)] + [data[head:]]
    else:
        chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    out = tmp_path / "vm"
    apply_overlay(iter(chunks), built.base, out, backing=str(built.base.disk))
    check_same_vm(built.vm.vm_dir, out, built.base.disk)


def test_every_record_kind_is_used(built: Built) -> None:
    rec = built.stats.records
    exp = built.vm.expect
    for k in ("memory.xor", "memory.base_mem", "memory.base_disk", "memory.self_mem"):
        assert rec[k] == exp[k], k
    assert rec["memory.literal"] == exp["memory.literal"]
    assert rec["memory.zero"] == 1  # one run of 100 zeroed pages
    assert built.stats.changed_pages == exp["changed_pages"]
    for k in ("disk.base_mem", "disk.base_disk", "disk.self_mem"):
        assert rec[k] == exp[k], k
    assert rec["disk.self_disk"] >= 63 + 127  # the 0xab and 0x5a pattern pages
    assert rec["disk.zero"] == 2 and rec["disk.xor"] >= 1 and rec["disk.literal"] > 512
    assert rec["devstate.literal"] == 1
    st = built.stats
    assert st.stored_bytes < st.raw_bytes
    assert st.memory_bytes_examined >= 24 * MiB and st.disk_bytes_examined > 0
    assert st.changed_clusters > 40
    for phase in ("memory_examine", "memory_encode", "disk_examine", "assemble", "total"):
        assert phase in st.seconds


def test_applied_layer_skips_unchanged_keeps_zeros(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "vm"
    apply_overlay(file_chunks(built.overlay), built.base, out, backing=str(built.base.disk))
    ext = top_layer_extents(out / "disk.qcow2")

    def covering(off: int) -> list[str]:
        return [e.kind for e in ext if e.start <= off < e.end]

    assert covering(5 * MiB) == []  # rewritten with base content: left to the backing
    assert covering(200 * MiB) == ["zero"]  # zero clusters over a hole
    assert covering(1 * MiB) == ["zero"]  # zero cluster over base data
    assert covering(600 * MiB - 1000) == ["data"]  # the last cluster
    assert covering(599 * MiB) == ["data"]
    assert covering(2 * MiB) == []  # never touched


def test_create_refuses_bad_inputs_and_leaves_nothing(built: Built, tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    out_dir = tmp_path / "out"
    with pytest.raises(OverlayInputError, match="missing file"):
        create_overlay(built.base, vm, out_dir / "x.ovl", hardware={})
    # a VM disk on another backing file: refused after the temp file exists
    for name in ("memory.ram", "devstate"):
        run("cp", "--sparse=always", str(built.vm.vm_dir / name), str(vm / name))
    other = tmp_path / "other.raw"
    run("cp", "--sparse=always", str(built.base.disk), str(other))
    disk = str(vm / "disk.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(other), "-F", "raw", disk)
    out_dir.mkdir()
    with pytest.raises(OverlayInputError, match="not by the base disk"):
        create_overlay(built.base, vm, out_dir / "x.ovl", hardware={})
    assert our_files(out_dir) == []
    small = dataclasses.replace(built.base, ram=other)
    with pytest.raises(OverlayInputError, match="memory size"):
        create_overlay(small, vm, out_dir / "x.ovl", hardware={})


def test_second_vm_and_levels(built: Built, tmp_path: Path) -> None:
    """Another VM from the same base, compressed at level 1 with one thread."""
    vm = make_vm(built.base, tmp_path / "vm2", seed=7)
    ovl = tmp_path / "vm2.ovl"
    st = create_overlay(built.base, vm.vm_dir, ovl, hardware={}, level=1, threads=1)
    assert st.file_bytes == ovl.stat().st_size
    assert our_files(tmp_path) == ["vm2", "vm2.ovl"]
    out = tmp_path / "rebuilt"
    apply_overlay(file_chunks(ovl), built.base, out, backing=str(built.base.disk))
    check_same_vm(vm.vm_dir, out, built.base.disk)


def test_overlay_info_and_cli(built: Built) -> None:
    info = overlay_info(built.overlay)
    assert info["format"] == "1.0" and info["base_id"] == built.base.base_id
    assert info["size"] == info["expected_size"] == built.overlay.stat().st_size
    assert info["memory_size"] == 64 * MiB and info["disk_size"] == 600 * MiB
    assert info["hardware"] == HARDWARE and info["verified"] is False
    assert set(info["kinds"]) == {"devstate", "memory", "disk"}
    assert sum(k["segments"] for k in info["kinds"].values()) == info["segments"]
    v = overlay_info(built.overlay, verify=True)
    assert v["verified"] is True and v["records"] == dict(sorted(built.stats.records.items()))

    runner = CliRunner()
    r = runner.invoke(overlay_app, ["info", str(built.overlay), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base_id"] == built.base.base_id
    r = runner.invoke(overlay_app, ["info", str(built.overlay), "--verify"])
    assert r.exit_code == 0, r.output
    assert "verified" in r.stdout and "memory.xor" in r.stdout
