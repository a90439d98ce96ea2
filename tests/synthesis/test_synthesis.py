"""Base VMs, overlay capture and synthesis, end to end with real QEMU VMs."""

from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlet.config import Paths, paths
from cloudlet.errors import CloudletError, ConflictError, IntegrityError
from cloudlet.hypervisor.vm import VMManager, VMState
from cloudlet.overlay.errors import (
    OverlayBaseMismatch,
    OverlayCorrupt,
    OverlayVersionError,
)
from cloudlet.synthesis.base import BaseStore
from cloudlet.synthesis.capture import capture_overlay
from cloudlet.synthesis.synthesize import synthesize
from helpers import CLOUDLET, cli, counter, qemu_pids_mentioning, wait_until

pytestmark = pytest.mark.vm

# The customization: an "application" of part random, part compressible bytes on disk, a file
# written then deleted, and the counter service's in-memory state.
CUSTOMIZE = (
    "mkdir -p /opt/app && head -c 2097152 /dev/urandom > /opt/app/blob && "
    'i=0; while [ $i -lt 2000 ]; do echo "line $i of a compressible config"; i=$((i+1)); done'
    " > /opt/app/config && head -c 1048576 /dev/urandom > /root/tmpfile && sync && rm /root/tmpfile"
    " && sync && md5sum /opt/app/blob /opt/app/config"
)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def customized(session_home: Paths, tiny_base, tmp_path_factory) -> dict:  # type: ignore[no-untyped-def]
    """An overlay of the customized tiny base (built once), with what to expect after synthesis."""
    out = tmp_path_factory.mktemp("overlay") / "app.overlay"
    store = BaseStore(session_home)
    vm = run(store.start_vm("tiny"))
    mgr = VMManager(session_home)
    try:
        res = run(mgr.exec(vm.id, CUSTOMIZE, timeout=300))
        assert res.exit_code == 0, res.stderr
        port = vm.host_port(80)
        for _ in range(3):
            state = counter(port)
        info = run(capture_overlay(session_home, vm.id, out))
        # Capturing is not destructive: the VM runs on.
        assert mgr.get(vm.id).state is VMState.RUNNING
        assert counter(port)["memory"] == state["memory"] + 1
    finally:
        run(mgr.delete(vm.id, force=True))
    export = tmp_path_factory.mktemp("export") / "tiny.base"
    store.export("tiny", export)
    return {
        "file": out,
        "md5": res.stdout.decode(),
        "counter": state,
        "info": info,
        "base_export": export,
    }


@pytest.fixture
def fresh_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session_home: Paths
) -> Iterator[Paths]:
    """A data dir that shares nothing with the session but the accelerator probe result."""
    h = paths(tmp_path / "fresh")
    shutil.copy(session_home.cache / "accel.json", h.cache / "accel.json")
    monkeypatch.setenv("CLOUDLET_HOME", str(h.home))
    yield h
    mgr = VMManager(h)
    for vm in mgr.list():
        run(mgr.delete(vm.id, force=True))
    assert qemu_pids_mentioning(str(h.home)) == []


def _no_vm_left(p: Paths) -> None:
    assert list(p.vms.iterdir()) == []
    assert qemu_pids_mentioning(str(p.home)) == []


def test_round_trip_on_a_fresh_data_dir(fresh_home: Paths, customized: dict) -> None:
    base = BaseStore(fresh_home).import_(customized["base_export"])
    assert base.name == "tiny"
    res = run(synthesize(fresh_home, "tiny", str(customized["file"])))
    vm = res.vm
    assert vm.state is VMState.RUNNING
    t = res.timings
    assert set(t) >= {"fetch_s", "decode_s", "apply_s", "resume_s", "first_response_s", "total_s"}
    assert res.overlay_bytes == customized["file"].stat().st_size
    # The application state is exactly as it was: files on disk, the counter in memory.
    before = customized["counter"]
    assert counter(vm.host_port(80)) == {"memory": before["memory"] + 1, "disk": before["disk"] + 1}
    md5 = run(VMManager(fresh_home).exec(vm.id, "md5sum /opt/app/blob /opt/app/config"))
    assert md5.stdout.decode() == customized["md5"]
    gone = run(VMManager(fresh_home).exec(vm.id, "test -e /root/tmpfile; echo $?"))
    assert gone.stdout == b"1\n"


