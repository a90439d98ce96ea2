"""The embedded defaults: what a fresh ``cloudlet serve`` sets up so it has something to run.

The tiny image (built from Debian packages if missing), base VM ``tiny``, and the sample
service ``org.cloudlet.sample``: a VM resumed from the base, customized through its guest agent
(a page and a small CGI app), captured as an overlay. Each step is skipped when its result is
already there, and the whole is recorded as done, so a second start does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import TYPE_CHECKING, Any

from cloudlet.errors import NotFoundError
from cloudlet.operations.runner import OperationContext
from cloudlet.services.instances import VM_PREFIX
from cloudlet.services.models import ServiceSpec

if TYPE_CHECKING:
    from cloudlet.services.core import Cloudlet

SAMPLE_SERVICE = "org.cloudlet.sample"
SAMPLE_BASE = "tiny"
SAMPLE_IMAGE = "tiny"
SETTING = "bootstrapped"

HELLO_HTML = """<!doctype html>
<title>cloudlet sample service</title>
<h1>Hello from a cloudlet</h1>
<p>This page was written into the VM before its overlay was captured; the VM you see was
rebuilt from base VM <code>tiny</code> plus that overlay and resumed from memory.</p>
"""

HELLO_CGI = """#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "hello from org.cloudlet.sample"
echo "guest uptime: $(cut -d' ' -f1 /proc/uptime) s"
"""

CUSTOMIZE = (
    "cat > /www/hello.html && "
    "printf '%s' \"$HELLO_CGI\" > /www/cgi-bin/hello && chmod 755 /www/cgi-bin/hello && sync"
)


def is_done(core: Cloudlet) -> bool:
    return bool(core.catalog.get_setting(SETTING))


async def bootstrap(core: Cloudlet, ctx: OperationContext) -> dict[str, Any]:
    """Set up the embedded defaults (idempotent; see the module docstring)."""
    from cloudlet.images.store import ImageStore
    from cloudlet.images.tiny import build_tiny
    from cloudlet.synthesis.base import BaseStore
    from cloudlet.synthesis.capture import capture_overlay

    paths = core.paths
    done: list[str] = []
    images = ImageStore(paths)
    if not images.exists(SAMPLE_IMAGE):
        ctx.progress(0.02, "building the tiny image from Debian packages")
        await asyncio.to_thread(build_tiny, paths, SAMPLE_IMAGE)
        done.append("image")
    bases = BaseStore(paths)
    try:
        base = bases.get(SAMPLE_BASE)
    except NotFoundError:
        ctx.progress(0.3, f"creating base VM {SAMPLE_BASE}")
        base = await bases.create(images.verify(SAMPLE_IMAGE), SAMPLE_BASE)
        done.append("base")
    try:
        core.registry.get(SAMPLE_SERVICE)
    except NotFoundError:
        ctx.progress(0.6, "making the sample overlay")
        out = paths.tmp / f"sample-{secrets.token_hex(4)}.overlay"
        ctx.add_temp(out)
        vm = await bases.start_vm(SAMPLE_BASE, vm_name=f"{VM_PREFIX}bootstrap")
        try:
            cmd = f"HELLO_CGI={_sh_quote(HELLO_CGI)}; {CUSTOMIZE}"
            res = await core.vms.exec(vm.id, cmd, HELLO_HTML.encode(), 30)
            if res.exit_code != 0:
                raise RuntimeError(f"customizing the sample VM failed: {res.stderr!r}")
            await capture_overlay(paths, vm.id, out)
        finally:
            await core.vms.delete(vm.id, force=True)
        ctx.progress(0.85, "verifying the sample overlay")
        o = await core.overlays.add_file(out, "sample")
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        core.registry.create(
            ServiceSpec(
                service_id=SAMPLE_SERVICE,
                description="Sample web service: /hello.html and /cgi-bin/hello on guest port 80",
                version="1.0",
                tags=["sample", "http"],
                base=SAMPLE_BASE,
                overlay=o["id"],
                guest_ports=[80],
                memory_min_mib=base.hardware.memory_mib,
                cpus=base.hardware.cpus,
                max_users=10,
            )
        )
        done.append("service")
    core.catalog.set_setting(SETTING, {"service": SAMPLE_SERVICE, "base": SAMPLE_BASE})
    return {"created": done, "service": SAMPLE_SERVICE, "base": SAMPLE_BASE}


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
