"""Handoff end to end between two data dirs with real QEMU VMs (destination in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlet.config import Paths, paths
from cloudlet.errors import ConflictError
from cloudlet.handoff.destination import HandoffDestination
from cloudlet.handoff.errors import HandoffError, HandoffPrepareError
from cloudlet.handoff.link import LocalLink
from cloudlet.handoff.source import HandoffOptions, HandoffSource
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.usernet import AnswerWatch, unanswered
from cloudlet.hypervisor.vm import VMManager, VMState
from cloudlet.synthesis.base import BaseStore
from helpers import counter, qemu_pids_mentioning

pytestmark = pytest.mark.vm


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture
def dest_home(tmp_path: Path, session_home: Paths, tiny_base) -> Iterator[Paths]:  # type: ignore[no-untyped-def]
    """A second cloudlet's data dir holding the same base VM."""
    h = tmp_path / "dest"
    h.mkdir()
    (h / "cache").symlink_to(session_home.cache)
    p = paths(h)
    (p.bases / "tiny").symlink_to(tiny_base.dir)
    yield p
    mgr = VMManager(p)
    for vm in mgr.list():
        run(mgr.delete(vm.id, force=True))
    assert qemu_pids_mentioning(str(h)) == []


def _start(base_home: Paths) -> tuple[Any, int]:
    vm = run(BaseStore(base_home).start_vm("tiny"))
    port = vm.host_port(80)
    for _ in range(3):
        counter(port)
    r = run(
        VMManager(base_home).exec(
            vm.id, "head -c 2000000 /dev/urandom > /root/blob && sync && md5sum /root/blob"
        )
    )
    assert r.exit_code == 0
    vm.meta["md5"] = r.stdout
    return vm, port


def test_handoff_moves_state_and_frees_the_source(base_home: Paths, dest_home: Paths) -> None:
    vm, _port = _start(base_home)
    # A process that keeps dirtying guest memory while the handoff runs.
    run(
        VMManager(base_home).exec(
            vm.id, "(i=0; while :; do i=$((i+1)); echo $i > /run/busy; done) >/dev/null 2>&1 &"
        )
    )
    dest = HandoffDestination(dest_home)
    # The destination's host ports listen only once the vCPUs run (see VMManager.cont).
    listening: dict[str, list[bool]] = {"at the load": [], "at cont": []}
    load, cont = dest.vms.load_devstate, dest.vms.cont

    def probe(when: str, vm: Any) -> None:
        for f in vm.forwards:
            with socket.socket() as s:
                listening[when].append(s.connect_ex((f.host_addr, f.host)) == 0)

    async def checked_load(vm: Any, *args: Any) -> Any:
        probe("at the load", vm)
        return await load(vm, *args)

    async def checked_cont(vm_id: str, *args: Any, **kw: Any) -> Any:
        probe("at cont", dest.vms.get(vm_id))
        return await cont(vm_id, *args, **kw)

    dest.vms.load_devstate = checked_load  # type: ignore[method-assign]
    dest.vms.cont = checked_cont  # type: ignore[method-assign]
    rep = run(HandoffSource(base_home, vm.id, LocalLink(dest)).run())
    assert listening == {"at the load": [False], "at cont": [False]}
    new_id = rep["destination"]["vm"]
    moved = VMManager(dest_home).get(new_id)
    assert moved.state is VMState.RUNNING
    assert counter(moved.host_port(80)) == {"memory": 4, "disk": 4}
    # Read from the disk, not the guest's page cache: the destination's QEMU opened the disk
    # layer before any of it arrived (it re-reads it when the state is loaded).
    cmd = "echo 3 > /proc/sys/vm/drop_caches && md5sum /root/blob"
    md5 = run(VMManager(dest_home).exec(new_id, cmd)).stdout
    assert md5 == vm.meta["md5"]
    # Only what the base lacked travelled: far less than the 256 MiB of RAM.
    assert rep["bytes_on_wire"] < 16 * 2**20
    assert rep["rounds"][-1]["final"] and rep["rounds"][-1]["devstate_bytes"] > 0
    assert 0 < rep["downtime_s"] < rep["total_s"]
    # Pages the busy loop and the kernel changed a little went as XOR against what the
    # destination held (and the guest above runs on them, with its counter intact).
    assert sum(r["records"].get("xor_current", 0) for r in rep["rounds"]) > 0, rep["rounds"]
    # The downtime, piece by piece.
    assert set(rep["rounds"][-1]["phases"]) == {"pause_s", "devstate_s"}
    restore = rep["destination"]["restore"]
    assert set(restore) == {"apply_s", "load_s", "load_steps", "cont_s", "listen_s"}
    assert set(restore["load_steps"]) == {"check", "connect", "state"}  # no launch
    # The source holds nothing of the VM any more.
    assert VMManager(base_home).list() == []
    assert qemu_pids_mentioning(str(base_home.home)) == []
    assert dest.sessions == {}


