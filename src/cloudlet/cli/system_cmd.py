"""Host-level commands: the accelerator probe and the demo (the main job until the server)."""

from __future__ import annotations

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, run_async
from cloudlet.config import paths
from cloudlet.errors import NotFoundError


def register(app: typer.Typer) -> None:
    app.command("accel")(accel)
    app.command("demo")(demo)


@handle_errors
def accel(
    refresh: bool = typer.Option(False, "--refresh", help="Probe again, ignoring the cache."),
    as_json: bool = JsonOpt,
) -> None:
    """Which accelerator VMs use here, decided by booting a real probe kernel under KVM."""
    from cloudlet.hypervisor.accel import choose_accel
    from cloudlet.images.store import ImageStore

    p = paths()
    kernels = [i.kernel_path for i in ImageStore(p).list() if i.kernel_path]
    choice = choose_accel(p, kernels[0] if kernels else None, refresh=refresh)
    emit(
        choice.to_dict(), as_json, lambda d: console.print(f"[bold]{d['accel']}[/]: {d['reason']}")
    )


@handle_errors
def demo(
    image: str = typer.Option("tiny", "--image", help="Image to boot (built if it is 'tiny')."),
    as_json: bool = JsonOpt,
) -> None:
    """Build the tiny image if needed, boot a sample service VM and print its URL."""
    import httpx

    from cloudlet.hypervisor.vm import BootSource, VMManager
    from cloudlet.images.store import ImageStore
    from cloudlet.images.tiny import build_tiny

    p = paths()
    store = ImageStore(p)
    try:
        img = store.get(image)
    except NotFoundError:
        if image != "tiny":
            raise
        console.print("building the tiny image from Debian packages (first run only)...")
        img = build_tiny(p, image)
    store.verify(img.name)
    vm = run_async(VMManager(p).start(BootSource.from_image(img), name="sample-service"))
    url = f"http://127.0.0.1:{vm.host_port(80)}/cgi-bin/counter"
    body = httpx.get(url, timeout=10).text.strip()
    out = vm.summary() | {"url": url, "first_response": body}
    emit(
        out,
        as_json,
        lambda d: console.print(
            f"sample service VM [bold]{d['id']}[/] is running: [link]{d['url']}[/link]\n"
            f"  first response: {d['first_response']}\n"
            f"  try: curl {d['url']}   stop: .venv/bin/cloudlet vm stop {d['id']}"
        ),
    )
