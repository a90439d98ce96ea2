#!/usr/bin/env python3
"""The cloudlet server under load on loopback: listing throughput, join latency, cached start.

Runs the real server (``cloudlet serve`` in its own process, own data dir, the embedded sample
service bootstrapped) and measures it from separate load processes:

1. ``GET /v1/services`` throughput with ``wrk`` (Debian's; falls back to this script's own
   asyncio load client if ``wrk`` is missing), 32 connections. Ceiling, same run, same load
   tool: a bare Starlette app answering one static JSON route under the same uvicorn. The
   same bare app, with a static POST route, gives the paced join run's floor: the latency
   that the machine and the load client alone add.
2. ``POST /v1/instances`` that joins a running instance, 50 concurrent clients (this script's
   asyncio client: raw keep-alive HTTP/1.1, one process), p50/p99 latency: paced (each client
   joins ``--join-rate`` times a second, latency from when the request was due), and closed
   loop (each client sends its next join as soon as the last is answered: saturation).
3. Start of a service to its first HTTP answer (client side: ``POST /v1/instances?wait=60``,
   which answers once the instance runs, then the first answer on the instance's port): the
   first start (synthesis), then starts while its snapshot is cached, each after stopping the
   previous instance and once the server has made its standby VM for the next start (its
   steady state). The join run also starts in that steady state. Then ``--waited-runs``
   cached starts whose standby VM first waited ``--standby-wait`` seconds (150: long enough
   for page cache that no process maps to leave memory on a host that pages it out, as this
   one does after ~60 s idle).

    .venv/bin/python bench/api.py [--duration 10] [--cached-runs 5] [--waited-runs 2]
        [--standby-wait 150]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from cloudlet.util.procs import terminate

REPO = Path(__file__).resolve().parent.parent
SAMPLE = "org.cloudlet.sample"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


# -- load client (run in its own process) -------------------------------------------------
async def _one_conn(
    host: str,
    port: int,
    reqs: list[bytes],
    deadline: float,
    lat: list[float],
    errors: list[int],
    rate: float,
) -> None:
    """Closed loop (``rate`` 0: next request when the answer is in), or paced at ``rate``/s.

    Paced latency counts from when the request was due, not when it was sent, so a server
    that falls behind shows it (no coordinated omission).
    """
    r, w = await asyncio.open_connection(host, port)
    i = 0
    due = time.perf_counter() + (random.random() / rate if rate else 0.0)
    try:
        while time.perf_counter() < deadline:
            req = reqs[i % len(reqs)]
            i += 1
            if rate:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                t0 = due
                due += 1.0 / rate
            else:
                t0 = time.perf_counter()
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if m:
                await r.readexactly(int(m.group(1)))
            lat.append(time.perf_counter() - t0)
            status = int(head[9:12])
            if status >= 300:
                errors.append(status)
    finally:
        w.close()


def load_main(args: argparse.Namespace) -> None:
    host, port = "127.0.0.1", args.port
    body = args.body.encode() if args.body else b""
    reqs = []
    for i in range(args.concurrency):
        b = body.replace(b"{i}", str(i).encode())
        hdr = (
            f"{args.method} {args.path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {args.token}\r\nContent-Length: {len(b)}\r\n"
            + ("Content-Type: application/json\r\n" if b else "")
            + "\r\n"
        )
        reqs.append(hdr.encode() + b)

    async def run() -> dict[str, Any]:
        lat: list[float] = []
        errors: list[int] = []
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        await asyncio.gather(
            *(
                _one_conn(host, port, [reqs[i]], deadline, lat, errors, args.rate)
                for i in range(args.concurrency)
            )
        )
        elapsed = time.perf_counter() - t0
        lat.sort()
        return {
            "requests": len(lat),
            "errors": len(errors),
            "rps": round(len(lat) / elapsed, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
            "max_ms": round(lat[-1] * 1000, 2),
        }

    print(json.dumps(asyncio.run(run())))


def run_load(
    port: int,
    path: str,
    token: str,
    *,
    method: str = "GET",
    body: str = "",
    c: int,
    d: float,
    rate: float = 0.0,
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "_load", "--port", str(port), "--path", path]
    cmd += [f"--token={token}", "--method", method, "--concurrency", str(c), "--duration", str(d)]
    cmd += ["--rate", str(rate)]
    if body:
        cmd += ["--body", body]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return res


def run_wrk(url: str, token: str, c: int, d: float) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{c}", f"-d{int(d)}s", "--latency", "-H",
         f"Authorization: Bearer {token}", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)

    def ms(m: re.Match[str] | None) -> float | None:
        if not m:
            return None
        return round(float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)], 2)

    return {
        "rps": rps,
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
        "tool": "wrk",
    }


def listing_load(port: int, path: str, token: str, d: float) -> dict[str, Any]:
    if shutil.which("wrk"):
        return run_wrk(f"http://127.0.0.1:{port}{path}", token, 32, d)
    return run_load(port, path, token, c=32, d=d) | {"tool": "asyncio-client"}


BARE_APP = """
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
import uvicorn, sys
DATA = {data}
async def h(request):
    return JSONResponse(DATA)