def test_destination_without_the_base_is_refused_before_pausing(
    base_home: Paths, tmp_path: Path
) -> None:
    vm, port = _start(base_home)
    empty = paths(tmp_path / "empty")
    with pytest.raises(HandoffPrepareError, match="does not hold base VM"):
        run(HandoffSource(base_home, vm.id, LocalLink(HandoffDestination(empty))).run())
    assert VMManager(base_home).get(vm.id).state is VMState.RUNNING
    assert counter(port)["memory"] == 4
    assert list(empty.vms.iterdir()) == []


class FailingLink(LocalLink):
    """Cuts the link after ``after`` bytes of the round whose number is ``in_round``."""

    def __init__(self, dest: HandoffDestination, *, final: bool, after: int = 100_000) -> None:
        super().__init__(dest)
        self.fail_final, self.after = final, after

    async def send(
        self, session: str, frames: AsyncIterator[bytes], *, final: bool
    ) -> dict[str, Any]:
        if final != self.fail_final:
            return await super().send(session, frames, final=final)

        async def cut() -> AsyncIterator[bytes]:
            n = 0
            async for f in frames:
                n += len(f)
                if n > self.after:
                    raise ConnectionResetError("link cut by the test")
                yield f

        return await super().send(session, cut(), final=final)


@pytest.mark.parametrize("phase", ["pre-copy", "stop-and-copy"])
def test_link_cut_leaves_the_source_running(base_home: Paths, dest_home: Paths, phase: str) -> None:
    vm, port = _start(base_home)
    dest = HandoffDestination(dest_home)
    # In the final round, cut at its first frame: an idle guest's final round can be under
    # 1 KB in all (XOR records, the device state as a delta), and a later cut never came.
    link = FailingLink(
        dest, final=phase == "stop-and-copy", after=0 if phase == "stop-and-copy" else 100_000
    )
    with pytest.raises((HandoffError, ConnectionResetError)):
        run(HandoffSource(base_home, vm.id, link).run())
    src = VMManager(base_home).get(vm.id)
    assert src.state is VMState.RUNNING and src.process_alive()
    assert counter(port) == {"memory": 4, "disk": 4}  # untouched and serving
    assert run(VMManager(base_home).exec(vm.id, "md5sum /root/blob")).stdout == vm.meta["md5"]
    # The destination cleaned up after itself.
    assert dest.sessions == {}
    assert list(dest_home.vms.iterdir()) == []
    assert qemu_pids_mentioning(str(dest_home.home)) == []


