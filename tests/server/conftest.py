"""Fixtures for the server tests: an in-process API, a real server process, a sample overlay.

- ``srv_home``: a data dir like ``home`` but with its own ``cache/`` (the snapshot cache lives
  there and must not leak between tests) and base VM ``tiny`` linked from the session home.
- ``api``: the FastAPI app in this process through ``httpx.ASGITransport`` (its lifespan run),
  with an admin token; for API shape, validation and auth.
- ``server``: ``cloudlet serve`` in a subprocess on a free port, which a test may kill -9 and
  start again.
- ``sample_overlay``: an overlay of the tiny base with a page written into it (built once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudlet.config import Paths
from cloudlet.services.core import Settings

MARKER = "served-by-the-server-test-overlay"


@pytest.fixture
def srv_home(home: Paths, session_home: Paths, tiny_base: Any) -> Paths:
    cache = home.home / "cache"
    cache.unlink()
    cache.mkdir()
    for entry in session_home.cache.iterdir():
        if entry.name != "services":
            (cache / entry.name).symlink_to(entry)
    (home.bases / "tiny").symlink_to(tiny_base.dir)
    return home


@pytest.fixture
def bare_home(home: Paths, session_home: Paths) -> Paths:
    """A data dir without the session's base VM (API tests that need no VM)."""
    cache = home.home / "cache"
    cache.unlink()
    cache.mkdir()
    return home


@pytest.fixture(scope="session")
def sample_overlay(session_home: Paths, tiny_base: Any, tmp_path_factory: Any) -> Path:
    from cloudlet.hypervisor.vm import VMManager
    from cloudlet.synthesis.base import BaseStore
    from cloudlet.synthesis.capture import capture_overlay

    out = tmp_path_factory.mktemp("server-overlay") / "sample.overlay"

    async def build() -> None:
        mgr = VMManager(session_home)
        vm = await BaseStore(session_home).start_vm("tiny")
        try:
            res = await mgr.exec(vm.id, f"echo {MARKER} > /www/marker.html && sync")
            assert res.exit_code == 0, res.stderr
            await capture_overlay(session_home, vm.id, out)
        finally:
            await mgr.delete(vm.id, force=True)

    asyncio.run(build())
    return out


class Api:
    """The app in-process; sync calls driven on one private event loop."""

    def __init__(self, p: Paths, settings: Settings) -> None:
        from cloudlet.server.app import create_app

        self.paths = p
        self.loop = asyncio.new_event_loop()
        self.tokens: dict[str, str] = {}
        self.app = create_app(
            p, settings, on_admin_token=lambda m: self.tokens.__setitem__("admin", m["token"])
        )
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.run(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://cloudlet"
        )

    @property
    def core(self) -> Any:
        return self.app.state.core

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def request(
        self, method: str, path: str, *, token: str | None = "admin", **kw: Any
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {self.tokens.get(token, token)}"
        return self.run(self.client.request(method, path, headers=headers, **kw))

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def wait(self, op_id: str, timeout: float = 120) -> dict[str, Any]:
        d: dict[str, Any] = self.run(self.core.runner.wait(op_id, timeout))
        return d

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self._lifespan.__aexit__(None, None, None))
        self.loop.close()


@pytest.fixture
def make_api() -> Iterator[Any]:
    made: list[Api] = []

    def make(p: Paths, **settings: Any) -> Api:
        settings.setdefault("bootstrap", False)
        a = Api(p, Settings(**settings))
        made.append(a)
        return a

    yield make
    for a in made:
        with contextlib.suppress(Exception):
            a.close()


@pytest.fixture
def api(bare_home: Paths, make_api: Any) -> Api:
    a: Api = make_api(bare_home)
    return a


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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def server(srv_home: Paths, tmp_path: Path) -> Iterator[Server]:
    s = Server(srv_home, tmp_path / "server.log")
    yield s
    s.stop()
