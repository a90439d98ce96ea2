"""Synthesis: base VM + overlay -> a running VM, resumed from memory.

The overlay is streamed (a file or an http(s) URL): a reader thread pulls bytes off the source
while the delta engine checks and applies each segment as it arrives, so the RAM file and the
disk layer are being rebuilt while the rest is still downloading. The VM's QEMU is started as
soon as those files exist, waiting for the device state (as a handoff's destination does), so
that its start (0.05-0.14 s under TCG in ``bench/synthesis.py`` run E) overlaps the download
instead of following it; its vCPUs never run until the whole overlay has been checked. Then the
device state is loaded and the VM runs, with its application already in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cloudlet.config import Paths
from cloudlet.errors import CloudletError, InvalidInputError, NotFoundError
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.probe import first_answer
from cloudlet.hypervisor.vm import VM, VMManager
from cloudlet.overlay.apply import apply_overlay
from cloudlet.synthesis.base import BaseStore

READ_CHUNK = 256 * 1024
QUEUE_DEPTH = 64  # chunks buffered between the reader and the decoder (16 MiB)


class FetchError(CloudletError):
    """The overlay could not be read from its source (unreachable, cut off, not found)."""

    exit_code = 8
    status_code = 502


@dataclass
class Fetch:
    """Bytes from a path or URL, read by a background thread; records when the last byte came."""

    source: str
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    total: int | None = None

    def chunks(self) -> Iterator[bytes]:
        q: queue.Queue[bytes | BaseException | None] = queue.Queue(QUEUE_DEPTH)
        stop = threading.Event()

        def put(item: bytes | BaseException | None) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def reader() -> None:
            try:
                for chunk in self._read():
                    self.bytes += len(chunk)
                    if not put(chunk):
                        return
                self.finished = time.monotonic()
                put(None)
            except BaseException as e:  # handed to the consumer, which raises it
                put(e)

        t = threading.Thread(target=reader, name="overlay-fetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(5)

    def _read(self) -> Iterator[bytes]:
        if self.source.startswith(("http://", "https://")):
            yield from self._read_http()
            return
        p = Path(self.source)
        if not p.is_file():
            raise NotFoundError(f"no overlay file {self.source}")
        self.total = p.stat().st_size
        with open(p, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk

    def _read_http(self) -> Iterator[bytes]:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(30.0, read=60.0)) as client,
                client.stream("GET", self.source) as r,
            ):
                if r.status_code != 200:
                    raise FetchError(
                        f"cannot fetch the overlay: {self.source} answered {r.status_code}",
                        hint="check the URL",
                    )
                length = r.headers.get("content-length")
                self.total = int(length) if length and length.isdigit() else None
                got = 0
                for chunk in r.iter_raw(READ_CHUNK):
                    got += len(chunk)
                    yield chunk
                if self.total is not None and got < self.total:
                    raise FetchError(
                        f"the overlay download stopped after {got} of {self.total} bytes"
                    )
        except httpx.HTTPError as e:
            raise FetchError(
                f"cannot fetch the overlay from {self.source}: {type(e).__name__}: {e}",
                hint="check that the server is reachable and try again",
            ) from e


@dataclass
class SynthesisResult:
    vm: VM
    timings: dict[str, float]
    overlay_bytes: int
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.vm.summary() | {
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "overlay_bytes": self.overlay_bytes,
        }


async def synthesize(
    paths: Paths,
    base_name: str,
    source: str,
    *,
    forwards: list[PortForward] | None = None,
    name: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    first_response_timeout: float = 30.0,
) -> SynthesisResult:
    """Rebuild a VM from ``base_name`` and the overlay at ``source``, resume it, time it."""
    if not source:
        raise InvalidInputError("no overlay source given")
    bases = BaseStore(paths)
    base = bases.get(base_name)
    mgr = VMManager(paths)
    src = base.boot_source()
    t0 = time.monotonic()
    vm = mgr.new_vm(src, base.hardware, forwards=bases.forwards_for(src, forwards), name=name)
    fetch = Fetch(source)
    early = EarlyLaunch(mgr, vm.id)
    try:
        stats = await asyncio.to_thread(
            apply_overlay,
            fetch.chunks(),
            base.ref(),
            vm.dir,
            backing=str(base.path("disk.raw")),
            expected_base_id=base.base_id,
            progress=progress,
            on_outputs=early.files_ready,
        )
        t_applied = time.monotonic()
        vm = await early.resume()
        t_resumed = time.monotonic()
    except BaseException:
        await early.settle()
        await mgr.discard(vm)
        raise
    t_first = await first_response(vm, first_response_timeout)
    st = stats.to_dict() if hasattr(stats, "to_dict") else dict(vars(stats))
    timings = {
        "fetch_s": (fetch.finished or t_applied) - t0,
        "decode_s": float(st.get("decode_s", 0.0)),
        "apply_s": float(st.get("apply_s", 0.0)),
        "stream_s": t_applied - t0,  # fetch, decode and apply, overlapped
        "launch_s": early.launch_s,  # QEMU's start, overlapped with the stream
        "resume_s": t_resumed - t_applied,  # waiting for that start if not done, load, run
        "first_response_s": (t_first - t_resumed) if t_first else -1.0,
        "total_s": (t_first or t_resumed) - t0,
    }
    return SynthesisResult(vm, timings, fetch.bytes, st)


class EarlyLaunch:
    """Start a ``creating`` VM's QEMU as soon as its files exist, then resume it.

    ``files_ready`` is ``apply_overlay``'s ``on_outputs`` (called from the applying thread);
    the QEMU then starts in the background, waiting for the device state, while the rest is
    applied. :meth:`resume` records the snapshot, loads it into that QEMU and runs the VM.
    After a failure, :meth:`settle` before discarding the VM: a QEMU start cut off midway could
    leave a daemonized QEMU that no record names yet, so a start under way is let finish (the
    discard then kills it), and one still waiting for the files is cancelled.
    """

    def __init__(self, mgr: VMManager, vm_id: str) -> None:
        self.mgr = mgr
        self.launch_s = 0.0
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._task = asyncio.ensure_future(self._launch(vm_id))

    def files_ready(self) -> None:
        self._loop.call_soon_threadsafe(self._ready.set)

    async def _launch(self, vm_id: str) -> VM:
        await self._ready.wait()
        t = time.monotonic()
        vm = await self.mgr.launch_incoming(vm_id)
        self.launch_s = time.monotonic() - t
        return vm

    async def resume(self) -> VM:
        vm = await self._task  # its record names the QEMU now
        self.mgr.mark_suspended(vm)
        vm, mon = await self.mgr.resume_paused(vm.id, launched=True)
        return await self.mgr.cont(vm.id, mon)

    async def settle(self) -> None:
        if not self._ready.is_set():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


async def first_response(vm: VM, timeout: float) -> float | None:
    """Time of the first application-level answer on the VM's first forwarded port."""
    if not vm.forwards:
        return None
    f = vm.forwards[0]
    return await first_answer(f.host_addr, f.host, f.guest, timeout)