def test_overlay_is_compact(customized: dict) -> None:
    info = customized["info"]
    size = customized["file"].stat().st_size
    # 2 MiB random + ~70 KB of text were written; the overlay must be close to that floor,
    # not the 256 MiB of RAM or the 1 GiB disk.
    assert 2 * 2**20 < size < 8 * 2**20, info


def test_synthesize_from_url_streams(base_home: Paths, customized: dict) -> None:
    with _serve(customized["file"].parent) as base_url:
        res = run(synthesize(base_home, "tiny", f"{base_url}/{customized['file'].name}"))
    assert counter(res.vm.host_port(80))["memory"] == customized["counter"]["memory"] + 1
    assert res.timings["fetch_s"] > 0


def test_overlay_for_another_base_is_refused_before_work(
    base_home: Paths, customized: dict, tiny_image
) -> None:  # type: ignore[no-untyped-def]
    store = BaseStore(base_home)
    other = run(store.create(tiny_image, "other", memory_mib=128))
    try:
        with pytest.raises(OverlayBaseMismatch) as ei:
            run(synthesize(base_home, "other", str(customized["file"])))
        assert other.base_id[:12] in str(ei.value) and store.get("tiny").base_id[:12] in str(
            ei.value
        )
        _no_vm_left(base_home)
    finally:
        store.delete("other")


def test_truncated_overlay(base_home: Paths, customized: dict, tmp_path: Path) -> None:
    data = customized["file"].read_bytes()
    bad = tmp_path / "truncated.overlay"
    bad.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(OverlayCorrupt):
        run(synthesize(base_home, "tiny", str(bad)))
    _no_vm_left(base_home)


