"""The native API in-process (ASGITransport): shape, auth, validation, errors, uploads, ops."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from cloudlet.catalog.db import make_engine, migrate
from cloudlet.catalog.models import Base, OperationRow
from cloudlet.config import Paths


def _svc(**kw: Any) -> dict[str, Any]:
    return {"service_id": "org.example.face", "base": "tiny"} | kw


def test_every_v1_call_needs_a_valid_token_and_does_nothing_without(api: Any) -> None:
    for path in ("/v1/services", "/v1/instances", "/v1/info", "/v1/operations", "/v1/bases"):
        r = api.get(path, token=None)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"] == "AuthError"
    r = api.post("/v1/services", json=_svc(), token="not-a-token")
    assert r.status_code == 401
    r = api.post("/v1/services", json=_svc(), headers={"Authorization": "Basic abc"}, token=None)
    assert r.status_code == 401
    assert api.get("/v1/services").json() == []  # nothing was created
    assert api.get("/v1/services").status_code == 200


def test_device_tokens_read_and_start_only_and_revocation(api: Any) -> None:
    made = api.post("/v1/tokens", json={"role": "device", "name": "phone"}).json()
    dev = made["token"]
    assert api.get("/v1/services", token=dev).status_code == 200
    r = api.post("/v1/services", json=_svc(), token=dev)
    assert r.status_code == 403 and r.json()["error"] == "ForbiddenError"
    assert api.get("/v1/tokens", token=dev).status_code == 403
    # Instance calls are open to devices: this one fails only because the service is unknown.
    r = api.post("/v1/instances", json={"service_id": "org.example.none"}, token=dev)
    assert r.status_code == 404
    api.request("DELETE", f"/v1/tokens/{made['id']}")
    api.core.tokens._cache.clear()
    assert api.get("/v1/services", token=dev).status_code == 401


def test_tokens_are_stored_hashed_and_the_first_admin_token_is_kept_0600(api: Any) -> None:
    token = api.tokens["admin"]
    f = api.paths.home / "admin-token"
    assert f.read_text().strip() == token
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    db = sqlite3.connect(api.paths.home / "cloudlet.db")
    rows = db.execute("select hash, role from tokens").fetchall()
    db.close()
    assert rows and all(token not in h for h, _ in rows)
    assert {r for _, r in rows} == {"admin"}
    assert api.get("/v1/tokens").json()[0]["role"] == "admin"
    assert "token" not in api.get("/v1/tokens").json()[0]


def test_public_info_is_a_setting(bare_home: Paths, make_api: Any) -> None:
    a = make_api(bare_home, public_info=True, name="edge-1")
    r = a.get("/v1/info", token=None)
    assert r.status_code == 200
    d = r.json()
    assert d["name"] == "edge-1"
    assert d["cpu"]["cores"] >= 1 and d["memory"]["total"] > d["memory"]["free"] > 0
    assert len(d["load"]) == 3 and d["instances"] == {"running": 0}
    assert d["services"] == [] and "accelerator" in d
    assert a.get("/v1/services", token=None).status_code == 401  # only info is opened


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_svc(service_id="Not-Reverse-DNS"), "service_id"),
        (_svc(service_id="org..double"), "service_id"),
        (_svc(guest_ports=[0]), "guest_ports"),
        (_svc(guest_ports=[80, 80]), "guest_ports"),
        (_svc(memory_min_mib=512, memory_ideal_mib=256), "body"),
        (_svc(max_users=0), "max_users"),
        (_svc(base="../etc"), "base"),
        (_svc(overlay="../../x"), "overlay"),
        (_svc(surprise=1), "surprise"),
        ({"base": "tiny"}, "service_id"),
    ],
)
def test_validation_errors_are_422_with_field_and_reason(
    api: Any, body: dict[str, Any], field: str
) -> None:
    r = api.post("/v1/services", json=body)
    assert r.status_code == 422
    d = r.json()
    assert d["error"] == "ValidationError" and d["message"]
    locs = [".".join(str(x) for x in e["loc"]) for e in d["detail"]]
    assert any(field in loc for loc in locs), locs
    assert all(e["msg"] for e in d["detail"])


def test_unknown_ids_are_404_and_traversal_is_refused(api: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    for path in (
        "/v1/services/org.example.none",
        "/v1/overlays/0123456789abcdef",
        "/v1/instances/abcdef",
        "/v1/operations/0123456789abcdef",
        "/v1/bases/nothere",
        "/v1/images/nothere",
    ):
        r = api.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"] == "NotFoundError"
    for path in (
        "/v1/bases/..%2F..%2Fetc",
        "/v1/bases/.hidden",
        "/v1/images/..",
        "/v1/services/..%2F..%2Fetc%2Fpasswd",
        "/v1/overlays/..%2Fsecret",
        f"/v1/overlays/{'%2E%2E%2F' * 5}tmp",
        "/v1/instances/..%2F..",
    ):
        r = api.get(path)
        assert r.status_code in (404, 422), path
    r = api.request("DELETE", "/v1/bases/..%2F..%2Fhome")
    assert r.status_code in (404, 422)
    assert secret.exists()


def test_service_create_edit_delete_and_conflicts(api: Any) -> None:
    r = api.post("/v1/services", json=_svc(description="faces", tags=["ml"], max_users=4))
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["service_id"] == "org.example.face" and d["memory_ideal_mib"] == 256
    assert api.post("/v1/services", json=_svc()).status_code == 409
    r = api.request("PATCH", "/v1/services/org.example.face", json={"version": "2.0"})
    assert r.status_code == 200 and r.json()["version"] == "2.0" and r.json()["tags"] == ["ml"]
    r = api.request("PATCH", "/v1/services/org.example.face", json={"memory_ideal_mib": 64})
    assert r.status_code == 422  # ideal below min
    # No base VM and no overlay here: starting is a conflict that says why.
    r = api.post("/v1/instances", json={"service_id": "org.example.face"})
    assert r.status_code == 409 and "base VM 'tiny'" in r.json()["message"]
    assert api.get("/v1/instances?all=true").json() == []
    r = api.post("/v1/services", json=_svc(service_id="org.example.other", overlay="00" * 8))
    assert r.status_code == 409 and "does not exist" in r.json()["message"]
    assert api.request("DELETE", "/v1/services/org.example.face").status_code == 200
    assert api.get("/v1/services/org.example.face").status_code == 404


def test_upload_over_the_limit_is_refused_before_it_fills_the_disk(
    bare_home: Paths, make_api: Any
) -> None:
    a = make_api(bare_home, max_upload=1 << 20)
    big = os.urandom(3 << 20)
    # Known length: refused before a byte is read, and no record made.
    r = a.post("/v1/overlays/upload", content=big)
    assert r.status_code == 413 and r.json()["error"] == "TooLargeError"
    assert a.get("/v1/overlays").json() == []

    async def stream() -> Any:
        for i in range(0, len(big), 64 << 10):
            yield big[i : i + (64 << 10)]

    # Unknown length (chunked): cut off at the limit while streaming; nothing kept.
    oid = a.post("/v1/overlays", json={"name": "big"}).json()["id"]
    r = a.request("PUT", f"/v1/overlays/{oid}/file", content=stream())
    assert r.status_code == 413
    o = a.get(f"/v1/overlays/{oid}").json()
    assert o["state"] == "killed"
    assert not any((bare_home.home / "overlays").iterdir())
    assert not any((bare_home.tmp / "uploads").iterdir())
    # A killed overlay takes no second upload and is never used.
    assert a.request("PUT", f"/v1/overlays/{oid}/file", content=b"x").status_code == 409


def test_a_corrupt_overlay_upload_is_never_active(api: Any) -> None:
    r = api.post("/v1/overlays/upload?name=junk", content=os.urandom(200_000))
    assert r.status_code == 422
    assert r.json()["error"] in ("OverlayCorrupt", "IntegrityError", "OverlayVersionError")
    (o,) = api.get("/v1/overlays").json()
    assert o["state"] == "killed" and o["error"]
    assert api.get(f"/v1/overlays/{o['id']}/file").status_code == 409
    assert not any((api.paths.home / "overlays").iterdir())
    r = api.post("/v1/services", json=_svc(overlay=o["id"]))
    assert r.status_code == 409 and "killed" in r.json()["message"]


def test_operations_events_and_cancel(api: Any) -> None:
    async def steps(ctx: Any) -> dict[str, Any]:
        for i in range(1, 4):
            await asyncio.sleep(0.02)
            ctx.progress(i / 4, f"step {i}")
        return {"answer": 42}

    async def forever(ctx: Any) -> None:
        tmp = api.paths.tmp / "op-temp"
        tmp.write_bytes(b"half")
        ctx.add_temp(tmp)
        await asyncio.sleep(3600)

    async def submit_and_stream() -> tuple[str, str]:
        op = api.core.runner.submit("test.steps", steps, target="tests")
        headers = {"Authorization": f"Bearer {api.tokens['admin']}"}
        async with api.client.stream("GET", f"/v1/operations/{op}/events", headers=headers) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join([c async for c in r.aiter_text()])
        return op, text

    op, text = api.run(submit_and_stream())
    events = [b for b in text.split("\n\n") if b.strip()]
    kinds = [e.split("\n")[0] for e in events]
    assert kinds[-1] == "event: end" and kinds.count("event: end") == 1
    assert "event: progress" in kinds
    last = json.loads(events[-1].split("data: ", 1)[1])
    assert last["state"] == "succeeded" and last["result"] == {"answer": 42}
    assert api.get(f"/v1/operations/{op}").json()["progress"] == 1.0

    op = api.run(_submit(api, "test.forever", forever))
    r = api.post(f"/v1/operations/{op}/cancel")
    assert r.status_code == 202
    d = api.wait(op)
    assert d["state"] == "cancelled"
    assert not (api.paths.tmp / "op-temp").exists()  # its temp file went with it
    assert api.post(f"/v1/operations/{op}/cancel").status_code == 409
    assert next(o["id"] for o in api.get("/v1/operations").json()) == op


async def _submit(api: Any, kind: str, body: Any) -> str:
    op: str = api.core.runner.submit(kind, body)
    await asyncio.sleep(0.01)
    return op


def test_operations_left_running_by_a_killed_server_end_failed(
    bare_home: Paths, make_api: Any
) -> None:
    a = make_api(bare_home)
    half = bare_home.tmp / "half-written.blob"
    half.write_bytes(b"partial")
    t = time.time()
    with a.core.catalog.session() as s:
        s.add(
            OperationRow(
                id="00aa00aa00aa00aa",
                kind="base.import",
                state="running",
                progress=0.4,
                message="verifying",
                temp_paths=[str(half)],
                created=t,
                updated=t,
            )
        )
    a.close()
    b = make_api(bare_home)
    assert "admin" not in b.tokens  # the admin token is made (and shown) only once
    b.tokens["admin"] = a.tokens["admin"]
    d = b.get("/v1/operations/00aa00aa00aa00aa").json()
    assert d["state"] == "failed"
    assert d["error"]["message"] == "interrupted by server restart"
    assert not half.exists()


def test_openapi_docs_and_metrics(api: Any) -> None:
    spec = api.get("/openapi.json", token=None).json()
    for p in (
        "/v1/services",
        "/v1/services/{sid}",
        "/v1/services/{sid}/package",
        "/v1/instances",
        "/v1/instances/{iid}/stop",
        "/v1/operations/{op_id}/events",
        "/v1/overlays/{oid}/file",
        "/v1/bases/{name}/export",
        "/v1/info",
    ):
        assert p in spec["paths"], p
    assert api.get("/docs", token=None).status_code == 200
    api.get("/v1/services")
    text = api.get("/metrics", token=None).text
    assert 'cloudlet_http_request_duration_seconds_count{method="GET",route="/v1/services"' in text
    assert 'cloudlet_instances{state="running"} 0.0' in text
    assert "cloudlet_instance_start_seconds" in text


def test_migrations_create_exactly_the_models_tables(tmp_path: Path) -> None:
    engine = make_engine(tmp_path / "c.db")
    migrate(engine)
    migrate(engine)  # idempotent
    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        cols = {c["name"] for c in insp.get_columns(table.name)}
        assert cols == {c.name for c in table.columns}, table.name
    assert set(insp.get_table_names()) == {t.name for t in Base.metadata.sorted_tables} | {
        "alembic_version"
    }
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_bases_images_and_what_uses_them(srv_home: Paths, make_api: Any) -> None:
    a = make_api(srv_home)
    (b,) = a.get("/v1/bases").json()
    assert b["name"] == "tiny" and len(b["base_id"]) == 64
    assert a.post("/v1/services", json=_svc()).status_code == 201
    d = a.get("/v1/bases/tiny").json()
    assert d["used_by"] == {"vms": [], "services": ["org.example.face"]}
    r = a.request("DELETE", "/v1/bases/tiny")
    assert r.status_code == 409 and "org.example.face" in r.json()["message"]
    r = a.post("/v1/bases", json={"image": "tiny", "name": "tiny"})
    assert r.status_code == 409  # exists already
    assert any(i["name"] == "tiny" for i in a.get("/v1/images").json())
    # Download: exactly the files an import takes; anything else is refused.
    img = a.get("/v1/images/tiny").json()
    r = a.get("/v1/images/tiny/files/kernel")
    assert r.status_code == 200 and r.content == (Path(img["dir"]) / img["kernel"]).read_bytes()
    assert a.get("/v1/images/tiny/files/..%2Fimage.json").status_code in (404, 422)
    assert a.get("/v1/images/tiny/files/manifest").status_code == 422
    # An image upload that is not a disk fails its operation and leaves no image behind.
    r = a.post("/v1/images/junk/import?port=80", content=b"not a disk" * 1000)
    assert r.status_code == 202
    op = a.wait(r.json()["operation"])
    assert op["state"] == "failed" and op["error"]["message"]
    assert a.get("/v1/images/junk").status_code == 404
    assert list((srv_home.tmp / "uploads").iterdir()) == []
    r = a.post("/v1/instances", json={"service_id": "org.example.face"})
    assert r.status_code == 409 and "no overlay" in r.json()["message"]