async def join(request):
    await request.body()
    return JSONResponse({{"joined": True}})
app = Starlette(routes=[Route("/v1/services", h), Route("/v1/instances", join, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
            loop="asyncio")
"""


# -- the benchmark ----------------------------------------------------------------------------
def prepare_home(home: Path) -> None:
    """Share the test cache's tiny image and .debs (if built) so the bootstrap is quick."""
    cache = REPO / ".cache" / "test-home"
    home.mkdir(parents=True, exist_ok=True)
    if (cache / "images" / "tiny").is_dir():
        (home / "images").mkdir(exist_ok=True)
        (home / "images" / "tiny").symlink_to(cache / "images" / "tiny")
    if (cache / "cache").is_dir():
        (home / "cache").mkdir(exist_ok=True)
        for e in (cache / "cache").iterdir():
            if e.name != "services":
                (home / "cache" / e.name).symlink_to(e)


async def timed_start(
    c: httpx.AsyncClient, probe: httpx.AsyncClient, join: bool
) -> tuple[float, dict[str, Any]]:
    """Seconds from the start request to the first HTTP answer of the instance."""
    t0 = time.perf_counter()
    r = await c.post("/v1/instances?wait=60", json={"service_id": SAMPLE, "join": join})
    r.raise_for_status()
    d = r.json()
    inst = d["instance"]
    if r.status_code == 202:  # still booting: follow it; its end event has the instance
        async with c.stream("GET", f"/v1/operations/{d['operation']}/events") as s:
            end = False
            async for line in s.aiter_lines():
                if line.startswith("event: end"):
                    end = True
                elif end and line.startswith("data:"):
                    inst = json.loads(line[5:])["result"]["instance"]
                    break
    url = inst["endpoints"]["80"]["url"]
    while True:
        try:
            if (await probe.get(url + "/hello.html")).status_code == 200:
                break
        except httpx.HTTPError:
            await asyncio.sleep(0.002)
    return time.perf_counter() - t0, inst


async def standby_ready(c: httpx.AsyncClient, timeout: float = 30.0) -> None:
    """Wait until the server has its standby VM for the next cached start (steady state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vms = (await c.get("/v1/vms")).json()
        if any(v["name"].startswith("inst-spare") and v["state"] == "paused" for v in vms):
            await asyncio.sleep(0.5)  # and let the machine settle after making it
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("no standby VM was made")


async def _standby_ready(url: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
        await standby_ready(c)


async def starts(
    url: str, token: str, cached_runs: int, waited_runs: int, standby_wait: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c,
        httpx.AsyncClient(timeout=5) as probe,
    ):
        first, inst = await timed_start(c, probe, join=False)
        kinds = [inst["start_kind"]]
        await c.post(f"/v1/instances/{inst['id']}/stop")
        cached = []
        server_side = []
        for _ in range(cached_runs):
            await standby_ready(c)
            t, inst = await timed_start(c, probe, join=False)
            cached.append(t)
            kinds.append(inst["start_kind"])
            server_side.append(inst["timings"]["total_s"])
            await c.post(f"/v1/instances/{inst['id']}/stop")
        waited = []
        for _ in range(waited_runs):  # the standby VM left alone first, as between real users
            await standby_ready(c)
            await asyncio.sleep(standby_wait)
            t, inst = await timed_start(c, probe, join=False)
            waited.append(t)
            kinds.append(inst["start_kind"])
            await c.post(f"/v1/instances/{inst['id']}/stop")
    return {
        "first_start_ms": round(first * 1000, 1),
        "first_start_kind": kinds[0],
        "cached_start_ms": [round(x * 1000, 1) for x in cached],
        "cached_start_median_ms": round(statistics.median(cached) * 1000, 1),
        "cached_start_server_ms": [round(x * 1000, 1) for x in server_side],
        "cached_kinds": sorted(set(kinds[1:])),
        "standby_wait_s": standby_wait,
        "cached_start_after_wait_ms": [round(x * 1000, 1) for x in waited],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    ld = sub.add_parser("_load")
    ld.add_argument("--port", type=int, required=True)
    ld.add_argument("--path", required=True)
    ld.add_argument("--token", required=True)
    ld.add_argument("--method", default="GET")
    ld.add_argument("--body", default="")
    ld.add_argument("--concurrency", type=int, default=50)
    ld.add_argument("--duration", type=float, default=10)
    ld.add_argument("--rate", type=float, default=0.0, help="Requests/s per client (0: closed).")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--cached-runs", type=int, default=5)
    ap.add_argument(
        "--waited-runs", type=int, default=2, help="Cached starts after the standby VM waited."
    )
    ap.add_argument("--standby-wait", type=float, default=150.0, help="Seconds it waits first.")
    ap.add_argument(
        "--join-rate", type=float, default=10.0, help="Joins/s per client in the paced run."
    )
    ap.add_argument("--keep", action="store_true", help="Keep the data dir.")
    args = ap.parse_args()
    if args.cmd == "_load":
        load_main(args)
        return

    home = Path(tempfile.mkdtemp(prefix="cloudlet-bench-api."))
    prepare_home(home)
    port = free_port()
    env = dict(os.environ, CLOUDLET_HOME=str(home))
    log = open(home / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(
        [sys.executable, "-m", "cloudlet", "serve", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    bare = None
    result: dict[str, Any] = {"machine": f"{platform.node()} {os.cpu_count()} cores"}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz")
        token = (home / "admin-token").read_text().strip()
        h = {"Authorization": f"Bearer {token}"}
        print("waiting for the bootstrap (tiny base VM, sample service)...", file=sys.stderr)
        ops = httpx.get(url + "/v1/operations", headers=h, timeout=60).json()
        for op in ops:
            if op["kind"] == "bootstrap":
                while httpx.get(f"{url}/v1/operations/{op['id']}", headers=h, timeout=60).json()[
                    "state"
                ] not in ("succeeded", "failed", "cancelled"):
                    time.sleep(0.5)
        listing = httpx.get(url + "/v1/services", headers=h).json()
        assert listing and listing[0]["service_id"] == SAMPLE, listing

        # 1. listing throughput, and the bare-app ceiling with the same tool
        print("listing throughput...", file=sys.stderr)
        result["listing"] = listing_load(port, "/v1/services", token, args.duration)
        bare_port = free_port()
        bare = subprocess.Popen(
            [sys.executable, "-c", BARE_APP.format(data=repr(listing)), str(bare_port)]
        )
        wait_http(f"http://127.0.0.1:{bare_port}/v1/services")
        result["listing_ceiling_bare_starlette"] = listing_load(
            bare_port, "/v1/services", token, args.duration
        )
        bare.send_signal(signal.SIGSTOP)  # out of the way of the start timings

        # 3. (before 2, on a quiet server) first and cached starts to the first answer
        print("first and cached starts...", file=sys.stderr)
        result["start"] = asyncio.run(
            starts(url, token, args.cached_runs, args.waited_runs, args.standby_wait)
        )

        bare.send_signal(signal.SIGCONT)
        # 2. join latency: one running instance, 50 clients joining it again and again
        print("join latency at 50 clients...", file=sys.stderr)
        httpx.patch(f"{url}/v1/services/{SAMPLE}", headers=h, json={"max_users": 100})
        r = httpx.post(url + "/v1/instances", headers=h, json={"service_id": SAMPLE}, timeout=120)
        if r.status_code == 202:
            op = r.json()["operation"]
            while httpx.get(f"{url}/v1/operations/{op}", headers=h).json()["state"] == "running":
                time.sleep(0.1)
        asyncio.run(_standby_ready(url, token))  # steady state: no refill under the load
        body = json.dumps({"service_id": SAMPLE, "join": True, "user": "bench-{i}"})
        result["join"] = run_load(
            port,
            "/v1/instances",
            token,
            method="POST",
            body=body,
            c=50,
            d=args.duration,
            rate=args.join_rate,
        ) | {"tool": "asyncio-client", "concurrency": 50, "rate_per_client": args.join_rate}
        # The same paced load on the bare app: what this machine's scheduling noise alone costs.
        result["join_floor_bare_starlette"] = run_load(
            bare_port,
            "/v1/instances",
            token,
            method="POST",
            body=body,
            c=50,
            d=args.duration,
            rate=args.join_rate,
        )
        result["join_closed_loop"] = run_load(
            port, "/v1/instances", token, method="POST", body=body, c=50, d=args.duration
        ) | {"tool": "asyncio-client", "concurrency": 50}
        insts = httpx.get(url + "/v1/instances", headers=h).json()
        result["join"]["instances_after"] = len(insts)
        result["join"]["users_after"] = sum(i["users"] for i in insts)
        for i in insts:
            httpx.post(f"{url}/v1/instances/{i['id']}/stop", headers=h, timeout=60)
    finally:
        if bare is not None:
            bare.send_signal(signal.SIGTERM)
            bare.wait(10)
        terminate(server, grace=30)
        log.close()
        if not args.keep:
            subprocess.run(
                [sys.executable, "-m", "cloudlet", "vm", "list", "--json"], env=env, check=False,
                capture_output=True,
            )  # fmt: skip
            _cleanup(home, env)
    targets = {
        "listing_rps>=1500": result["listing"]["rps"] >= 1500,
        "join_p99_ms<=20": result["join"]["p99_ms"] <= 20,
        "cached_start_ms<=250": result["start"]["cached_start_median_ms"] <= 250,
    }
    result["targets_met"] = targets
    print(json.dumps(result))


def _cleanup(home: Path, env: dict[str, str]) -> None:
    """Remove every VM of the bench's data dir (suspended standby VMs included), then the dir."""
    out = subprocess.run(
        [sys.executable, "-m", "cloudlet", "vm", "list", "--json"],
        env=env, capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    try:
        vms = json.loads(out)
    except ValueError:
        vms = []
    for v in vms:
        subprocess.run(
            [sys.executable, "-m", "cloudlet", "vm", "rm", v["id"], "--force"],
            env=env, capture_output=True, check=False,
        )  # fmt: skip
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
