"""The data layout (``cloudlet.config``)."""

from __future__ import annotations

import stat
from pathlib import Path

from cloudlet.config import paths


def test_a_new_home_is_private_and_an_existing_one_kept(tmp_path: Path) -> None:
    p = paths(tmp_path / "new" / "home")
    assert stat.S_IMODE(p.home.stat().st_mode) == 0o700  # guests' RAM files live in it
    assert all(d.is_dir() for d in (p.images, p.bases, p.vms, p.cache, p.tmp))
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert stat.S_IMODE(paths(shared).home.stat().st_mode) == 0o755
