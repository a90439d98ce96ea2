"""Pick where a CLI command runs: a server (``--server URL`` / ``CLOUDLET_URL``) or here.

Both answers have the same methods with the same results, so each command is one function::

    api = connect(server)
    emit(api.list_services(), as_json, show)
"""

from __future__ import annotations

from typing import Any

import typer

from cloudlet.config import paths

ServerOpt = typer.Option(
    None,
    "--server",
    envvar="CLOUDLET_URL",
    help="Talk to the cloudlet server at URL instead of the local data dir.",
)


def connect(server: str | None) -> Any:
    """A :class:`~cloudlet.client.Client` for ``server``, else a local core."""
    if server:
        from cloudlet.client import Client, load_token

        p = None
        try:
            p = paths()
        except OSError:
            p = None
        return Client(server, load_token(p))
    from cloudlet.services.local import LocalCloudlet

    return LocalCloudlet(paths())


def connect_mobile(server: str | None) -> Any:
    """Apps, devices and messages: a server's ``/v1`` for ``server``, else the data dir."""
    if server:
        from cloudlet.client.mobile_admin import RemoteMobileAdmin

        api = connect(server)
        return RemoteMobileAdmin(api)
    from cloudlet.client.mobile_admin import LocalMobileAdmin

    return LocalMobileAdmin(paths())
