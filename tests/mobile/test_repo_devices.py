"""The app repository, paired devices and device messages: native API, core and CLI."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from cloudlet.config import Paths
from cloudlet.services.devices import KDCryptoError, kd_decrypt, kd_encrypt, kd_key
from helpers import cli
from mobile.conftest import aes_decrypt, aes_encrypt


def _upload(a: Any, data: bytes, token: str = "admin", **params: str) -> Any:
    return a.post("/v1/apps", params=params, content=data, token=token)


def test_apps_upload_filter_edit_download_delete(bare_home: Paths, make_api: Any) -> None:
    a = make_api(bare_home)
    apk = os.urandom(5000)
    r = _upload(a, apk, name="Face", service_id="org.example.face", tags="face,ml",
                min_os_version="4.1", app_version="1.2", package_name="org.example.faceapp",
                file_name="../../../../tmp/evil/../face.apk")  # fmt: skip
    assert r.status_code == 201, r.text
    face = r.json()
    assert face["md5sum"] == hashlib.md5(apk).hexdigest()
    assert face["sha256"] == hashlib.sha256(apk).hexdigest()
    assert face["size"] == len(apk) and face["file_name"] == "face.apk"
    # Stored under its id only, whatever name was sent.
    assert sorted(p.name for p in (bare_home.home / "apps").iterdir()) == [face["id"]]
    assert (bare_home.home / "apps" / face["id"]).read_bytes() == apk
    r = _upload(a, b"wheel", name="Speech", service_id="org.example.speech", os_name="linux",
                tags="speech", file_name="C:\\Users\\x\\speech.whl")  # fmt: skip
    speech = r.json()
    assert speech["file_name"] == "speech.whl" and speech["min_os_version"] == ""
    r = _upload(a, b"x", name="Hidden", service_id="org.example.face", file_name="...")
    assert r.json()["file_name"] == f"{r.json()['id']}.bin"
    hidden = r.json()

    def names(**q: str) -> list[str]:
        r = a.get("/v1/apps", params=q)
        assert r.status_code == 200
        return sorted(x["name"] for x in r.json())

    assert names() == ["Face", "Hidden", "Speech"]
    assert names(tags="ml,other") == ["Face"]
    assert names(service_id="org.example.face") == ["Face", "Hidden"]
    assert names(os_name="Android") == ["Face", "Hidden"]
    assert names(os_name="android", os_version="4.0.3") == ["Hidden"]
    assert names(os_name="android", os_version="4.10") == ["Face", "Hidden"]

    r = a.request("PATCH", f"/v1/apps/{face['id']}", json={"tags": ["x"], "app_version": "2"})
    assert r.status_code == 200 and r.json()["tags"] == ["x"] and r.json()["app_version"] == "2"
    r = a.request("PATCH", f"/v1/apps/{face['id']}", json={"service_id": "Not A Service"})
    assert r.status_code == 422
    new = b"new version"
    r = a.request("PUT", f"/v1/apps/{face['id']}/file", content=new, params={"file_name": "f2.apk"})
    assert r.status_code == 200 and r.json()["md5sum"] == hashlib.md5(new).hexdigest()
    r = a.get(f"/v1/apps/{face['id']}/file")
    assert r.status_code == 200 and r.content == new
    assert 'filename="f2.apk"' in r.headers["content-disposition"]
    # Ids are checked before use; an unknown one is a 404.
    assert a.get("/v1/apps/..%2F..%2Fcloudlet.db/file").status_code in (404, 422)
    assert a.get("/v1/apps/0123456789abcdef").status_code == 404
    # A device token reads the repository but does not change it.
    dev = a.post("/v1/tokens", json={"role": "device"}).json()["token"]
    assert a.get("/v1/apps", token=dev).status_code == 200
    assert _upload(a, b"x", name="n", service_id="org.a.b", token=dev).status_code == 403
    r = a.request("DELETE", f"/v1/apps/{hidden['id']}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert not (bare_home.home / "apps" / hidden["id"]).exists()
    assert names() == ["Face", "Speech"]
    # An app needs a name and a service id.
    r = _upload(a, b"x", name="n")
    assert r.status_code == 422 and "service id" in r.json()["message"]


def test_devices_pairing_revoke_reauthorize_and_admin_only(bare_home: Paths, make_api: Any) -> None:
    a = make_api(bare_home)
    r = a.post("/v1/devices", json={"device_id": "phone-1", "name": "alice", "expires_in": 600,
                                    "native_token": True})  # fmt: skip
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["state"] == "authorized" and len(made["password"]) >= 16 and made["token"]
    core = a.core
    assert core.devices.check("phone-1") == kd_key(made["password"])
    # The password and token are shown once: never listed, not stored as such.
    listed = a.get("/v1/devices").json()
    assert [d["device_id"] for d in listed] == ["phone-1"]
    assert "password" not in listed[0] and "token" not in listed[0]
    assert made["password"].encode() not in (bare_home.home / "cloudlet.db").read_bytes()
    # Its native token works with the native API, as a device.
    assert a.get("/v1/services", token=made["token"]).status_code == 200
    assert a.get("/v1/devices", token=made["token"]).status_code == 403  # admin only
    assert a.post("/v1/devices", json={"device_id": "phone-1"}).status_code == 409
    r = a.post("/v1/devices/phone-1/revoke")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    assert a.get("/v1/services", token=made["token"]).status_code == 401  # token revoked too
    with pytest.raises(Exception) as e:
        core.devices.check("phone-1")
    assert getattr(e.value, "status", None) == 403 and str(e.value).startswith("#")
    r = a.post("/v1/devices/phone-1/authorize", json={"expires_in": 0.05})
    assert r.json()["state"] == "authorized"
    import time

    time.sleep(0.1)
    assert a.get("/v1/devices/phone-1").json()["state"] == "expired"
    with pytest.raises(Exception) as e:
        core.devices.check("phone-1")
    assert getattr(e.value, "status", None) == 403 and "expired" in str(e.value)
    assert a.post("/v1/devices/phone-1/authorize").json()["expires"] is None
    assert core.devices.check("phone-1")
    with pytest.raises(Exception) as e:
        core.devices.check("nobody")
    assert getattr(e.value, "status", None) == 401 and str(e.value).startswith("#")
    # A generated id and password; bad input is refused.
    gen = a.post("/v1/devices", json={}).json()
    assert gen["device_id"].startswith("dev-")
    assert a.post("/v1/devices", json={"device_id": "../x"}).status_code == 422
    assert a.post("/v1/devices", json={"password": "short"}).status_code == 422
    assert a.request("DELETE", "/v1/devices/phone-1").json()["deleted"] is True
    assert a.get("/v1/devices/phone-1").status_code == 404


def test_messages_queue_for_users_each_handed_out_once(bare_home: Paths, make_api: Any) -> None:
    core = make_api(bare_home).core
    dm = core.devices
    sid = "org.example.face"
    dm.record_use("phone-a", sid, "i1")
    dm.record_use("phone-b", sid, "i1")
    dm.record_use("phone-c", "org.example.other", "i2")
    n = dm.queue_moved(sid, cloudlet_name="edge-2", host="10.0.0.2", port=9999, service_port=41000,
                       instance_id="abc")  # fmt: skip
    assert n == 2  # the two devices that used the service
    assert dm.queue_message(sid, "maintenance at noon", device_ids=["phone-c"]) == 1
    (m,) = dm.take_messages("phone-a", sid)
    assert m["message"] == "move-to-new-cloudlet-network"
    assert m["text"] == "this service moved to cloudlet edge-2 at 10.0.0.2:9999"
    # What KD-Cloudlet's MoveToNewCloudletHandler reads, all strings.
    assert m["params"] == {
        "cloudlet_name": "edge-2",
        "cloudlet_fqdn": "",
        "cloudlet_ip": "10.0.0.2",
        "cloudlet_port": "9999",
        "cloudlet_encryption_enabled": "false",
        "ssid": "",
        "instance_id": "abc",
        "service_port": "41000",
    }
    assert dm.take_messages("phone-a", sid) == []  # once
    assert dm.take_messages("phone-c", "org.example.other") == []
    assert [x["text"] for x in dm.take_messages("phone-c")] == ["maintenance at noon"]
    # Concurrent polls: every message goes to exactly one of them.
    for i in range(50):
        dm.queue_message(sid, f"m{i}", device_ids=["phone-b"])
    got: list[str] = []
    lock = threading.Lock()

    def poll() -> None:
        for _ in range(5):
            ms = dm.take_messages("phone-b", sid)
            with lock:
                got.extend(x["text"] for x in ms)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got += [x["text"] for x in dm.take_messages("phone-b", sid)]
    assert sorted(got) == sorted(["this service moved to cloudlet edge-2 at 10.0.0.2:9999"]
                                 + [f"m{i}" for i in range(50)])  # fmt: skip
    listed = dm.list_messages(device_id="phone-b")
    assert len(listed) == 51 and all(x["read"] for x in listed)


def test_kd_cipher_agrees_with_an_independent_implementation() -> None:
    key = kd_key("correct horse")
    for data in (b"", b"x" * 15, b"y" * 16, b"/servicevm/start&join=true&serviceId=a.b"):
        assert aes_decrypt(kd_encrypt(data, key), "correct horse") == data
        assert kd_decrypt(aes_encrypt(data, "correct horse"), key) == data
    with pytest.raises(KDCryptoError) as e:
        kd_decrypt(b"not base64 !!", key)
    assert e.value.kind == "base64"
    # A wrong key, or a damaged last block, gives garbage that fails PKCS#7 unpadding, except
    # about once in 256 (garbage ending in 0x01 unpads): KD's CBC has no MAC. So: over fresh
    # tokens (random IVs), never the plaintext, and almost always the "key" error.
    raised = {"wrong key": 0, "damaged": 0}
    for _ in range(32):
        token = aes_encrypt(b"/services", "correct horse")
        for case, t, k in (
            ("wrong key", token, kd_key("wrong")),
            ("damaged", token[:-8] + b"AAAAAAA=", key),
        ):
            try:
                out = kd_decrypt(t, k)
            except KDCryptoError as err:
                assert err.kind in ("key", "base64")
                raised[case] += 1
            else:
                assert out != b"/services"
    assert min(raised.values()) >= 28, raised


def test_cli_apps_and_devices_on_the_data_dir(bare_home: Paths, tmp_path: Path) -> None:
    env = dict(os.environ, CLOUDLET_HOME=str(bare_home.home))
    env.pop("CLOUDLET_URL", None)
    f = tmp_path / "client.apk"
    f.write_bytes(b"apk bytes")
    r = cli("app", "upload", str(f), "--service", "org.example.face", "--tag", "face",
            "--min-os-version", "5", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    up = json.loads(r.stdout)
    assert up["md5sum"] == hashlib.md5(b"apk bytes").hexdigest() and up["name"] == "client.apk"
    r = cli("app", "list", "--os", "android", "--os-version", "4.4", "--json", env=env)
    assert json.loads(r.stdout) == []
    r = cli("app", "list", "--tag", "face", "--json", env=env)
    assert [x["id"] for x in json.loads(r.stdout)] == [up["id"]]
    out = tmp_path / "back.apk"
    r = cli("app", "download", up["id"], "-o", str(out), "--json", env=env)
    assert r.returncode == 0 and out.read_bytes() == b"apk bytes"
    r = cli("device", "create", "tab-7", "--minutes", "30", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["expires"] is not None
    r = cli("device", "revoke", "tab-7", "--json", env=env)
    assert json.loads(r.stdout)["state"] == "revoked"
    r = cli("message", "send", "org.example.face", "hello", "--device", "tab-7", "--json", env=env)
    assert json.loads(r.stdout) == {"queued": 1}
    r = cli("device", "info", "nope", env=env)
    assert r.returncode == 3 and "no device" in r.stderr
    r = cli("app", "delete", up["id"], "--json", env=env)
    assert json.loads(r.stdout)["deleted"] is True