def test_bit_flipped_overlay_names_the_segment(
    base_home: Paths, customized: dict, tmp_path: Path
) -> None:
    data = bytearray(customized["file"].read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "flipped.overlay"
    bad.write_bytes(bytes(data))
    with pytest.raises(OverlayCorrupt, match="segment"):
        run(synthesize(base_home, "tiny", str(bad)))
    _no_vm_left(base_home)


def test_unknown_format_version(base_home: Paths, customized: dict, tmp_path: Path) -> None:
    data = bytearray(customized["file"].read_bytes())
    data[8:10] = (9).to_bytes(2, "little")  # major version 9
    bad = tmp_path / "v9.overlay"
    bad.write_bytes(bytes(data))
    with pytest.raises(OverlayVersionError, match="9"):
        run(synthesize(base_home, "tiny", str(bad)))
    _no_vm_left(base_home)


def test_unreachable_url(base_home: Paths) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(CloudletError, match="cannot fetch"):
        run(synthesize(base_home, "tiny", f"http://127.0.0.1:{port}/app.overlay"))
    _no_vm_left(base_home)


def test_server_stopping_mid_stream(base_home: Paths, customized: dict) -> None:
    data = customized["file"].read_bytes()

    class Half(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.close()

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Half)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with pytest.raises(CloudletError):
            run(synthesize(base_home, "tiny", f"http://127.0.0.1:{srv.server_port}/x"))
    finally:
        srv.shutdown()
    _no_vm_left(base_home)


class _Stalled:
    """Serve ``data`` at any path: the first ``cut`` bytes at once, then hold the rest until
    :meth:`release` (``finish=False`` cuts the connection there instead)."""

    def __init__(self, data: bytes, cut: int) -> None:
        self.go = threading.Event()
        self.finish = True
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                outer.go.wait(120)
                if outer.finish:
                    self.wfile.write(data[cut:])
                self.wfile.flush()
                self.connection.close()

            def log_message(self, *a: object) -> None:
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> _Stalled:
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_port}/app.overlay"
        return self

    def release(self, *, finish: bool = True) -> None:
        self.finish = finish
        self.go.set()

    def __exit__(self, *exc: object) -> None:
        self.release(finish=False)
        self.srv.shutdown()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _waiting_qemu(p: Paths) -> list[int]:
    """QEMUs of VMs in ``p`` that wait for an incoming device state."""
    return [
        pid
        for pid in qemu_pids_mentioning(str(p.home))
        if b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _synthesize_in_thread(p: Paths, url: str) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go() -> None:
        try:
            out["result"] = run(synthesize(p, "tiny", url))
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_qemu_starts_while_the_overlay_still_streams(base_home: Paths, customized: dict) -> None:
    """QEMU's start overlaps the download: it waits for the device state with the half of the
    overlay not yet sent, and the VM comes up as it was once the rest arrives."""
    data = customized["file"].read_bytes()
    with _Stalled(data, len(data) // 2) as srv:
        t, out = _synthesize_in_thread(base_home, srv.url)
        assert wait_until(lambda: _waiting_qemu(base_home), 60), out.get("error")
        (vm,) = VMManager(base_home).list()
        assert vm.state is VMState.CREATING  # no snapshot recorded: nothing to resume by mistake
        assert vm.forwards and not any(_accepts(f.host) for f in vm.forwards)  # not before the load
        srv.release()
        t.join(120)
    res = out["result"]
    assert res.vm.state is VMState.RUNNING
    assert res.timings["launch_s"] > 0
    assert counter(res.vm.host_port(80))["memory"] == customized["counter"]["memory"] + 1


def test_stream_cut_after_qemu_started_leaves_nothing(base_home: Paths, customized: dict) -> None:
    data = customized["file"].read_bytes()
    with _Stalled(data, len(data) // 2) as srv:
        t, out = _synthesize_in_thread(base_home, srv.url)
        assert wait_until(lambda: _waiting_qemu(base_home), 60), out.get("error")
        srv.release(finish=False)
        t.join(120)
    assert isinstance(out.get("error"), CloudletError), out
    _no_vm_left(base_home)


def test_synthesis_killed_midway_ends_its_waiting_qemu(base_home: Paths, customized: dict) -> None:
    """The synthesizing process is SIGKILLed while its VM's QEMU waits: the next look at the
    VMs ends that QEMU and marks the VM crashed (it holds no valid snapshot)."""
    data = customized["file"].read_bytes()
    with _Stalled(data, len(data) // 2) as srv:
        proc = subprocess.Popen(
            [*CLOUDLET, "synthesize", "tiny", srv.url, "--json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert wait_until(lambda: _waiting_qemu(base_home), 60)
        finally:
            proc.kill()
            proc.wait()
    (vm,) = VMManager(base_home).list()
    assert vm.state is VMState.CRASHED
    assert wait_until(lambda: not qemu_pids_mentioning(str(base_home.home)), 10)


def test_full_disk_during_synthesis(base_home: Paths, customized: dict, tmp_path: Path) -> None:
    """The VM directory lives on a 40 MiB file system: the RAM file cannot fit."""
    img, mnt = tmp_path / "small.ext4", tmp_path / "small"
    subprocess.run(["truncate", "-s", "40M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        base_home.vms.rmdir()
        base_home.vms.symlink_to(mnt)
        with pytest.raises(CloudletError, match=r"(?i)space"):
            run(synthesize(base_home, "tiny", str(customized["file"])))
        assert [p for p in mnt.iterdir() if p.name != "lost+found"] == []
        assert qemu_pids_mentioning(str(base_home.home)) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        base_home.vms.unlink()
        base_home.vms.mkdir()


def test_overlay_info_cli(customized: dict) -> None:
    r = cli("overlay", "info", str(customized["file"]), "--verify", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    text = json.dumps(d)
    assert customized["info"]["base_id"] in text


def test_vm_start_from_base_and_overlay_create_cli(base_home: Paths, tmp_path: Path) -> None:
    r = cli("vm", "start", "--base", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["state"] == "running" and d["source"] == "base:tiny"
    # Resumed from the base's snapshot, not booted: the guest never printed its boot marker.
    logs = json.loads(cli("vm", "logs", d["id"], "--json", "-n", "500").stdout)["lines"]
    assert not any("CLOUDLET-READY" in ln for ln in logs)
    port = int(d["endpoints"]["80"].rsplit(":", 1)[1])
    assert counter(port)["memory"] == 1  # the base was snapshotted before any request
    out = tmp_path / "c.overlay"
    r = cli("overlay", "create", d["id"], "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert out.exists() and json.loads(r.stdout)["base"] == "tiny"
    # An image-booted VM has no base to diff against: a clear refusal.
    r2 = cli("vm", "start", "tiny", "--json")
    img_vm = json.loads(r2.stdout)["id"]
    r = cli("overlay", "create", img_vm, "-o", str(tmp_path / "x.overlay"))
    assert r.returncode == 4 and "vm start --base" in r.stderr
    assert not (tmp_path / "x.overlay").exists()


def test_overlay_leaves_out_what_the_guest_freed(base_home: Paths, tmp_path: Path) -> None:
    """The guest trims its free blocks and zeroes its free pages first; --keep-garbage does not."""
    d = json.loads(cli("vm", "start", "--base", "tiny", "--json").stdout)
    mgr = VMManager(base_home)
    # 24 MiB of random bytes written, read back (page cache) and deleted: garbage on disk and
    # in RAM. 512 KiB kept, to be found again.
    junk = (
        "head -c 25165824 /dev/urandom > /root/junk && sync && cat /root/junk > /dev/null"
        " && rm /root/junk && head -c 524288 /dev/urandom > /root/keep && sync"
    )
    assert run(mgr.exec(d["id"], junk, timeout=120)).exit_code == 0
    min_free = run(mgr.exec(d["id"], "cat /proc/sys/vm/min_free_kbytes")).stdout
    kept, cleared = tmp_path / "kept.overlay", tmp_path / "cleared.overlay"
    r = cli("overlay", "create", d["id"], "-o", str(kept), "--keep-garbage", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["garbage"] is None
    assert kept.stat().st_size > 24 * 2**20  # the deleted file's random bytes travel
    r = cli("overlay", "create", d["id"], "-o", str(cleared), "--json")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)["garbage"]
    assert g["trimmed"] == ["/"] and g["untrimmed"] == []
    assert g["zeroed_bytes"] > 100 * 2**20  # most of the 256 MiB guest's free memory
    assert 512 * 1024 < cleared.stat().st_size < 4 * 2**20
    # The VM runs on, its live file intact, and answers.
    assert mgr.get(d["id"]).state is VMState.RUNNING
    assert run(mgr.exec(d["id"], "wc -c < /root/keep")).stdout == b"524288\n"
    # The reserve the zeroing lowered for a moment is back.
    assert run(mgr.exec(d["id"], "cat /proc/sys/vm/min_free_kbytes")).stdout == min_free
    port = int(d["endpoints"]["80"].rsplit(":", 1)[1])
    assert counter(port)["memory"] == 1
    # Left paused by a capture, the VM is recorded so; QEMU cannot save its state again until
    # it runs: a clear refusal that writes nothing, then `vm resume` runs it on.
    r = cli("overlay", "create", d["id"], "-o", str(tmp_path / "p1.overlay"), "--keep-paused")
    assert r.returncode == 0, r.stderr
    assert mgr.get(d["id"]).state is VMState.PAUSED
    r = cli("overlay", "create", d["id"], "-o", str(tmp_path / "p2.overlay"))
    assert r.returncode == 4 and f"cloudlet vm resume {d['id']}" in r.stderr
    assert not (tmp_path / "p2.overlay").exists()
    r = cli("vm", "resume", d["id"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "running"
    assert counter(port)["memory"] == 2


def test_base_cli_and_delete_refused_while_in_use(home: Paths, tiny_image) -> None:  # type: ignore[no-untyped-def]
    r = cli("base", "create", "tiny", "--name", "b128", "--memory", "128M", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert len(b["base_id"]) == 64 and b["memory_mib"] == 128
    assert [x["name"] for x in json.loads(cli("base", "list", "--json").stdout)] == ["b128"]
    vm = run(BaseStore(home).start_vm("b128"))
    r = cli("base", "delete", "b128")
    assert r.returncode == 4 and vm.id in r.stderr
    run(VMManager(home).delete(vm.id, force=True))
    assert cli("base", "delete", "b128", "--json").returncode == 0
    assert json.loads(cli("base", "list", "--json").stdout) == []


def test_base_import_verifies(home: Paths, customized: dict, tmp_path: Path) -> None:
    data = bytearray(customized["base_export"].read_bytes())
    data[len(data) // 3] ^= 0xFF
    bad = tmp_path / "bad.base"
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        BaseStore(home).import_(bad)
    assert list(home.bases.iterdir()) == []
    assert [p for p in home.tmp.iterdir()] == []
    r = cli("base", "import", str(customized["base_export"]), "--name", "copy", "--json")
    assert r.returncode == 0, r.stderr
    with pytest.raises(ConflictError):
        BaseStore(home).import_(customized["base_export"], "copy")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a: object) -> None:
        pass


class _serve:
    """Serve a directory over HTTP on loopback for the duration of a ``with`` block."""

    def __init__(self, directory: Path) -> None:
        handler = lambda *a, **k: _Quiet(*a, directory=str(directory), **k)  # noqa: E731
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.srv.server_port}"

    def __exit__(self, *exc: object) -> None:
        self.srv.shutdown()
