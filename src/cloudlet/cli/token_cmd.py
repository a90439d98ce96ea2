"""``cloudlet token ...``: API tokens (the token itself is printed once, at creation)."""

from __future__ import annotations

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, table
from cloudlet.cli.connect import ServerOpt, connect

app = typer.Typer(help="API tokens for the server (admin or device).", no_args_is_help=True)


@app.command("create")
@handle_errors
def create(
    role: str = typer.Option("device", "--role", help="admin or device."),
    name: str = typer.Option("", "--name", help="A label for the token."),
    expires_days: float = typer.Option(None, "--expires-days", help="Lifetime in days."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Make a token; it is shown now and never again (only its hash is kept)."""
    expires = expires_days * 86400 if expires_days else None
    d = connect(server).create_token(role, name, expires)
    emit(d, as_json, lambda d: console.print(f"{d['role']} token {d['id']}:\n  {d['token']}"))


@app.command("list")
@handle_errors
def list_(server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """List tokens (ids and roles; the tokens themselves are not kept)."""
    emit(
        connect(server).list_tokens(),
        as_json,
        lambda r: table(r, ["id", "role", "name", "created", "expires", "revoked"]),
    )


@app.command("revoke")
@handle_errors
def revoke(token_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Revoke a token (calls with it get 401 from then on)."""
    d = connect(server).revoke_token(token_id)
    emit(d, as_json, lambda d: console.print(f"revoked token {d['id']}"))
