"""Shared fixtures: data homes, the tiny image (built once per session), QEMU leak checks.

The tiny image and the .deb cache live in one session home (``CLOUDLET_TEST_CACHE``, default
``.cache/test-home`` in the repo, so local re-runs do not rebuild); each test gets its own
``CLOUDLET_HOME`` whose ``images/`` and ``cache/`` point at the shared ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlet.config import Paths, paths
from helpers import qemu_pids_mentioning

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def session_home() -> Paths:
    root = Path(os.environ.get("CLOUDLET_TEST_CACHE", REPO / ".cache" / "test-home"))
    return paths(root)


@pytest.fixture(scope="session")
def tiny_image(session_home: Paths):  # type: ignore[no-untyped-def]
    from cloudlet.errors import NotFoundError
    from cloudlet.images.store import ImageStore
    from cloudlet.images.tiny import build_tiny, recipe_id

    store = ImageStore(session_home)
    try:
        img = store.get("tiny")
        store.verify("tiny")
        if img.extra.get("recipe") == recipe_id():
            return img
    except NotFoundError:
        pass
    return build_tiny(session_home, "tiny", force=True)  # missing, or made by older scripts


@pytest.fixture(scope="session")
def tiny_base(session_home: Paths, tiny_image):  # type: ignore[no-untyped-def]
    """Base VM ``tiny`` (256 MiB) in the session home, created once."""
    from cloudlet.cli.common import run_async
    from cloudlet.errors import NotFoundError
    from cloudlet.synthesis.base import BaseStore

    store = BaseStore(session_home)
    try:
        base = store.get("tiny")
        if base.image_id == tiny_image.content_id:
            return base
        store.delete("tiny")  # made from an older build of the image
    except NotFoundError:
        pass
    return run_async(store.create(tiny_image, "tiny", memory_mib=256))


@pytest.fixture
def home(tmp_path: Path, session_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """A fresh CLOUDLET_HOME sharing the session's images and caches; checks for QEMU leaks."""
    h = tmp_path / "home"
    h.mkdir()
    (h / "images").symlink_to(session_home.images)
    (h / "cache").symlink_to(session_home.cache)
    monkeypatch.setenv("CLOUDLET_HOME", str(h))
    p = paths(h)
    yield p
    # VMs the test left in its records are the test's business: remove them quietly.
    from cloudlet.cli.common import run_async
    from cloudlet.hypervisor.vm import VMManager

    mgr = VMManager(p)
    for vm in mgr.list():
        with contextlib.suppress(Exception):
            run_async(mgr.delete(vm.id, force=True))
    # Anything still running from this home is a QEMU nobody tracks: a leak.
    leaked = qemu_pids_mentioning(str(h))
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    if leaked:
        time.sleep(0.2)
        pytest.fail(f"QEMU processes outlived the test untracked: {leaked}")


@pytest.fixture
def base_home(home: Paths, tiny_base) -> Paths:  # type: ignore[no-untyped-def]
    """``home`` with the session's base VM ``tiny`` linked in."""
    (home.bases / "tiny").symlink_to(tiny_base.dir)
    return home


@pytest.fixture(scope="session")
def sample_overlay(session_home: Paths, tiny_base: Any, tmp_path_factory: Any) -> Path:
    from cloudlet.hypervisor.vm import VMManager
    from cloudlet.synthesis.base import BaseStore
    from cloudlet.synthesis.capture import capture_overlay
    from serverlib import MARKER

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
