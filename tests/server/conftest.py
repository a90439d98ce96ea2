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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudlet.config import Paths
from cloudlet.services.core import Settings
from serverlib import Server


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


@pytest.fixture
def server(srv_home: Paths, tmp_path: Path) -> Iterator[Server]:
    s = Server(srv_home, tmp_path / "server.log")
    yield s
    s.stop()
