"""``cloudlet serve``: run the cloudlet server (the product's main job)."""

from __future__ import annotations

import json
import logging
import logging.config
import sys
import time
from pathlib import Path
from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, handle_errors
from cloudlet.cli.vm_cmd import parse_memory
from cloudlet.config import paths


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def _print_token(made: dict[str, Any]) -> None:
    console.print(
        "[bold]admin token[/] (shown once; also written to "
        f"{made['file']} for the local CLI):\n  {made['token']}"
    )


def _json_line(event: str, **fields: Any) -> None:
    """One JSON object per line on stdout: what ``serve --json`` says (its logs go to stderr)."""
    sys.stdout.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line (``serve --json``): time, level, logger, message.

    Ten lines of our own rather than a dependency (python-json-logger) for one formatter."""

    def format(self, record: logging.LogRecord) -> str:
        d = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            d["exception"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def _json_logging(level: str) -> None:
    """Every log line as JSON on stderr, uvicorn's included (they propagate to the root)."""
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonFormatter}},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "json",
                    "stream": "ext://sys.stderr",
                }
            },
            "root": {"handlers": ["stderr"], "level": level.upper()},
            "loggers": {
                name: {"handlers": [], "propagate": True}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
            },
        }
    )


@handle_errors
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(9999, "--port", help="TCP port."),
    data_dir: Path = typer.Option(
        None, "--data-dir", envvar="CLOUDLET_HOME", help="Data directory (CLOUDLET_HOME)."
    ),
    public_info: bool = typer.Option(
        False, "--public-info", help="Let GET /v1/info answer without a token."
    ),
    idle_timeout: float = typer.Option(
        600.0, "--idle-timeout", help="Seconds an instance without users runs before it stops."
    ),
    max_upload: str = typer.Option("16G", "--max-upload", help="Largest upload accepted."),
    name: str = typer.Option(None, "--name", help="This cloudlet's name (default: hostname)."),
    bootstrap: bool = typer.Option(
        True,
        "--bootstrap/--no-bootstrap",
        help="On first start, set up the tiny base VM and the sample service.",
    ),
    log_level: str = typer.Option("info", "--log-level"),
    kd_api: str = typer.Option(
        "open",
        "--kd-api",
        help="The KD-Cloudlet compatible API under /api: off, open (no credentials, like "
        "pycloud), or encrypted (paired devices only, via POST /api/command).",
    ),
    vm_bind: str = typer.Option(
        None,
        "--vm-bind",
        help="Address the instances' host ports bind to (default: the --host address), so "
        "that mobile clients can reach the endpoints the /api start reply gives them.",
    ),
    advertise: bool = typer.Option(
        None,
        "--advertise/--no-advertise",
        help="Announce this cloudlet over zeroconf (_cloudlet._tcp) on the --host interface "
        "(default: on unless --host is a loopback address).",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Serve the native API (/v1, docs at /docs, metrics at /metrics) for this data dir.

    With ``--json``: what it says on stdout is one JSON object per line (``serving``, and
    ``admin_token`` when it makes the first one), and every log line on stderr is JSON.
    """
    import uvicorn

    from cloudlet.server.app import create_app
    from cloudlet.services.core import Settings

    if as_json:
        _json_logging(log_level)
    else:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if kd_api not in ("off", "open", "encrypted"):
        from cloudlet.errors import InvalidInputError

        raise InvalidInputError(f"--kd-api is off, open or encrypted, not {kd_api!r}")
    p = paths(data_dir)
    settings = Settings(
        idle_timeout=idle_timeout,
        max_upload=parse_memory(max_upload) << 20,
        public_info=public_info,
        bootstrap=bootstrap,
        keep_spares=True,
        kd_api=kd_api,
        vm_bind=vm_bind or host,
        host=host,
        port=port,
        advertise=(not host.startswith("127.") and host != "localhost")
        if advertise is None
        else advertise,
    )
    if name:
        settings.name = name
    url = f"http://{host}:{port}"
    if as_json:
        app = create_app(p, settings, on_admin_token=lambda made: _json_line("admin_token", **made))
        _json_line("serving", home=str(p.home), url=url, docs=f"{url}/docs")
    else:
        app = create_app(p, settings, on_admin_token=_print_token)
        console.print(f"cloudlet serving {p.home} on {url} (API docs: /docs)")
    mode = p.home.stat().st_mode & 0o777
    if mode & 0o077:
        logging.getLogger("cloudlet").warning(
            "%s is open to other users (mode %04o) and holds the VMs' RAM files (their "
            "guests' memory): chmod 700 %s",
            p.home, mode, p.home,
        )  # fmt: skip
    # loop="asyncio": under uvloop, waiting for a daemonizing QEMU's pipes never ends.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        loop="asyncio",
        log_config=None if as_json else uvicorn.config.LOGGING_CONFIG,
    )
