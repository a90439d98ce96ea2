"""Builders for overlay tests: synthetic base VMs and VMs written by real qemu-io, and crafted
(hostile) overlay files with valid hashes."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np
import zstandard

from cloudlet.overlay import BaseRef, page_index, save_index
from cloudlet.overlay.format import (
    FILE_HEADER,
    FILE_HEADER_SIZE,
    MAGIC,
    RECORD,
    SEGMENT_HEADER,
    SEGMENT_MAGIC,
    TRAILER,
    TRAILER_MAGIC,
    Kind,
)

PAGE = 4096
MiB = 1 << 20


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=True, capture_output=True, text=True)


def text_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    """Compressible, log-like pages (each page unique)."""
    words = [b"alpha", b"beta", b"gamma", b"delta", b"kernel", b"page", b"cache", b"inode"]
    out = np.zeros((n, PAGE), dtype=np.uint8)
    for i in range(n):
        parts = []
        size = 0
        k = int(rng.integers(1 << 30))
        while size < PAGE:
            w = b"%s %d %s\n" % (words[k % 8], k, words[(k >> 3) % 8])
            parts.append(w)
            size += len(w)
            k = (k * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = np.frombuffer(b"".join(parts)[:PAGE], dtype=np.uint8)
    return out


def random_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8)


def write_pages(path: Path, first_page: int, pages: np.ndarray) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, pages.tobytes(), first_page * PAGE)
    finally:
        os.close(fd)


def read_pages(path: Path, first_page: int, n: int) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(first_page * PAGE)
        data = f.read(n * PAGE)
    return np.frombuffer(data, dtype=np.uint8).reshape(n, PAGE).copy()


def make_base(d: Path, *, ram_mib: int = 64, disk_mib: int = 600, seed: int = 1) -> BaseRef:
    """A base VM: sparse RAM with random, repeated, explicit-zero and text pages; a sparse
    600 MiB raw disk (two L2 tables' worth) with data at the start, middle and very end."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    ram, disk = d / "memory.ram", d / "disk.raw"
    with open(ram, "wb") as f:
        f.truncate(ram_mib * MiB)
    write_pages(ram, 0, random_pages(rng, 4096))
    patterns = random_pages(rng, 8)
    write_pages(ram, 4096, np.repeat(patterns, 32, axis=0))
    write_pages(ram, 4352, np.zeros((256, PAGE), np.uint8))
    write_pages(ram, 4608, text_pages(rng, 1536))
    with open(disk, "wb") as f:
        f.truncate(disk_mib * MiB)
    write_pages(disk, 0, random_pages(rng, 2048))  # [0, 8 MiB)
    write_pages(disk, 300 * MiB // PAGE, text_pages(rng, 512))  # [300, 302) MiB
    write_pages(disk, (disk_mib - 1) * MiB // PAGE, random_pages(rng, 256))  # last MiB
    save_index(page_index(ram), d / "memory.idx.npy")
    save_index(page_index(disk), d / "disk.idx.npy")
    return BaseRef("base-synth-1", ram, disk, d / "memory.idx.npy", d / "disk.idx.npy")


@dataclass
class SynthVM:
    base: BaseRef
    vm_dir: Path
    expect: dict[str, int] = field(default_factory=dict)


def make_vm(base: BaseRef, d: Path, *, seed: int = 2, compressed: bool = True) -> SynthVM:
    """A VM made from ``base``: memory edits of every record kind, and a qcow2 top layer
    written by qemu-io (pattern, file-sourced, zero, compressed, partial and end writes)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    ram = d / "memory.ram"
    run("cp", "--sparse=always", str(base.ram), str(ram))
    n_pages = ram.stat().st_size // PAGE
    write_pages(ram, 100, random_pages(rng, 300))  # literal (random over random)
    part = read_pages(ram, 1000, 200)
    part.view(np.uint64)[:, [3, 200, 511]] ^= np.uint64(0x0101)  # 3 words differ: xor
    write_pages(ram, 1000, part)
    write_pages(ram, 2000, read_pages(base.ram, 3000, 100))  # moved base pages: base_mem
    write_pages(ram, 2200, read_pages(base.disk, 10, 50))  # base disk pages: base_disk
    write_pages(ram, 2500, np.zeros((100, PAGE), np.uint8))  # zeroed: one zero run
    dup = random_pages(rng, 50)
    write_pages(ram, 7000, dup)  # new content in a hole ...
    write_pages(ram, 8000, dup)  # ... and again: self_mem
    write_pages(ram, 9000, text_pages(rng, 400))  # compressible literal
    write_pages(ram, 50, read_pages(base.ram, 50, 1))  # rewritten unchanged: no record
    write_pages(ram, n_pages - 1, random_pages(rng, 1))  # the last page
    expect = {
        "memory.xor": 200,
        "memory.base_mem": 100,
        "memory.base_disk": 50,
        "memory.self_mem": 50,
        "memory.literal": 300 + 50 + 400 + 1,
        "changed_pages": 300 + 200 + 100 + 50 + 100 + 50 + 50 + 400 + 1,
    }

    files = d / "src"
    files.mkdir()
    (files / "rnd.bin").write_bytes(random_pages(rng, 512).tobytes())  # 2 MiB
    (files / "rnd_end.bin").write_bytes(random_pages(rng, 32).tobytes())  # 128 KiB
    (files / "basemem.bin").write_bytes(read_pages(base.ram, 3100, 16).tobytes())
    (files / "basedisk.bin").write_bytes(read_pages(base.disk, 100, 16).tobytes())
    (files / "vmpage.bin").write_bytes(read_pages(ram, 100, 1).tobytes())
    (files / "same.bin").write_bytes(read_pages(base.disk, 5 * MiB // PAGE, 16).tobytes())
    disk = d / "disk.qcow2"
    size = base.disk.stat().st_size
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base.disk), "-F", "raw", str(disk))
    cmds = [
        "write -P 0xab 64M 256k",  # 64 equal pages: 1 literal + 63 self_disk
        f"write -s {files}/rnd.bin 10M 2M",  # random data over a hole: literal
        f"write -s {files}/rnd.bin 4M 256k",  # random data over random base data
        "write -z 200M 1M",  # zero clusters over a hole
        "write -z 1M 64k",  # zero cluster over base data
        "write -P 0x11 4096 512",  # 512 bytes into base random data: xor
        f"write -s {files}/basemem.bin 400M 64k",  # base memory pages: base_mem
        f"write -s {files}/basedisk.bin 450M 64k",  # base disk pages elsewhere: base_disk
        f"write -s {files}/vmpage.bin 500M 4k",  # same as a new VM memory page: self_mem
        f"write -s {files}/same.bin 5M 64k",  # rewrites base content: dropped
        f"write -P 0x77 {300 * MiB + 1000} 3000",  # unaligned, inside base text
        "write -c -P 0x33 520M 64k",  # a compressed cluster (no host offset in the map)
        f"write -P 0x5a {size - MiB} 512k",  # clusters at the very end of the disk ...
        f"write -s {files}/rnd_end.bin {size - 128 * 1024} 128k",  # ... and the last two
    ]
    if not compressed:
        cmds = [c for c in cmds if not c.startswith("write -c")]
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(disk))
    shutil.rmtree(files)
    (d / "devstate").write_bytes(
        b"QEVM" + bytes(200_000) + random_pages(rng, 100).tobytes()[:400_000]
    )
    expect.update({"disk.base_mem": 16, "disk.base_disk": 16, "disk.self_mem": 1})
    return SynthVM(base, d, expect)


# -- crafted files ---------------------------------------------------------------------------


def craft_overlay(
    segments: list[tuple[Kind, bytes, int]],
    *,
    base_id: str = "base-synth-1",
    memory_size: int = 64 * MiB,
    disk_size: int = 600 * MiB,
    base_disk_size: int = 600 * MiB,
    devstate_size: int = 0,
    manifest_patch: dict[str, object] | None = None,
    segment_patch: dict[int, dict[str, object]] | None = None,
    header_records: dict[int, int] | None = None,
    version: tuple[int, int] = (1, 0),
) -> bytes:
    """An overlay with the given (kind, raw records, count) segments, uncompressed, with
    correct hashes everywhere, so only the reader's bounds checks can refuse it."""
    import json

    body = b""
    entries = []
    for seq, (kind, raw, nrec) in enumerate(segments):
        hdr_n = (header_records or {}).get(seq, nrec)
        hdr = SEGMENT_HEADER.pack(SEGMENT_MAGIC, 1, 0, int(kind), 0, seq, hdr_n, len(raw), len(raw))
        seg = hdr + raw
        e = {
            "kind": kind.name.lower(),
            "offset": len(body),
            "length": len(seg),
            "blake3": blake3.blake3(seg).hexdigest(),
            "records": hdr_n,
            "raw": len(raw),
        }
        e.update((segment_patch or {}).get(seq, {}))
        entries.append(e)
        body += seg
    manifest = {
        "format": f"{version[0]}.{version[1]}",
        "base_id": base_id,
        "hardware": {"machine": "pc"},
        "meta": {},
        "memory_size": memory_size,
        "disk_size": disk_size,
        "base_disk_size": base_disk_size,
        "devstate_size": devstate_size,
        "page_size": 4096,
        "disk_cluster": 65536,
        "features": {"required": [], "optional": []},
        "totals": {},
        "segments_length": len(body),
        "segments": entries,
        "created": "",
        "creator": "test",
    }
    manifest.update(manifest_patch or {})
    mb = zstandard.ZstdCompressor().compress(json.dumps(manifest).encode())
    head = FILE_HEADER.pack(
        MAGIC, version[0], version[1], 0, FILE_HEADER_SIZE, 0, len(mb), blake3.blake3(mb).digest()
    )
    data = head + mb + body
    return data + TRAILER.pack(TRAILER_MAGIC, blake3.blake3(data).digest())


def rec(ptype: int, target: int, arg: int = 0, data: bytes = b"") -> bytes:
    return RECORD.pack(ptype, 0, 0, len(data), target, arg) + data


def our_files(d: Path) -> list[str]:
    """Files apply may have left in ``d`` (final or temporary names)."""
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir())
