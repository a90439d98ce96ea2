"""The batched apply (numpy, pwritev, whole clusters) against a one-record-at-a-time model.

Random record streams use every payload type in every way the format allows, not only the
ways create writes them: unsorted and repeated targets, references to pages written earlier
in the same batch (and chains of them), to unwritten pages and to the page itself, zero runs
with partial clusters, pages past the end of the base disk. Small batch limits make batches
end in the middle of segments and clusters.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cloudlet.overlay import BaseRef, apply_overlay
from cloudlet.overlay import apply as apply_mod
from cloudlet.overlay.apply import RecordApplier
from cloudlet.overlay.format import Kind, Payload, RecordLimits, iter_records
from cloudlet.util.resident import drop_page_cache
from helpers import resident_pages
from overlay.overlay_testlib import craft_overlay, rec, run

PAGE = 4096
MEM_PAGES = 512  # 2 MiB of RAM
DISK_PAGES = 512  # 2 MiB virtual disk (32 clusters) ...
BASE_DISK_BYTES = 257 * PAGE - 2560  # ... over a shorter base whose last page is partial


def make_small_base(d: Path, rng: np.random.Generator) -> BaseRef:
    d.mkdir(parents=True)
    ram = rng.integers(0, 256, (MEM_PAGES, PAGE), dtype=np.uint8)
    ram[100:200] = 0  # a hole
    (d / "memory.ram").write_bytes(ram.tobytes())
    disk = rng.integers(0, 256, BASE_DISK_BYTES, dtype=np.uint8)
    disk[64 * PAGE : 96 * PAGE] = 0
    (d / "disk.raw").write_bytes(disk.tobytes())
    return BaseRef("base-small", d / "memory.ram", d / "disk.raw", d / "m.idx", d / "d.idx")


def random_records(
    rng: np.random.Generator, kind: Kind, n: int, pages: int, xor_current: bool = False
) -> list[tuple[int, int, int, bytes]]:
    out: list[tuple[int, int, int, bytes]] = []
    t = int(rng.integers(pages))
    weights = [0.3, 0.1, 0.1, 0.1, 0.15, 0.15, 0.1] + ([0.3] if xor_current else [])
    for _ in range(n):
        # mostly ascending runs (as create writes them), sometimes a jump anywhere
        t = int(rng.integers(pages)) if rng.random() < 0.2 else (t + 1) % pages
        if xor_current and out and rng.random() < 0.1:
            t = int(rng.choice([r[1] for r in out[-30:]]))  # a page this batch just wrote
        p = int(rng.choice(len(weights), p=np.array(weights) / sum(weights)))
        if p == Payload.XOR_CURRENT:
            out.append((p, t, 0, rng.integers(0, 4, PAGE, dtype=np.uint8).tobytes()))
        elif p == Payload.LITERAL:
            data = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()
            if rng.random() < 0.1:
                data = bytes(PAGE)  # zero pages make zero clusters
            out.append((p, t, 0, data))
        elif p == Payload.XOR:
            out.append((p, t, 0, rng.integers(0, 4, PAGE, dtype=np.uint8).tobytes()))
        elif p == Payload.BASE_MEM:
            out.append((p, t, int(rng.integers(MEM_PAGES)), b""))
        elif p == Payload.BASE_DISK:
            out.append((p, t, int(rng.integers(-(-BASE_DISK_BYTES // PAGE))), b""))
        elif p in (Payload.SELF_MEM, Payload.SELF_DISK):
            own = (p == Payload.SELF_MEM) == (kind is Kind.MEMORY)
            recent = [r[1] for r in out[-20:]]
            if own and recent and rng.random() < 0.7:  # a page this batch just wrote
                arg = int(rng.choice(recent))
            else:
                arg = int(rng.integers(MEM_PAGES if p == Payload.SELF_MEM else DISK_PAGES))
            out.append((p, t, arg, b""))
        else:
            run_len = int(rng.integers(1, 40))
            t = min(t, pages - run_len)
            out.append((p, t, run_len, b""))
            t += run_len - 1
    return out


def model(
    base: BaseRef, segments: list[tuple[Kind, list[tuple[int, int, int, bytes]]]]
) -> tuple[bytes, bytes]:
    """RAM and guest disk after applying the records one by one, as the format says."""
    base_ram = base.ram.read_bytes()
    base_disk = base.disk.read_bytes()
    mem = bytearray(base_ram)
    disk = bytearray(base_disk.ljust(DISK_PAGES * PAGE, b"\0"))

    def page(buf: bytes | bytearray, p: int) -> bytes:
        return bytes(buf[p * PAGE : (p + 1) * PAGE]).ljust(PAGE, b"\0")

    for kind, recs in segments:
        space = mem if kind is Kind.MEMORY else disk
        for p, t, arg, data in recs:
            if p == Payload.ZERO:
                space[t * PAGE : (t + arg) * PAGE] = bytes(arg * PAGE)
                continue
            if p == Payload.LITERAL:
                new = data
            elif p == Payload.XOR:
                base_page = page(base_ram if kind is Kind.MEMORY else base_disk, t)
                new = (np.frombuffer(base_page, np.uint8) ^ np.frombuffer(data, np.uint8)).tobytes()
            elif p == Payload.XOR_CURRENT:
                now = np.frombuffer(page(space, t), np.uint8)
                new = (now ^ np.frombuffer(data, np.uint8)).tobytes()
            elif p == Payload.BASE_MEM:
                new = page(base_ram, arg)
            elif p == Payload.BASE_DISK:
                new = page(base_disk, arg)
            elif p == Payload.SELF_MEM:
                new = page(mem, arg)
            else:
                new = page(disk, arg)
            space[t * PAGE : (t + 1) * PAGE] = new
    return bytes(mem), bytes(disk)


def guest_disk(qcow2: Path, tmp: Path) -> bytes:
    run("qemu-img", "check", "-q", str(qcow2))
    raw = tmp / "guest.raw"
    run("qemu-img", "convert", "-O", "raw", str(qcow2), str(raw))
    return raw.read_bytes()


def build(
    seed: int, xor_current: bool = False
) -> list[tuple[Kind, list[tuple[int, int, int, bytes]]]]:
    rng = np.random.default_rng(seed)
    segs = [
        (Kind.MEMORY, random_records(rng, Kind.MEMORY, 300, MEM_PAGES, xor_current))
        for _ in range(3)
    ]
    segs += [
        (Kind.DISK, random_records(rng, Kind.DISK, 300, DISK_PAGES, xor_current)) for _ in range(3)
    ]
    # whole clusters of zero pages written one by one, and a cluster spanning two segments
    segs[3][1].extend((Payload.LITERAL, 20 * 16 + k, 0, bytes(PAGE)) for k in range(16))
    segs[4][1].insert(0, (Payload.LITERAL, 21 * 16 + 3, 0, b"\x01" * PAGE))
    segs[3][1].append((Payload.LITERAL, 21 * 16 + 2, 0, b"\x02" * PAGE))
    return segs


def blob_of(segs: list[tuple[Kind, list[tuple[int, int, int, bytes]]]]) -> bytes:
    return craft_overlay(
        [(k, b"".join(rec(*r) for r in recs), len(recs)) for k, recs in segs],
        base_id="base-small",
        memory_size=MEM_PAGES * PAGE,
        disk_size=DISK_PAGES * PAGE,
        base_disk_size=BASE_DISK_BYTES,
    )


@pytest.mark.parametrize(("seed", "batch"), [(1, None), (2, 7), (3, 1), (4, 64)])
def test_batched_apply_matches_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, batch: int | None
) -> None:
    if batch is not None:
        monkeypatch.setattr(apply_mod, "_MEM_BATCH", batch)
        monkeypatch.setattr(apply_mod, "_DISK_BATCH", batch)
    base = make_small_base(tmp_path / "base", np.random.default_rng(seed + 100))
    segs = build(seed)
    mem, disk = model(base, segs)
    out = tmp_path / "vm"
    stats = apply_overlay([blob_of(segs)], base, out, backing=str(base.disk))
    assert (out / "memory.ram").read_bytes() == mem
    assert guest_disk(out / "disk.qcow2", tmp_path) == disk
    assert stats.disk_zero_clusters >= 1  # cluster 20 ended all zero: a zero cluster
    assert sum(stats.records.values()) == sum(len(r) for _, r in segs)


def test_record_applier_apply_takes_iter_records(tmp_path: Path) -> None:
    """The handoff destination's path: ``apply(kind, records)`` with iter_records' tuples."""
    base = make_small_base(tmp_path / "base", np.random.default_rng(7))
    segs = build(8)
    mem, disk = model(base, segs)
    parts = _apply_as_handoff(base, segs, tmp_path / "vm", xor_current=False)
    assert parts["memory.ram"].read_bytes() == mem
    assert guest_disk(parts["disk.qcow2"], tmp_path) == disk
    assert os.path.getsize(parts["devstate"]) == 0


def _apply_as_handoff(
    base: BaseRef,
    segs: list[tuple[Kind, list[tuple[int, int, int, bytes]]]],
    out: Path,
    xor_current: bool = True,
) -> dict[str, Path]:
    """Apply as the handoff destination does: ``RecordApplier.apply`` with iter_records'
    tuples (and, as it does, xor-current records allowed)."""
    out.mkdir()
    parts = {n: out / n for n in ("memory.ram", "disk.qcow2", "devstate")}

    class Sizes:
        memory_size = MEM_PAGES * PAGE
        disk_size = DISK_PAGES * PAGE
        devstate_size = 0

    limits = RecordLimits(
        MEM_PAGES, DISK_PAGES, MEM_PAGES, -(-BASE_DISK_BYTES // PAGE), 0, xor_current=xor_current
    )
    app = RecordApplier(Sizes(), base, parts, str(base.disk))
    try:
        app.start()
        for seq, (kind, recs) in enumerate(segs):
            raw = b"".join(rec(*r) for r in recs)
            app.apply(kind, list(iter_records(kind, raw, len(recs), limits, seq)))
        app.finish(fsync=False)
    finally:
        app.close()
    return parts


@pytest.mark.parametrize(("seed", "batch"), [(11, None), (12, 5), (13, 1), (14, 64)])
def test_xor_current_matches_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, batch: int | None
) -> None:
    """Xor-current records read the page as the records before them left it, also when an
    earlier record of the same batch wrote it (the batch is cut there)."""
    if batch is not None:
        monkeypatch.setattr(apply_mod, "_MEM_BATCH", batch)
        monkeypatch.setattr(apply_mod, "_DISK_BATCH", batch)
    base = make_small_base(tmp_path / "base", np.random.default_rng(seed + 100))
    segs = build(seed, xor_current=True)
    n_xc = sum(1 for _, recs in segs for r in recs if r[0] == Payload.XOR_CURRENT)
    repeated = 0
    for _, recs in segs:  # xor-current records whose page an earlier record of the segment wrote
        seen: set[int] = set()
        for p, t, _a, _d in recs:
            repeated += p == Payload.XOR_CURRENT and t in seen
            seen.add(t)
    assert n_xc > 100 and repeated > 5  # the stream exercises what it is meant to
    mem, disk = model(base, segs)
    parts = _apply_as_handoff(base, segs, tmp_path / "vm")
    assert parts["memory.ram"].read_bytes() == mem
    assert guest_disk(parts["disk.qcow2"], tmp_path) == disk


def test_xor_current_is_refused_in_an_overlay(tmp_path: Path) -> None:
    """Overlay files never hold xor-current records: a reader refuses one by name."""
    base = make_small_base(tmp_path / "base", np.random.default_rng(5))
    segs = [(Kind.MEMORY, [(Payload.XOR_CURRENT, 3, 0, bytes(PAGE))])]
    with pytest.raises(Exception, match="unknown payload type 7"):
        apply_overlay([blob_of(segs)], base, tmp_path / "vm", backing=str(base.disk))
    assert not (tmp_path / "vm").exists() or not any((tmp_path / "vm").iterdir())
    limits = RecordLimits(MEM_PAGES, DISK_PAGES, MEM_PAGES, 1, 0)
    raw = rec(Payload.XOR_CURRENT, 3, 0, bytes(PAGE))
    with pytest.raises(Exception, match="unknown payload type 7"):
        list(iter_records(Kind.MEMORY, raw, 1, limits, 0))


def test_keep_resident_holds_the_new_ram_in_memory_until_close(tmp_path: Path) -> None:
    """The handoff destination keeps the RAM it receives mapped: nothing the VM will run on
    is left for the kernel to drop while the rounds go on."""
    base = make_small_base(tmp_path / "base", np.random.default_rng(9))
    (tmp_path / "vm").mkdir()
    parts = {n: tmp_path / "vm" / n for n in ("memory.ram", "disk.qcow2", "devstate")}

    class Sizes:
        memory_size = MEM_PAGES * PAGE
        disk_size = DISK_PAGES * PAGE
        devstate_size = 0

    ram = parts["memory.ram"]
    app = RecordApplier(Sizes(), base, parts, str(base.disk))
    try:
        app.start()
        drop_page_cache(ram)
        assert resident_pages(ram) == 0  # not kept: the kernel may drop every page
        app.keep_resident()
        limits = RecordLimits(MEM_PAGES, DISK_PAGES, MEM_PAGES, -(-BASE_DISK_BYTES // PAGE), 0)
        raw = rec(Payload.LITERAL, 5, 0, b"\x01" * PAGE)
        app.apply(Kind.MEMORY, list(iter_records(Kind.MEMORY, raw, 1, limits, 0)))
        drop_page_cache(ram)
        assert resident_pages(ram) == MEM_PAGES  # kept, the page written since included
        app.finish(fsync=False)
    finally:
        app.close()
    drop_page_cache(ram)
    assert resident_pages(ram) == 0  # released with the applier
    with ram.open("rb") as f:
        f.seek(5 * PAGE)
        assert f.read(PAGE) == b"\x01" * PAGE