def test_corrupt_frame_is_refused_and_source_keeps_running(
    base_home: Paths, dest_home: Paths
) -> None:
    vm, port = _start(base_home)
    dest = HandoffDestination(dest_home)

    class Flip(LocalLink):
        async def send(
            self, session: str, frames: AsyncIterator[bytes], *, final: bool
        ) -> dict[str, Any]:
            async def flip() -> AsyncIterator[bytes]:
                first = True
                async for f in frames:
                    if first:
                        f = f[:40] + bytes([f[40] ^ 1]) + f[41:]
                        first = False
                    yield f

            return await super().send(session, flip(), final=final)

    with pytest.raises(Exception, match="corrupt"):
        run(HandoffSource(base_home, vm.id, Flip(dest)).run())
    assert VMManager(base_home).get(vm.id).state is VMState.RUNNING
    assert counter(port)["memory"] == 4
    assert list(dest_home.vms.iterdir()) == []


def test_second_handoff_of_the_same_vm_conflicts(base_home: Paths, dest_home: Paths) -> None:
    vm, _ = _start(base_home)
    mgr = VMManager(base_home)
    with mgr.locked(mgr.get(vm.id)), pytest.raises(ConflictError):  # as a running handoff holds it
        run(HandoffSource(base_home, vm.id, LocalLink(HandoffDestination(dest_home))).run())
    assert mgr.get(vm.id).state is VMState.RUNNING


def test_idle_destination_session_is_discarded(
    base_home: Paths, dest_home: Paths, tiny_base
) -> None:  # type: ignore[no-untyped-def]
    from cloudlet.hypervisor.vm import VMManager as M

    async def go() -> None:
        dest = HandoffDestination(dest_home, idle_timeout=0.5)
        hw = tiny_base.hardware.to_dict()
        s = await dest.prepare({"base_id": tiny_base.base_id, "hardware": hw, "guest_ports": [80]})
        assert s["session"] in dest.sessions
        # Its QEMU already runs, waiting for the state, but listens on no host port yet.
        vm = M(dest_home).get(s["vm"])
        assert vm.pid and vm.process_alive(vm.pid)
        assert qemu_pids_mentioning(str(dest_home.home)) == [vm.pid]
        port = vm.forwards[0].host
        assert port > 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for _ in range(40):
            if not dest.sessions:
                break
            await asyncio.sleep(0.1)
        assert dest.sessions == {}

    run(go())
    assert M(dest_home).list() == []
    assert qemu_pids_mentioning(str(dest_home.home)) == []  # the reaper ended its QEMU


def test_options_bound_the_rounds(base_home: Paths, dest_home: Paths) -> None:
    vm, _port = _start(base_home)
    run(
        VMManager(base_home).exec(
            vm.id, "(while :; do head -c 4000000 /dev/urandom > /run/churn; done) >/dev/null 2>&1 &"
        )
    )
    opts = HandoffOptions(max_rounds=2, downtime_target_s=0.001)
    rep = run(
        HandoffSource(
            base_home, vm.id, LocalLink(HandoffDestination(dest_home)), options=opts
        ).run()
    )
    assert len(rep["rounds"]) <= 3  # at most two pre-copy rounds plus the final one
    assert counter(VMManager(dest_home).get(rep["destination"]["vm"]).host_port(80))["memory"] == 4


class SlowLink(LocalLink):
    """A link of ``rate`` bytes/s. With ``cut_when_throttled``, it is cut in the first pre-copy
    round that runs while the source holds the VM back (auto-converge)."""

    def __init__(self, dest: HandoffDestination, rate: float, *, cut_when_throttled: bool = False):
        super().__init__(dest)
        self.rate, self.cut = rate, cut_when_throttled
        self.source: HandoffSource | None = None

    async def send(
        self, session: str, frames: AsyncIterator[bytes], *, final: bool
    ) -> dict[str, Any]:
        throttled = bool(self.source and self.source.throttle_steps)

        async def slow() -> AsyncIterator[bytes]:
            n = 0
            async for f in frames:
                await asyncio.sleep(len(f) / self.rate)
                n += len(f)
                if self.cut and throttled and not final and n > 200_000:
                    raise ConnectionResetError("link cut by the test")
                yield f

        return await super().send(session, slow(), final=final)


