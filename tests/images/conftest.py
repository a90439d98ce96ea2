"""Fixtures for image tests: one shared .deb cache and one freshly built tiny image.

The image is built here (not taken from the session home, which may hold an image built by an
older version of the guest scripts), into a private home that shares only the .deb cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudlet.config import Paths, paths
from cloudlet.images.model import Image
from cloudlet.images.tiny import build_tiny


@pytest.fixture(scope="session")
def deb_cache(session_home: Paths) -> Path:
    d = session_home.cache / "debs"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def fresh_home(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return paths(tmp_path_factory.mktemp("images-home"))


@pytest.fixture(scope="session")
def fresh_tiny(fresh_home: Paths, deb_cache: Path) -> Image:
    """The tiny image built by the code under test, once per session."""
    return build_tiny(fresh_home, "tiny", deb_cache=deb_cache)


@pytest.fixture
def empty_home(tmp_path: Path) -> Paths:
    return paths(tmp_path / "home")
