"""The sending end of a handoff: pre-copy rounds while the VM runs, then stop-and-copy.

What the destination has is tracked exactly: a *shadow* of its RAM (it starts as the base VM's
RAM, which the destination already holds) and, for the disk, a hash of every page sent. Each
round compares the live VM against the shadow and sends only the difference; every page sent
is copied into the shadow *as it was sent*. Pages read while the VM runs may be torn, but that
does not matter: the final round, taken with the VM paused, compares against exactly what was
sent and so catches every page that differs, torn or not.

Pages the destination's base already has (same content anywhere in the base's RAM or disk,
found by hash and checked byte for byte) go as references; zero pages as zero runs; the rest as
literal pages, framed and compressed with the codec the adaptive controller picks per frame.

Rounds stop when the last one would fit the downtime target, when the changed set stops
shrinking, or at ``max_rounds``. Then the VM is paused, its device state saved, the last
difference and the device state sent, and the destination restores and resumes the VM. Only
after it confirms is the source VM ended and its directory removed. Any failure before that
resumes the source VM (if it was paused) and aborts the destination session: the VM keeps
running, untouched.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from cloudlet.config import Paths
from cloudlet.errors import CloudletError, ConflictError
from cloudlet.handoff.adaptive import CompressionController, Option
from cloudlet.handoff.converge import Throttle, next_fraction
from cloudlet.handoff.errors import HandoffError, HandoffTransferError
from cloudlet.handoff.link import DestinationLink
from cloudlet.handoff.wire import (
    CODEC_DEVSTATE_DICT,
    DEVSTATE_DICT_LEVEL,
    compress_devstate,
    devstate_dictionary,
    encode_frame,
)
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.usernet import AnswerWatch
from cloudlet.hypervisor.vm import VM, VMManager, VMState
from cloudlet.overlay.codecs import CODECS
from cloudlet.overlay.format import MAX_DEVSTATE_RECORD, PAGE, Kind, Payload, pack_record
from cloudlet.overlay.index import PageLookup, load_index
from cloudlet.overlay.qcow2 import TopLayer
from cloudlet.synthesis.base import BaseStore, BaseVM
from cloudlet.util.procs import renice
from cloudlet.util.sparse import data_extents

log = logging.getLogger("cloudlet.handoff")

Progress = Callable[[str, int, int], None]
COMPARE_CHUNK = 64 << 20
_BURST_POLL_S = 0.002  # how often the final burst asks for the VM's connections
_STAMP_SETTLE_S = 0.05  # a file time this old cannot be stamped again by a write in its tick
REFERENCE_SAMPLE = 128 << 10  # bytes of each frame compressed with zstd-1 as the reference
_ZERO_PAGE = bytes(PAGE)
_ZERO_H128 = xxhash.xxh3_128_intdigest(_ZERO_PAGE)
_DEVSTATE_OPTION = Option("zstd-base-devstate", CODEC_DEVSTATE_DICT, DEVSTATE_DICT_LEVEL)


@dataclass
class HandoffOptions:
    downtime_target_s: float = 1.0
    max_rounds: int = 20
    frame_raw_bytes: int = 1 << 20
    # The final round's frames are smaller, so that the link starts on the first changed pages
    # while the paused VM's memory is still being compared (that compare is downtime).
    final_frame_raw_bytes: int = 128 << 10
    shrink_factor: float = 0.9  # a round must be smaller than this x the previous one
    auto_converge: bool = True  # throttle a VM whose rounds stop shrinking (see converge.py)
    throttle_first: float = 0.8  # first throttle: the VM held 80% of the time
    throttle_max: float = 0.97  # at most: the VM still runs 3% of the time
    throttle_period_s: float = 0.1
    # A VM that was throttled runs unthrottled before the final pause until it has answered
    # the requests it holds: held 97% of the time, a service answers about once a second, and
    # without this its last answer could come that long before the pause. The cost is what the
    # VM dirties meanwhile, in the final round (see _final_burst). At most final_burst_max_s
    # once the guest has been seen closing connections after answering (as HTTP/1.0 does),
    # else final_burst_s: a kept-alive connection looks unanswered, whatever it waits for.
    final_burst_s: float = 0.05
    final_burst_max_s: float = 0.25


@dataclass
class RoundStats:
    round: int
    final: bool
    memory_pages: int = 0
    disk_pages: int = 0
    devstate_bytes: int = 0
    devstate_wire_bytes: int = 0
    throttle: float = 0.0  # fraction of time the VM was held paused during the round
    raw_bytes: int = 0
    wire_bytes: int = 0
    frames: int = 0
    records: dict[str, int] = field(default_factory=dict)
    compare_s: float = 0.0
    encoded_s: float = 0.0  # from the round's start to its last frame handed to the link
    seconds: float = 0.0
    # final round only: seconds to pause the VM and to save its device state (before the round)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Wire bytes per second this round achieved end to end."""
        return self.wire_bytes / self.seconds if self.seconds > 0 else 0.0


