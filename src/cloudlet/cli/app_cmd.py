"""``cloudlet app ...``: the app repository (client apps tied to a service id)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cloudlet.cli.common import (
    JsonOpt,
    console,
    detail,
    emit,
    handle_errors,
    show_written,
    table,
    tags_line,
)
from cloudlet.cli.connect import ServerOpt, connect_mobile

app = typer.Typer(help="Client apps for mobile users, tied to a service id.", no_args_is_help=True)


def show_app(d: dict[str, Any]) -> None:
    detail(
        f"[bold]{d['id']}[/] {d['name']} {d['app_version']}  ({d['service_id']})",
        f"file {d['file_name']}  {d['size']} bytes  md5 {d['md5sum']}  "
        f"os {d['os_name'] or 'any'} >= {d['min_os_version'] or 'any'}",
        f"package {d['package_name']}" if d.get("package_name") else None,
        tags_line(d),
        d.get("description"),
    )


def _meta(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None and v != []}


@app.command("list")
@handle_errors
def list_(
    service: str = typer.Option(None, "--service", help="Only apps for this service id."),
    tag: list[str] = typer.Option([], "--tag", help="Any of these tags."),
    os_name: str = typer.Option(None, "--os", help="OS name, e.g. android."),
    os_version: str = typer.Option(None, "--os-version", help="Apps that run on this version."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List apps, filtered by service, tags, OS and OS version."""
    rows = connect_mobile(server).list_apps(
        service_id=service, tags=tag or None, os_name=os_name, os_version=os_version
    )
    cols = ["id", "name", "service_id", "app_version", "os_name", "min_os_version", "size"]
    emit(rows, as_json, lambda r: table(r, [*cols, "md5sum"]))


@app.command("info")
@handle_errors
def info(app_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Everything recorded about an app."""
    emit(connect_mobile(server).get_app(app_id), as_json, show_app)


@app.command("upload")
@handle_errors
def upload(
    file: Path = typer.Argument(..., help="The app file (any type: APK, wheel, tarball...)."),
    service: str = typer.Option(..., "--service", help="The service id it uses."),
    name: str = typer.Option(None, "--name", help="Default: the file name."),
    description: str = typer.Option(None, "--description"),
    package: str = typer.Option(None, "--package", help="Package name, e.g. org.example.app."),
    os_name: str = typer.Option(None, "--os", help="OS name (default android)."),
    min_os_version: str = typer.Option(None, "--min-os-version"),
    version: str = typer.Option(None, "--version", help="The app's version."),
    tag: list[str] = typer.Option([], "--tag"),
    file_name: str = typer.Option(None, "--file-name", help="Name offered on download."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Add an app to the repository (its MD5 and SHA-256 are computed here)."""
    fields = _meta(
        name=name or file.name,
        service_id=service,
        description=description,
        package_name=package,
        os_name=os_name,
        min_os_version=min_os_version,
        app_version=version,
        tags=tag,
    )
    emit(connect_mobile(server).upload_app(file, fields, file_name), as_json, show_app)


@app.command("edit")
@handle_errors
def edit(
    app_id: str,
    file: Path = typer.Option(None, "--file", help="A new file for the app."),
    service: str = typer.Option(None, "--service"),
    name: str = typer.Option(None, "--name"),
    description: str = typer.Option(None, "--description"),
    package: str = typer.Option(None, "--package"),
    os_name: str = typer.Option(None, "--os"),
    min_os_version: str = typer.Option(None, "--min-os-version"),
    version: str = typer.Option(None, "--version"),
    tag: list[str] = typer.Option([], "--tag", help="Replaces all tags."),
    file_name: str = typer.Option(None, "--file-name"),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Change an app's metadata (options not given stay) and/or replace its file."""
    api = connect_mobile(server)
    changes = _meta(
        service_id=service,
        name=name,
        description=description,
        package_name=package,
        os_name=os_name,
        min_os_version=min_os_version,
        app_version=version,
        tags=tag,
    )
    d = api.edit_app(app_id, changes) if changes or file is None else api.get_app(app_id)
    if file is not None:
        d = api.replace_app_file(app_id, file, file_name)
    emit(d, as_json, show_app)


@app.command("download")
@handle_errors
def download(
    app_id: str,
    output: Path = typer.Option(..., "-o", "--output"),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write an app's file."""
    d = connect_mobile(server).download_app(app_id, output)
    emit(d, as_json, show_written)


@app.command("delete")
@handle_errors
def delete(app_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Remove an app and its file."""
    d = connect_mobile(server).delete_app(app_id)
    emit(d, as_json, lambda d: console.print(f"deleted app {d['id']} ({d['name']})"))
