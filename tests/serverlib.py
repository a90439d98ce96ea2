"""Helpers for tests that run real cloudlet servers: the process, uploads, operations."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from cloudlet.config import Paths
from cloudlet.util.procs import terminate

MARKER = "served-by-the-server-test-overlay"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``cloudlet serve`` as a subprocess with its own data dir."""

    def __init__(self, p: Paths, log: Path) -> None:
        self.paths = p
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> Server:
        env = dict(os.environ, CLOUDLET_HOME=str(self.paths.home))
        cmd = [sys.executable, "-m", "cloudlet", "serve", "--port", str(self.port), *args]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise AssertionError(f"server did not come up: {self.log.read_text()[-3000:]}")

    @property
    def token(self) -> str:
        return (self.paths.home / "admin-token").read_text().strip()

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=60,
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


def upload(c: httpx.Client, file: Path, name: str = "app") -> dict[str, Any]:
    with open(file, "rb") as f:
        r = c.post(f"/v1/overlays/upload?name={name}", content=f.read())
    assert r.status_code == 201, r.text
    d: dict[str, Any] = r.json()
    assert d["state"] == "active" and d["base_id"]
    return d


def register(c: httpx.Client, overlay: str, sid: str = "org.example.web", **kw: Any) -> None:
    body = {"service_id": sid, "base": "tiny", "overlay": overlay, "guest_ports": [80]} | kw
    r = c.post("/v1/services", json=body)
    assert r.status_code == 201, r.text


def start(c: httpx.Client, sid: str, **kw: Any) -> dict[str, Any]:
    r = c.post("/v1/instances", json={"service_id": sid} | kw)
    assert r.status_code in (200, 202), r.text
    d: dict[str, Any] = r.json()
    if r.status_code == 202:
        op = wait_op(c, d["operation"])
        assert op["state"] == "succeeded", op
    d["instance"] = c.get(f"/v1/instances/{d['instance']['id']}").json()
    return d


def wait_op(c: httpx.Client, op_id: str, timeout: float = 120) -> dict[str, Any]:
    """Follow the operation's Server-Sent Events to its end."""
    with c.stream("GET", f"/v1/operations/{op_id}/events", timeout=timeout) as r:
        assert r.status_code == 200
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "end":
                d: dict[str, Any] = json.loads(line[5:])
                return d
    raise AssertionError("the event stream ended without an end event")


def page(inst: dict[str, Any], path: str = "/marker.html") -> str:
    url = inst["endpoints"]["80"]["url"]
    return httpx.get(url + path, timeout=10).text