CHURN = "(while :; do head -c 3000000 /dev/urandom > /run/churn; done) >/dev/null 2>&1 &"


def test_a_vm_dirtying_faster_than_the_link_is_throttled_and_arrives_intact(
    base_home: Paths, dest_home: Paths
) -> None:
    """Random data rewritten faster than 1 MB/s cannot converge on a 1 MB/s link: the rounds
    stop shrinking, and the source holds the VM back for part of each 0.1 s (auto-converge)."""
    vm, _port = _start(base_home)
    assert run(VMManager(base_home).exec(vm.id, CHURN)).exit_code == 0
    link = SlowLink(HandoffDestination(dest_home), 1e6)
    src = HandoffSource(base_home, vm.id, link, options=HandoffOptions(max_rounds=6))
    link.source = src
    rep = run(src.run())
    assert rep["throttle"], rep["rounds"]  # it did not shrink, so it was throttled
    first = rep["throttle"][0]
    assert 0.5 <= first["held"] < 1
    after = [r for r in rep["rounds"] if r["round"] > first["after_round"] and not r["final"]]
    assert after and max(r["throttle"] for r in after) > 0.3  # the VM really was held
    # Before the pause it was let run to answer the requests it held: there were none.
    assert rep["final_burst"] == {"held": 0, "ended": "none held", "since_answer_s": None}
    moved = rep["destination"]["vm"]
    assert counter(VMManager(dest_home).get(moved).host_port(80)) == {"memory": 4, "disk": 4}
    assert run(VMManager(dest_home).exec(moved, "md5sum /root/blob")).stdout == vm.meta["md5"]
    assert VMManager(base_home).list() == []


def test_a_link_cut_while_throttled_leaves_the_source_running_at_full_speed(
    base_home: Paths, dest_home: Paths
) -> None:
    from cloudlet.hypervisor.qmp import Monitor

    vm, port = _start(base_home)
    assert run(VMManager(base_home).exec(vm.id, CHURN)).exit_code == 0
    dest = HandoffDestination(dest_home)
    link = SlowLink(dest, 1e6, cut_when_throttled=True)
    src = HandoffSource(base_home, vm.id, link, options=HandoffOptions(max_rounds=8))
    link.source = src
    with pytest.raises((HandoffError, ConnectionResetError)):
        run(src.run())
    assert src.throttle_steps  # the cut came while the VM was being held back

    async def status() -> list[str]:
        seen = []
        async with await Monitor.connect(vm.qmp_path) as mon:
            for _ in range(5):  # no duty cycle left behind: running every time we look
                seen.append((await mon.execute("query-status"))["status"])
                await asyncio.sleep(0.05)
        return seen

    assert run(status()) == ["running"] * 5
    assert VMManager(base_home).get(vm.id).state is VMState.RUNNING
    assert counter(port) == {"memory": 4, "disk": 4}
    assert dest.sessions == {} and list(dest_home.vms.iterdir()) == []