def xor_record(p: int, data: bytes, old: bytes) -> bytes | None:
    """Page ``p`` as its XOR with ``old`` (what the destination holds there), if that has
    under half the page's non-zero bytes; else None (send it whole)."""
    new = np.frombuffer(data, dtype=np.uint8)
    x = np.bitwise_xor(new, np.frombuffer(old, dtype=np.uint8))
    if 2 * np.count_nonzero(x) < np.count_nonzero(new):
        return pack_record(Payload.XOR_CURRENT, p, 0, x.tobytes())
    return None


def _load_sparse(path: Path, size: int) -> np.ndarray:
    """The file as a writable uint8 array, reading only its data extents (holes are zeros)."""
    arr = np.zeros(size, dtype=np.uint8)
    mv = memoryview(arr)
    with open(path, "rb") as f:
        for start, end in data_extents(f.fileno(), min(size, os.fstat(f.fileno()).st_size)):
            f.seek(start)
            f.readinto(mv[start:end])
    return arr


class _Encoder:
    """Finds what the destination lacks and turns it into compressed frames (one thread)."""

    def __init__(
        self, vm: VM, base: BaseVM, controller: CompressionController, opts: HandoffOptions
    ) -> None:
        self.vm, self.base, self.ctl, self.opts = vm, base, controller, opts
        self.mem_size = vm.hardware.memory_bytes
        self.ram = np.memmap(vm.ram_path, dtype=np.uint8, mode="r", shape=(self.mem_size,))
        self.shadow = _load_sparse(base.path("memory.ram"), self.mem_size)
        self.base_ram_fd = os.open(base.path("memory.ram"), os.O_RDONLY)
        self.base_disk_fd = os.open(base.path("disk.raw"), os.O_RDONLY)
        self.base_disk_size = os.fstat(self.base_disk_fd).st_size
        self.mem_lookup = PageLookup(load_index(base.path("memory.idx.npy")))
        self.disk_lookup = PageLookup(load_index(base.path("disk.idx.npy")))
        self.disk_shadow: dict[int, int] = {}  # page -> xxh3-128 of what the destination has
        # The destination holds the base's device state too: the VM's is sent as a delta.
        self.devstate_dict = devstate_dictionary(base.path("devstate").read_bytes())
        self.devstate_dict.precompute_compress(level=DEVSTATE_DICT_LEVEL)
        self.pool = cf.ThreadPoolExecutor(
            max(1, controller.cores), thread_name_prefix="handoff-zstd"
        )
        self.compare_pool = cf.ThreadPoolExecutor(2, thread_name_prefix="handoff-compare")
        self._disk_stamp: tuple[int, int, int] | None = None  # the layer file when last scanned
        # Memory pages found changed in each of the last two rounds: the final round looks at
        # these first, as the guest's hot set is where most of its last changes are.
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=2)
        self._found: list[int] = []  # pages changed_memory yielded in the current round

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.compare_pool.shutdown(wait=True, cancel_futures=True)
        for fd in (self.base_ram_fd, self.base_disk_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        del self.ram

    # -- what changed --------------------------------------------------------------------
    def _base_page(self, fd: int, page: int, size: int | None = None) -> bytes:
        off = page * PAGE
        if size is not None and off >= size:
            return _ZERO_PAGE
        data = os.pread(fd, PAGE, off)
        return data if len(data) == PAGE else data + bytes(PAGE - len(data))

    def _differing_pages(self, w0: int, words: int) -> np.ndarray:
        """Pages of one chunk whose live content differs from the shadow (numpy, no GIL)."""
        a = self.ram.view(np.uint64)[w0 : w0 + words].reshape(-1, PAGE // 8)
        b = self.shadow.view(np.uint64)[w0 : w0 + words].reshape(-1, PAGE // 8)
        return np.flatnonzero(np.any(a != b, axis=1)) + w0 // (PAGE // 8)

    def changed_memory(
        self, stop: threading.Event
    ) -> collections.abc.Iterator[tuple[int, bytes, bytes | None]]:
        """Pages that differ from the shadow, each copied into the shadow as it is read,
        with what the shadow held before (what the destination has there now).

        The compare runs a chunk ahead on the compare pool (2 threads): it is a full pass over
        guest RAM in every round, including the final one, where it is downtime.
        """
        words = COMPARE_CHUNK // 8
        starts = list(range(0, self.mem_size // 8, words))
        ahead: collections.deque[cf.Future[np.ndarray]] = collections.deque()
        try:
            for w0 in starts[:2]:
                ahead.append(self.compare_pool.submit(self._differing_pages, w0, words))
            for i in range(len(starts)):
                pages = ahead.popleft().result()
                if i + 2 < len(starts):
                    ahead.append(
                        self.compare_pool.submit(self._differing_pages, starts[i + 2], words)
                    )
                if stop.is_set():
                    return
                yield from self._take(pages.tolist())
        finally:
            for f in ahead:
                f.cancel()

    def changed_hot_memory(
        self, stop: threading.Event
    ) -> collections.abc.Iterator[tuple[int, bytes, bytes | None]]:
        """The recently changed pages (``recent``) that differ from the shadow, first.

        Only for the final round, with the VM paused: what this yields is then equal to the
        shadow, so the full pass of ``changed_memory`` that follows does not find it again, and
        both together find exactly what one full pass would. Yielding the guest's hot set first
        lets the link start at once instead of after the whole compare.
        """
        if not self.recent:
            return
        pages = np.unique(np.concatenate(list(self.recent)))
        rows_live = self.ram.view(np.uint64).reshape(-1, PAGE // 8)
        rows_shadow = self.shadow.view(np.uint64).reshape(-1, PAGE // 8)
        for lo in range(0, len(pages), 4096):
            if stop.is_set():
                return
            part = pages[lo : lo + 4096]
            differ = part[np.any(rows_live[part] != rows_shadow[part], axis=1)]
            yield from self._take(differ.tolist())

    def _take(self, pages: list[int]) -> collections.abc.Iterator[tuple[int, bytes, bytes | None]]:
        """Each page with what the shadow held, the shadow then set to the page as read."""
        for p in pages:
            off = p * PAGE
            data = self.ram[off : off + PAGE].tobytes()  # may be torn: that is fine
            old = self.shadow[off : off + PAGE].tobytes()
            self.shadow[off : off + PAGE] = np.frombuffer(data, dtype=np.uint8)
            self._found.append(p)
            yield p, data, old

    def changed_disk(
        self, stop: threading.Event
    ) -> collections.abc.Iterator[tuple[int, bytes, bytes | None]]:
        """Pages of the top layer whose content differs from what the destination has.

        Skipped outright when the layer file has not been written since the previous scan
        began (same size, mtime and ctime). The kernel stamps times at a coarse tick and skips
        an update within the same tick, so a stamp is trusted only once it is older than
        ``_STAMP_SETTLE_S``; a fresh one means a full scan next time too.
        """
        st = os.stat(self.vm.disk_path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if stamp == self._disk_stamp:
            return
        settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _STAMP_SETTLE_S * 1e9
        self._disk_stamp = None
        yield from self._scan_disk(stop)
        if settled and not stop.is_set():
            self._disk_stamp = stamp

    def _scan_disk(
        self, stop: threading.Event
    ) -> collections.abc.Iterator[tuple[int, bytes, bytes | None]]:
        with TopLayer(self.vm.disk_path, force_share=True) as top:
            for piece in top.pieces():
                if stop.is_set():
                    return
                if piece.kind == "data" and not piece.compressed:
                    blob = os.pread(top.fd, piece.count * PAGE, piece.offset)
                    blob += bytes(piece.count * PAGE - len(blob))
                    pages = (
                        (piece.first + i, blob[i * PAGE : (i + 1) * PAGE])
                        for i in range(piece.count)
                    )
                elif piece.kind == "zero":
                    pages = ((piece.first + i, _ZERO_PAGE) for i in range(piece.count))
                else:  # partial or compressed: assemble page by page
                    pages = (
                        (piece.first + i, self._assemble(top, piece, i)) for i in range(piece.count)
                    )
                for p, data in pages:
                    h = xxhash.xxh3_128_intdigest(data)
                    prev = self.disk_shadow.get(p)
                    if prev == h:
                        continue
                    if prev is None and data == self._base_page(
                        self.base_disk_fd, p, self.base_disk_size
                    ):
                        continue  # the destination's base already has it at this offset
                    self.disk_shadow[p] = h
                    yield p, data, None  # (only a hash is kept of what the destination has)

    def _assemble(self, top: TopLayer, piece: Any, i: int) -> bytes:
        p = piece.first + i
        if piece.kind == "data":  # compressed cluster
            ext = piece.parts[0][2]
            return top.read(ext, p * PAGE - ext.start, PAGE)
        page = bytearray(self._base_page(self.base_disk_fd, p, self.base_disk_size))
        for off_in_page, length, ext in piece.parts:
            page[off_in_page : off_in_page + length] = top.read(
                ext, p * PAGE + off_in_page - ext.start, length
            )
        return bytes(page)

    # -- records -------------------------------------------------------------------------
    def record(
        self,
        kind: Kind,
        p: int,
        data: bytes,
        old: bytes | None,
        counts: dict[str, int],
        sent_mem: dict[int, int],
    ) -> bytes:
        """One record for page ``p``; ``sent_mem`` maps hashes of memory pages sent this round.

        A disk page equal to a memory page sent earlier in the same round (file data is often
        in the guest's page cache too) goes as a reference to that page: memory records of a
        round are applied before its disk records, so the destination has exactly those bytes.

        ``old`` is what the destination holds at ``p`` now. A page that changed in a few places
        (kernel structures, counters, an allocator's headers: most of what a running guest
        dirties between rounds) goes as its XOR with ``old``, mostly zeros, which compresses
        to a few dozen bytes where the page itself would take hundreds or thousands (QEMU's
        XBZRLE does the same against its cache of sent pages). It is used when the XOR has
        under half the page's non-zero bytes.
        """
        if not np.frombuffer(data, dtype=np.uint64).any():
            counts["zero"] = counts.get("zero", 0) + 1
            return pack_record(Payload.ZERO, p, 1)
        h = xxhash.xxh3_64_intdigest(data)
        if kind is Kind.DISK:
            q = sent_mem.get(h)
            if q is not None and self.shadow[q * PAGE : (q + 1) * PAGE].tobytes() == data:
                counts["self_mem"] = counts.get("self_mem", 0) + 1
                return pack_record(Payload.SELF_MEM, p, q)
        for ptype, lookup, fd, size in (
            (Payload.BASE_MEM, self.mem_lookup, self.base_ram_fd, None),
            (Payload.BASE_DISK, self.disk_lookup, self.base_disk_fd, self.base_disk_size),
        ):
            for q in lookup.candidates(h)[:4].tolist():
                if self._base_page(fd, q, size) == data:  # a hash match is checked byte for byte
                    name = ptype.name.lower()
                    counts[name] = counts.get(name, 0) + 1
                    return pack_record(ptype, p, q)
        if kind is Kind.MEMORY:
            sent_mem.setdefault(h, p)  # the destination has ``data`` at ``p`` after either record
        if old is not None and old != _ZERO_PAGE:
            rec = xor_record(p, data, old)
            if rec is not None:
                counts["xor_current"] = counts.get("xor_current", 0) + 1
                return rec
        counts["literal"] = counts.get("literal", 0) + 1
        return pack_record(Payload.LITERAL, p, 0, data)

    # -- frames --------------------------------------------------------------------------
    def _compress(self, raw: bytes, opt: Option) -> tuple[bytes, Option]:
        t0 = time.thread_time()
        stored = CODECS[opt.codec].compress(raw, opt.level)
        cpu = time.thread_time() - t0
        if opt.codec and len(stored) >= len(raw):
            return raw, Option("none", 0, 0)  # incompressible: send as is
        # The frame's size under zstd-1, from a sample: the controller compares options by
        # their gain over it on the same content (~1/8 of a zstd-1 pass per frame).
        sample = raw[:REFERENCE_SAMPLE]
        ref = len(CODECS[1].compress(sample, 1)) * len(raw) / max(1, len(sample))
        self.ctl.observe_compress(opt, len(raw), len(stored), cpu, ref)
        return stored, opt

    def round(
        self,
        n: int,
        emit: Callable[[bytes], None],
        stop: threading.Event,
        devstate: Path | None,
        progress: Progress | None,
    ) -> RoundStats:
        st = RoundStats(round=n, final=devstate is not None)
        pending: collections.deque[tuple[cf.Future[tuple[bytes, Option]], Kind, int, int]] = (
            collections.deque()
        )
        seq = 0

        def drain(limit: int) -> None:
            """Emit frames in order: while more than ``limit`` wait, and any already done."""
            nonlocal seq
            while len(pending) > limit or (pending and pending[0][0].done()):
                fut, kind, nrec, raw_len = pending.popleft()
                stored, opt = fut.result()
                frame = encode_frame(seq, kind, nrec, stored, raw_len, opt.codec, opt.level)
                seq += 1
                st.frames += 1
                st.wire_bytes += len(frame)
                if kind is Kind.DEVSTATE:
                    st.devstate_wire_bytes += len(frame)
                emit(frame)

        def submit(kind: Kind, buf: bytearray, nrec: int) -> None:
            raw = bytes(buf)
            st.raw_bytes += len(raw)
            if kind is Kind.DEVSTATE:  # against the base's device state, not the controller's
                fut: cf.Future[tuple[bytes, Option]] = self.pool.submit(
                    lambda: (compress_devstate(raw, self.devstate_dict), _DEVSTATE_OPTION)
                )
            else:
                fut = self.pool.submit(self._compress, raw, self.ctl.choose())
            pending.append((fut, kind, nrec, len(raw)))
            drain(self.ctl.cores * 2)

        final = devstate is not None
        frame_bytes = self.opts.final_frame_raw_bytes if final else self.opts.frame_raw_bytes
        t0 = time.monotonic()
        if devstate is not None:
            data = devstate.read_bytes()
            st.devstate_bytes = len(data)
            buf, nrec = bytearray(), 0
            for off in range(0, len(data), MAX_DEVSTATE_RECORD):
                chunk = data[off : off + MAX_DEVSTATE_RECORD]
                buf += pack_record(Payload.LITERAL, off, 0, chunk)
                nrec += 1
                if len(buf) >= frame_bytes:
                    submit(Kind.DEVSTATE, buf, nrec)
                    buf, nrec = bytearray(), 0
            if nrec:
                submit(Kind.DEVSTATE, buf, nrec)
        sources: list[tuple[Kind, Callable[..., Any]]] = [
            (Kind.MEMORY, self.changed_memory),
            (Kind.DISK, self.changed_disk),
        ]
        if final:  # the paused VM's hot set first (see changed_hot_memory)
            sources.insert(0, (Kind.MEMORY, self.changed_hot_memory))
        self._found = []
        sent_mem: dict[int, int] = {}
        for kind, source in sources:
            buf, nrec = bytearray(), 0
            tc = time.monotonic()
            for p, data, old in source(stop):
                buf += self.record(kind, p, data, old, st.records, sent_mem)
                nrec += 1
                if kind is Kind.MEMORY:
                    st.memory_pages += 1
                else:
                    st.disk_pages += 1
                if len(buf) >= frame_bytes:
                    submit(kind, buf, nrec)
                    buf, nrec = bytearray(), 0
                    if progress:
                        progress(f"round {n}", st.raw_bytes, 0)
            if nrec:
                submit(kind, buf, nrec)
            st.compare_s += time.monotonic() - tc
            if source == self.changed_hot_memory:
                drain(0)  # on the link now, not when the full compare next finds a page
        drain(0)
        self.recent.append(np.array(self._found, dtype=np.int64))
        st.seconds = st.encoded_s = time.monotonic() - t0
        return st


_END = object()


class HandoffSource:
    """Move VM ``vm_id`` to the destination behind ``link``. One use per instance."""

    def __init__(
        self,
        paths: Paths,
        vm_id: str,
        link: DestinationLink,
        *,
        options: HandoffOptions | None = None,
        controller: CompressionController | None = None,
        meta: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.paths = paths
        self.vm_id = vm_id
        self.link = link
        self.opts = options or HandoffOptions()
        self.ctl = controller or CompressionController()
        self.meta = meta or {}
        self.progress = progress
        self.vms = VMManager(paths)
        self.rounds: list[RoundStats] = []
        self.throttle_steps: list[dict[str, float]] = []
        self.burst_s = 0.0  # measured: the throttle's end to the final pause (when throttled)
        self.burst: dict[str, Any] = {}  # how that burst ended (see _final_burst)
        self.watch: AnswerWatch | None = None  # the VM's answers, once it is throttled

    async def run(self) -> dict[str, Any]:
        vm = self.vms.get(self.vm_id)
        if vm.state is not VMState.RUNNING:
            raise ConflictError(
                f"VM {vm.id} is {vm.state.value}; only a running VM can be handed off"
            )
        if vm.source.kind != "base":
            raise ConflictError(
                f"VM {vm.id} was not started from a base VM: a handoff needs a base both sides hold"
            )
        base = BaseStore(self.paths).get(vm.source.name)
        t_start = time.monotonic()
        with self.vms.locked(vm):  # a second handoff of the same VM gets a ConflictError (409)
            req = {
                "base_id": base.base_id,
                "hardware": vm.hardware.to_dict(),
                "guest_ports": [f.guest for f in vm.forwards],
                "name": vm.name,
                "meta": self.meta,
            }
            session = (await self.link.prepare(req))["session"]  # refused here: nothing paused
            enc = await asyncio.to_thread(_Encoder, vm, base, self.ctl, self.opts)
            try:
                result, t_pause, t_resumed = await self._transfer(vm, enc, session)
            finally:
                enc.close()
            # The destination runs the VM: only now end ours.
            await self._end_source(vm)
        await self.vms.delete(vm.id, force=True)
        return {
            "vm": vm.id,
            "destination": result,
            "total_s": round(t_resumed - t_start, 4),
            "downtime_s": round(t_resumed - t_pause, 4),
            "rounds": [asdict(r) for r in self.rounds],
            "bytes_on_wire": sum(r.wire_bytes for r in self.rounds),
            "compression": self.ctl.snapshot(),
            "throttle": self.throttle_steps,
            "final_burst_s": round(self.burst_s, 4),
            "final_burst": self.burst,
        }

    async def _transfer(
        self, vm: VM, enc: _Encoder, session: str
    ) -> tuple[dict[str, Any], float, float]:
        # One QMP connection for the whole transfer: QEMU's monitor takes one client at a time,
        # and both the throttle and the stop-and-copy need it.
        try:
            mon = await Monitor.connect(vm.qmp_path)
        except BaseException:
            await self.link.abort(session)
            raise
        try:
            throttle = Throttle(mon, period=self.opts.throttle_period_s)
            try:
                try:
                    await self._precopy(vm, enc, session, throttle)
                finally:
                    await throttle.close()  # the VM runs again; the pause below is the real one
                if self.throttle_steps and self.opts.final_burst_s > 0:
                    await self._final_burst(vm, mon)
                if self.watch is not None:
                    await self.watch.stop()  # the monitor is the final pause's alone now
            except BaseException:
                await self.link.abort(session)
                raise
            return await self._stop_and_copy(vm, enc, session, mon)
        finally:
            if self.watch is not None:
                await self.watch.stop()
            with contextlib.suppress(Exception):
                await mon.close()

    async def _final_burst(self, vm: VM, mon: Monitor) -> None:
        """Let a throttled VM run until it has answered the requests it held, then return.

        The requests are the host connections on the VM's forwarded ports that its guest had
        not answered (closed) when the throttle ended, as QEMU's user network reports them
        (``cloudlet.hypervisor.usernet``). Pausing just after the last of them is answered
        puts the client's last answer from the source right before the pause; pausing later
        would only add what the VM dirties meanwhile to the final round. So the pause comes at
        once when none is held, or when the guest answered one less than ``final_burst_s``
        ago (the watch kept since the throttle began says when): what is held then arrived
        after that answer, and the client has waited less than the burst could save.

        The wait is capped at ``final_burst_max_s`` once the watch has seen the guest answer
        (close) a connection, else at ``final_burst_s``: a kept-alive connection looks
        unanswered until its client closes it, so without that evidence a held connection may
        be waiting for nothing. If the table cannot be read, the burst is ``final_burst_s``.
        """
        cap = self.opts.final_burst_s
        t0 = time.monotonic()
        watch = self.watch or AnswerWatch(mon, vm.forwards)
        await watch.stop()  # polled here from now on
        held: set[int] | None = None
        since = None
        try:
            held = await watch.poll()
            since = watch.since_answer()
            waiting = set(held) if since is None or since >= cap else set()
            limit = cap if since is None else max(cap, self.opts.final_burst_max_s)
            while waiting and time.monotonic() - t0 < limit:
                await asyncio.sleep(_BURST_POLL_S)
                waiting &= await watch.poll()
        except CloudletError as e:
            log.warning("handoff VM %s: cannot read its connections (%s); a fixed burst", vm.id, e)
            await asyncio.sleep(max(0.0, cap - (time.monotonic() - t0)))
            waiting = set()
        self.burst_s = time.monotonic() - t0
        if held is None:
            ended = "unknown"
        elif not held:
            ended = "none held"
        elif since is not None and since < cap:
            ended = "just answered"
        else:
            ended = "cap" if waiting else "answered"
        self.burst = {
            "held": None if held is None else len(held),
            "ended": ended,
            "since_answer_s": None if since is None else round(since, 4),
        }
        log.info(
            "handoff VM %s: ran unthrottled %.3f s before the pause (%s requests held, %s)",
            vm.id, self.burst_s, self.burst["held"], ended,
        )  # fmt: skip

    async def _precopy(self, vm: VM, enc: _Encoder, session: str, throttle: Throttle) -> None:
        """Rounds while the VM runs, until the last one fits the downtime target.

        A round that is not clearly smaller than the one before means the guest dirties memory
        about as fast as the link drains it. Then, with ``auto_converge``, the VM is throttled
        harder for the next rounds (as QEMU's auto-converge does) instead of giving up with a
        large final round; without it, or at the strongest throttle, the rounds end there.
        """
        o = self.opts
        prev: RoundStats | None = None
        for n in range(1, o.max_rounds + 1):
            throttle.measured()
            _, st = await self._round(enc, session, n, None)
            st.throttle = round(throttle.measured(), 3)
            log.info(
                "handoff VM %s round %d: %d memory + %d disk pages, %d wire bytes, %.2f s, "
                "VM held %.0f%%",
                vm.id, n, st.memory_pages, st.disk_pages, st.wire_bytes, st.seconds,
                100 * st.throttle,
            )  # fmt: skip
            fits = st.rate > 0 and st.wire_bytes / st.rate <= o.downtime_target_s / 2
            shrinking = prev is None or st.raw_bytes < prev.raw_bytes * o.shrink_factor
            if fits:
                return
            if not shrinking:
                if not o.auto_converge or throttle.fraction >= o.throttle_max:
                    return
                f = next_fraction(throttle.fraction, first=o.throttle_first, maximum=o.throttle_max)
                log.info(
                    "handoff VM %s: round %d did not shrink (%d -> %d raw bytes); "
                    "throttling the VM to run %.0f%% of the time",
                    vm.id, n, prev.raw_bytes if prev else 0, st.raw_bytes, 100 * (1 - f),
                )  # fmt: skip
                throttle.set(f)
                if self.watch is None:  # when its guest answers, for the final burst
                    self.watch = AnswerWatch(throttle.mon, vm.forwards)
                    self.watch.start()
                self.throttle_steps.append({"after_round": n, "held": round(f, 3)})
            prev = st

    async def _stop_and_copy(
        self, vm: VM, enc: _Encoder, session: str, mon: Monitor
    ) -> tuple[dict[str, Any], float, float]:
        t_pause = time.monotonic()
        devstate = vm.dir / "handoff.devstate"
        try:
            await self.vms.pause(vm, mon)
            t_paused = time.monotonic()
            await self.vms.save_devstate(vm, mon, devstate)
            t_saved = time.monotonic()
            result, st = await self._round(enc, session, len(self.rounds) + 1, devstate)
            t_resumed = time.monotonic()
            st.phases = {
                "pause_s": round(t_paused - t_pause, 4),
                "devstate_s": round(t_saved - t_paused, 4),
            }
        except BaseException as e:
            with contextlib.suppress(Exception):
                await mon.execute("cont")  # the source VM keeps serving, untouched
            await self.link.abort(session)
            if isinstance(e, HandoffError | asyncio.CancelledError):
                raise
            if isinstance(e, CloudletError):
                raise HandoffTransferError("sending the last round", e.message) from e
            raise HandoffTransferError("sending the last round", f"{type(e).__name__}: {e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                devstate.unlink()
        return result, t_pause, t_resumed

    async def _round(
        self, enc: _Encoder, session: str, n: int, devstate: Path | None
    ) -> tuple[dict[str, Any], RoundStats]:
        q: queue.Queue[object] = queue.Queue(maxsize=8)
        stop = threading.Event()
        holder: list[RoundStats] = []

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                holder.append(enc.round(n, put, stop, devstate, self.progress))
                put(_END)
            except BaseException as e:  # handed to the sender, which raises it
                put(e)

        async def frames() -> AsyncIterator[bytes]:
            while True:
                item = await asyncio.to_thread(q.get)
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, bytes)
                yield item

        t = threading.Thread(target=produce, name=f"handoff-round-{n}", daemon=True)
        t0 = time.monotonic()
        t.start()
        try:
            result = await self.link.send(session, frames(), final=devstate is not None)
        finally:
            stop.set()
            await asyncio.to_thread(t.join, 30)
        st = holder[0] if holder else RoundStats(round=n, final=devstate is not None)
        st.seconds = time.monotonic() - t0
        self.rounds.append(st)
        return result, st

    async def _end_source(self, vm: VM) -> None:
        pid = vm.pid
        if pid and vm.process_alive(pid):
            # Its exit (unmapping the guest's RAM) is clean-up: behind the guests of this host,
            # such as the moved VM itself when both cloudlets share one, as in the bench.
            renice(pid)
        try:
            async with await Monitor.connect(vm.qmp_path, timeout=3) as mon:
                with contextlib.suppress(Exception):
                    await mon.execute("quit")
        except CloudletError:
            pass
        if pid and vm.process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        vm.state, vm.pid = VMState.STOPPED, None
        vm.meta["handed_off"] = time.time()
        vm.save()
