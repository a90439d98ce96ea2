"""Benchmark the overlay engine on synthetic guest RAM (default 256 MiB).

The base RAM mixes holes (~40 %), text-like, pointer-array and random pages (zstd ~2x, like
real guest RAM); the VM changes ~30 % of its pages: half rewritten, a quarter changed in a few
words (XOR), the rest moved base pages, zeroed pages and duplicates among themselves. A small
qcow2 top layer (written by qemu-io) keeps the disk path in the loop without dominating it.

Measures, as the median of ``--runs`` runs (files in the page cache, as right after a VM was
suspended):

- examine: memory bytes compared per second (numpy over mmaps, data extents only), and the
  guest RAM size over the same time;
- encode: changed bytes (memory + disk) hashed, deduplicated, delta-encoded and compressed per
  second (classification time + waiting for the zstd threads);
- create and apply wall time, and the overlay size.

The last line printed is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cloudlet.overlay import (
    BaseRef,
    apply_overlay,
    create_overlay,
    file_chunks,
    page_index,
    save_index,
)

PAGE = 4096
MiB = 1 << 20


def mixed_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` pages: 40 % text-like tokens, 35 % pointer/counter arrays, 25 % random bytes."""
    out = np.empty((n, PAGE), dtype=np.uint8)
    kind = rng.choice(3, size=n, p=[0.40, 0.35, 0.25])
    vocab = rng.integers(0x61, 0x7B, size=(2000, 8), dtype=np.uint8)  # 2000 8-byte "words"
    vocab[:, rng.integers(3, 8, size=2000)] = 0x20
    t = np.flatnonzero(kind == 0)
    out[t] = vocab[rng.integers(0, 2000, size=(t.size, PAGE // 8))].reshape(t.size, PAGE)
    s = np.flatnonzero(kind == 1)
    shape = (s.size, PAGE // 8)
    pointers = np.uint64(0xFFFF_8880_0000_0000) + rng.integers(0, 1 << 24, shape).astype(
        np.uint64
    ) * np.uint64(64)
    counters = rng.integers(0, 256, shape).astype(np.uint64)
    words = np.where(rng.random(shape) < 0.5, pointers, counters)
    out[s] = words.astype("<u8").view(np.uint8).reshape(s.size, PAGE)
    r = np.flatnonzero(kind == 2)
    out[r] = rng.integers(0, 256, size=(r.size, PAGE), dtype=np.uint8)
    return out


def write_at(path: Path, page: int, pages: np.ndarray) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, pages.tobytes(), page * PAGE)
    finally:
        os.close(fd)


def build(root: Path, ram_mib: int, seed: int = 1) -> tuple[BaseRef, Path, dict[str, int]]:
    rng = np.random.default_rng(seed)
    n = ram_mib * MiB // PAGE
    base_dir, vm = root / "base", root / "vm"
    base_dir.mkdir(parents=True)
    vm.mkdir()
    ram = base_dir / "memory.ram"
    with open(ram, "wb") as f:
        f.truncate(n * PAGE)
    data_pages = np.sort(rng.choice(n, size=int(n * 0.6), replace=False))
    base_content = mixed_pages(rng, data_pages.size)
    for lo in range(0, data_pages.size, 8192):  # write runs of consecutive pages
        idx, pages = data_pages[lo : lo + 8192], base_content[lo : lo + 8192]
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, idx.size], strict=True):
            write_at(ram, int(idx[a]), pages[a:b])
    disk = base_dir / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
        f.write(mixed_pages(rng, 4096).tobytes())  # 16 MiB of data at the start
    t0 = time.perf_counter()
    save_index(page_index(ram), base_dir / "memory.idx.npy")
    save_index(page_index(disk), base_dir / "disk.idx.npy")
    index_s = time.perf_counter() - t0
    base = BaseRef("bench-base", ram, disk, base_dir / "memory.idx.npy", base_dir / "disk.idx.npy")

    # the VM: ~30 % of all pages changed
    subprocess.run(["cp", "--sparse=always", str(ram), str(vm / "memory.ram")], check=True)
    vram = vm / "memory.ram"
    changed = rng.permutation(n)[: int(n * 0.30)]
    k = changed.size
    cuts = np.cumsum([int(k * f) for f in (0.50, 0.25, 0.15, 0.05)])
    literal, partial, moved, zeroed, dups = np.split(changed, cuts)
    mm = np.memmap(vram, dtype=np.uint8, mode="r+", shape=(n, PAGE))
    bm = np.memmap(ram, dtype=np.uint8, mode="r", shape=(n, PAGE))
    mm[np.sort(literal)] = mixed_pages(rng, literal.size)
    p = np.sort(partial)
    cur = np.array(mm[p])
    cur.view(np.uint64)[:, rng.integers(0, 512, 4)] ^= np.uint64(0x1234_5678)
    mm[p] = cur
    mm[np.sort(moved)] = bm[rng.choice(data_pages, size=moved.size)]
    mm[np.sort(zeroed)] = 0
    src = mixed_pages(rng, max(1, dups.size // 4))
    mm[np.sort(dups)] = src[rng.integers(0, src.shape[0], dups.size)]
    mm.flush()
    del mm, bm

    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw",
         str(vm / "disk.qcow2")],
        check=True,
    )  # fmt: skip
    (root / "rnd.bin").write_bytes(mixed_pages(rng, 1024).tobytes())
    subprocess.run(
        ["qemu-io", "-f", "qcow2",
         "-c", f"write -s {root}/rnd.bin 32M 4M",
         "-c", f"write -s {root}/rnd.bin 4M 4M",
         "-c", "write -P 0x5a 100M 4M",
         "-c", "write -z 200M 1M",
         str(vm / "disk.qcow2")],
        check=True, capture_output=True,
    )  # fmt: skip
    (vm / "devstate").write_bytes(os.urandom(300_000) + bytes(300_000))
    return base, vm, {"ram_pages": n, "changed_pages": int(k), "index_s": round(index_s, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ram-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="overlay-bench-", dir=args.dir))
    try:
        base, vm, info = build(root, args.ram_mib)
        runs: list[dict[str, float]] = []
        for i in range(args.runs):
            ovl = root / f"run{i}.ovl"
            st = create_overlay(base, vm, ovl, hardware={}, level=args.level, threads=args.threads)
            s = st.seconds
            changed_bytes = (st.changed_pages + st.changed_disk_pages) * PAGE
            enc_s = s["memory_encode"] + s["disk_encode"] + s["compress_drain"]
            out = root / f"apply{i}"
            ap_st = apply_overlay(file_chunks(ovl), base, out, backing=str(base.disk))
            runs.append(
                {
                    "examine_gbps": st.memory_bytes_examined / s["memory_examine"] / 1e9,
                    "scan_gbps": args.ram_mib * MiB / s["memory_examine"] / 1e9,
                    "examine_cpu_gbps": st.memory_bytes_examined / s["memory_examine_cpu"] / 1e9,
                    "encode_mbps": changed_bytes / enc_s / 1e6,
                    "create_s": s["total"],
                    "apply_s": ap_st.seconds["total"],
                    "apply_copy_base_s": ap_st.seconds["copy_base"],
                    "overlay_mib": st.file_bytes / MiB,
                    "changed_mib": changed_bytes / MiB,
                }
            )
            r = runs[-1]
            print(
                f"run {i}: examine {r['examine_gbps']:.2f} GB/s "
                f"({r['examine_cpu_gbps']:.2f} per CPU-second), "
                f"encode {r['encode_mbps']:.0f} MB/s, create {r['create_s']:.3f} s, "
                f"apply {r['apply_s']:.3f} s, overlay {r['overlay_mib']:.1f} MiB "
                f"of {r['changed_mib']:.1f} MiB changed",
                file=sys.stderr,
            )
            ovl.unlink()
            shutil.rmtree(out)
        med = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        summary = {
            "bench": "overlay_engine",
            "ram_mib": args.ram_mib,
            "runs": args.runs,
            "level": args.level,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            **info,
            "median": med,
            "records": st.records,
        }
        print(json.dumps(summary, sort_keys=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