def test_the_disk_layer_is_scanned_again_only_after_it_was_written(base_home: Paths) -> None:
    """Each round scans the VM's disk layer; a layer file untouched since the last scan began
    is skipped (that scan is downtime in the final round). A write must always be seen."""
    import threading
    import time

    from cloudlet.handoff.adaptive import CompressionController
    from cloudlet.handoff.source import _Encoder
    from cloudlet.hypervisor.qmp import Monitor

    vm, _ = _start(base_home)
    mgr = VMManager(base_home)

    async def qmp(cmd: str) -> None:
        async with await Monitor.connect(vm.qmp_path) as mon:
            await mon.execute(cmd)

    enc = _Encoder(mgr.get(vm.id), BaseStore(base_home).get("tiny"), CompressionController(),
                   HandoffOptions())  # fmt: skip
    scans = []
    scan = enc._scan_disk

    def counted(stop: threading.Event) -> Iterator[tuple[int, bytes]]:
        scans.append(1)
        yield from scan(stop)

    enc._scan_disk = counted  # type: ignore[method-assign]
    stop = threading.Event()
    try:
        run(qmp("stop"))  # nothing writes the layer from here until cont
        time.sleep(0.2)  # older than a kernel time stamp's tick
        first = [p for p, *_ in enc.changed_disk(stop)]
        again = [p for p, *_ in enc.changed_disk(stop)]
        assert len(first) >= 2_000_000 // 4096 and again == [] and len(scans) == 1
        run(qmp("cont"))
        r = run(mgr.exec(vm.id, "head -c 100000 /dev/urandom > /root/new && sync"))
        assert r.exit_code == 0
        after = [p for p, *_ in enc.changed_disk(stop)]
        assert len(scans) == 2 and len(after) >= 100_000 // 4096
    finally:
        enc.close()


