"""``cloudlet image ...`` as a user runs it: --json output, exit codes, error objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudlet.images.debs import DEB_CACHE_ENV
from cloudlet.images.model import READY_MARKER, Image

IMAGE_CLI = [sys.executable, "-c", "from cloudlet.cli.image_cmd import app; app()"]


@pytest.fixture
def cli_env(tmp_path: Path, deb_cache: Path) -> dict[str, str]:
    return dict(os.environ, CLOUDLET_HOME=str(tmp_path / "home"), **{DEB_CACHE_ENV: str(deb_cache)})


def image(env: dict[str, str], *args: str) -> tuple[int, Any, str]:
    """Run the command; parse stdout as JSON when --json was given."""
    r = subprocess.run([*IMAGE_CLI, *args], capture_output=True, text=True, env=env, timeout=300)
    if "--json" not in args:
        return r.returncode, r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout), r.stderr


def test_cli_json_round_trip(cli_env: dict[str, str], fresh_tiny: Image) -> None:
    rc, out, err = image(cli_env, "list", "--json")
    assert (rc, out) == (0, []), err

    assert fresh_tiny.kernel_path and fresh_tiny.initrd_path
    rc, out, err = image(
        cli_env,
        "import",
        str(fresh_tiny.disk_path),
        "--kernel",
        str(fresh_tiny.kernel_path),
        "--initrd",
        str(fresh_tiny.initrd_path),
        "--name",
        "imp",
        "--port",
        "80",
        "--port",
        "8080",
        "--ready-marker",
        READY_MARKER,
        "--cmdline",
        "console=ttyS0 quiet",
        "--json",
    )
    assert rc == 0, err
    assert out["name"] == "imp" and out["ports"] == [80, 8080]
    assert out["content_id"] == fresh_tiny.content_id
    assert out["kernel"] == "vmlinuz" and out["cmdline"] == "console=ttyS0 quiet"

    rc, out, _ = image(cli_env, "list", "--json")
    assert rc == 0 and [i["name"] for i in out] == ["imp"]
    rc, out, _ = image(cli_env, "info", "imp", "--json")
    assert rc == 0 and out["disk_format"] == "qcow2" and out["dir"].endswith("/images/imp")
    rc, out, _ = image(cli_env, "verify", "imp", "--json")
    assert (rc, out) == (0, {"name": "imp", "ok": True})
    rc, out, _ = image(cli_env, "delete", "imp", "--json")
    assert (rc, out) == (0, {"deleted": "imp"})
    rc, out, err = image(cli_env, "info", "imp", "--json")
    assert rc == 3 and out["error"] == "NotFoundError" and "cloudlet image list" in out["hint"]
    assert "no image named" in err


def test_cli_errors(cli_env: dict[str, str], tmp_path: Path) -> None:
    rc, out, _ = image(cli_env, "info", "../etc", "--json")
    assert rc == 2 and out["error"] == "InvalidInputError"
    junk = tmp_path / "junk.img"
    junk.write_text("not a disk")
    rc, out, _ = image(cli_env, "import", str(junk), "--json")
    assert rc == 2 and out["error"] == "InvalidInputError" and out["hint"]
    rc, out, _ = image(cli_env, "import", str(tmp_path / "missing.qcow2"), "--json")
    assert rc == 3 and out["error"] == "NotFoundError"
    rc, out, _ = image(cli_env, "import", str(junk), "--initrd", str(junk), "--json")
    assert rc == 2 and "--kernel" in out["message"]
    rc, out, _ = image(cli_env, "list", "--json")
    assert (rc, out) == (0, [])


def test_cli_build_tiny(cli_env: dict[str, str], fresh_tiny: Image) -> None:
    rc, out, err = image(cli_env, "build-tiny", "--name", "t1", "--json")
    assert rc == 0, err
    assert out["name"] == "t1" and out["content_id"] == fresh_tiny.content_id
    assert out["source"] == "build-tiny" and out["agent"] is True
    rc, out, _ = image(cli_env, "build-tiny", "--name", "t1", "--json")
    assert rc == 4 and out["error"] == "ConflictError" and "--force" in out["hint"]
    rc, out, _ = image(cli_env, "list")  # the human table
    assert rc == 0 and "t1" in out and "build-tiny" in out