def test_the_final_round_sends_the_hot_set_before_the_full_compare(base_home: Paths) -> None:
    """With the VM paused, the final round first sends the pages that changed in the rounds
    before and are changed again, on the link while the rest of memory is compared; together
    the two passes find exactly the pages one full compare finds, each once."""
    import threading

    import numpy as np

    from cloudlet.handoff.adaptive import CompressionController
    from cloudlet.handoff.source import _Encoder
    from cloudlet.handoff.wire import FRAME
    from cloudlet.hypervisor.qmp import Monitor
    from cloudlet.overlay.format import PAGE, Kind

    vm, port = _start(base_home)
    mgr = VMManager(base_home)
    enc = _Encoder(mgr.get(vm.id), BaseStore(base_home).get("tiny"), CompressionController(),
                   HandoffOptions())  # fmt: skip
    compares = []
    differing = enc._differing_pages

    def counted(w0: int, words: int) -> Any:
        compares.append(w0)
        return differing(w0, words)

    enc._differing_pages = counted  # type: ignore[method-assign]
    frames: list[tuple[Kind, int, int]] = []  # kind, records, full-compare chunks begun

    def emit(frame: bytes) -> None:
        header = FRAME.unpack(frame[: FRAME.size])  # magic, version, kind, codec, level, seq, n
        frames.append((Kind(header[2]), header[6], len(compares)))

    stop = threading.Event()
    devstate = mgr.get(vm.id).dir / "final.devstate"
    try:
        enc.round(1, lambda f: None, stop, None, None)  # running: a pre-copy round
        assert len(enc.recent) == 1 and len(enc.recent[0]) > 0
        counter(port)  # the guest works between the rounds
        compares.clear()

        async def pause() -> None:
            async with await Monitor.connect(vm.qmp_path) as mon:
                await mgr.pause(mgr.get(vm.id), mon)
                await mgr.save_devstate(mgr.get(vm.id), mon, devstate)

        run(pause())
        live = enc.ram.view(np.uint64).reshape(-1, PAGE // 8)
        shadow = enc.shadow.view(np.uint64).reshape(-1, PAGE // 8)
        expected = np.flatnonzero(np.any(live != shadow, axis=1)).tolist()
        hot = sorted(set(expected) & set(enc.recent[0].tolist()))
        assert hot and len(hot) < len(expected)

        st = enc.round(2, emit, stop, devstate, None)
        found = enc.recent[-1].tolist()
        assert sorted(found) == expected and len(found) == len(set(found))
        assert found[: len(hot)] == hot  # the hot set went first
        memory = [f for f in frames if f[0] is Kind.MEMORY]
        assert sum(f[1] for f in memory) == len(expected) == st.memory_pages
        # the hot set's frames were handed to the link before the full compare began
        before = [f for f in memory if f[2] == 0]
        assert sum(f[1] for f in before) == len(hot)
        assert not (enc.ram.view(np.uint64).reshape(-1, PAGE // 8) != shadow).any()
    finally:
        enc.close()


# A CGI the guest takes a second (of guest time) to answer.
SLOW_CGI = b'#!/bin/sh\nsleep 1\nprintf "Content-Type: text/plain\\r\\n\\r\\nslow done\\n"\n'


def test_the_final_burst_ends_once_the_held_requests_are_answered(base_home: Paths) -> None:
    """Before the final pause, a throttled VM runs until the user network shows every request
    it held answered (closed by the guest, the answer written to the client), and no longer;
    with none held, or one answered just before, the pause comes at once; a connection that
    stays open ends at the cap."""
    vm, port = _start(base_home)
    mgr = VMManager(base_home)
    cmd = "cat > /www/cgi-bin/slow && chmod 755 /www/cgi-bin/slow"
    r = run(mgr.exec(vm.id, cmd, stdin=SLOW_CGI))
    assert r.exit_code == 0, r.stderr
    src = HandoffSource(base_home, vm.id, LocalLink(HandoffDestination(base_home)))

    async def burst(
        cap: float, sock: socket.socket | None, answer_first: bool = False, then: float = 0.0
    ) -> tuple[dict[str, Any], bool]:
        src.opts.final_burst_s = cap
        src.opts.final_burst_max_s = 2 * cap
        async with await Monitor.connect(vm.qmp_path) as mon:
            src.watch = None
            if answer_first:  # the watch (as the throttle starts it) sees an answer go out
                src.watch = AnswerWatch(mon, vm.forwards)
                src.watch.start()
                await asyncio.to_thread(counter, port)
                for _ in range(500):
                    if src.watch.last_answer is not None:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(then)
            if sock is not None:  # the user network has accepted it before the burst starts
                for _ in range(500):
                    if await unanswered(mon, vm.forwards):
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the connection never showed in `info usernet`")
            await src._final_burst(vm, mon)
        ready = sock is not None and select.select([sock], [], [], 0)[0] != []
        return {k: v for k, v in src.burst.items() if k != "since_answer_s"}, ready

    # Nothing held: no burst.
    assert run(burst(30.0, None)) == ({"held": 0, "ended": "none held"}, False)
    # A request the guest takes a second to answer: the burst ends when it is answered, and by
    # then the whole answer waits on the client's socket (read without blocking).
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /cgi-bin/slow HTTP/1.0\r\nHost: t\r\n\r\n")
        report, ready = run(burst(30.0, s))
        assert report == {"held": 1, "ended": "answered"}
        assert ready
        s.setblocking(False)
        got = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := s.recv(65536):
                got += chunk
        assert got.startswith(b"HTTP/1.") and got.endswith(b"slow done\n"), got
    # A connection with no request stays open: the burst ends at its cap...
    with socket.create_connection(("127.0.0.1", port)) as s:
        report, _ = run(burst(0.3, s))
        assert report == {"held": 1, "ended": "cap"}
        assert 0.3 <= src.burst_s < 0.6  # no answer seen yet: the short cap
    # ...unless the guest answered another less than the cap ago: that held connection came
    # after the answer, and the client's last answer is recent. No wait then.
    with socket.create_connection(("127.0.0.1", port)) as s:
        report, _ = run(burst(60.0, s, answer_first=True))
        assert report == {"held": 1, "ended": "just answered"}
        assert 0 < src.burst["since_answer_s"] < 60
    # Once the guest was seen answering (closing) connections, a held one is waited for
    # longer: final_burst_max_s, here twice final_burst_s.
    with socket.create_connection(("127.0.0.1", port)) as s:
        report, _ = run(burst(0.3, s, answer_first=True, then=0.4))
        assert report == {"held": 1, "ended": "cap"}
        assert src.burst["since_answer_s"] >= 0.3
        assert src.burst_s >= 0.6
    assert counter(port)["memory"] == 6  # and the VM serves as before (two more answered)
