"""identityd's API end to end, against the spec (spec/api.md §2.3, §5, §7, §9;
spec/provisioning.md §12–§14): the authorization matrix as real unprivileged uids, the
reconciliation rules of §12.3, module reads per §12.5 (hub first, backups on failure, cache
first when asked), reprovisioning (success, failure, recovery) and the shape of every error.

A real aziotd (keyd + identityd) runs against mockcloud's DPS and IoT Hub. Manual SAS
provisioning starts in about a second, so the tests that need no DPS use it; the reprovision
test uses DPS (each registration costs the client's 5 s poll). Each test shares one daemon
across many checks, restarting it when the config must change.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mockcloud import sas as mock_sas
from mockcloud.cloud import Cloud
from tests.daemon import Daemon, ServiceDir
from tests.test_daemon import NOBODY, as_uid
from tests.test_identityd import dps_config, start

VERSION = "2022-08-01"
MOD_UID, DEV_UID, BOTH_UID, EDGED_UID, EDGED2_UID, EMPTY_UID = 4242, 4243, 4244, 4245, 4246, 4247

AUTH_ERROR = {"message": "authorization error"}
HUB_ERROR = "Hub client error\ncaused by: "
DPS_ERROR = "DPS client error\ncaused by: "
NO_RETRY = "cloud_retries = 0"  # a refused hub fails at once instead of after a 3 s retry


def invalid_type(cause: str) -> dict[str, str]:
    return {"message": f'parameter "type" has an invalid value\ncaused by: {cause}'}


@pytest.fixture
def cloud(world_dir: Path) -> Iterator[Cloud]:
    with Cloud(world_dir / "cloud") as cloud:
        yield cloud


# -- helpers ---------------------------------------------------------------------------------


def principal(uid: int, name: str, idtype: list[str] | None) -> str:
    text = f'\n[[principal]]\nuid = {uid}\nname = "{name}"\n'
    if idtype is not None:
        text += "idtype = [" + ", ".join(f'"{t}"' for t in idtype) + "]\n"
    return text


def manual_config(cloud: Cloud, device_id: str, principals: str = "", top: str = "") -> Any:
    def config(service: ServiceDir) -> str:
        return f"""
hostname = "h"
homedir = "{service.home}"
{top}
[provisioning]
source = "manual"
iothub_hostname = "{cloud.hub_hostname}"
device_id = "{device_id}"
[provisioning.authentication]
method = "sas"
device_id_pk = "device-key"
{principals}"""

    return config


def start_manual(
    world_dir: Path, cloud: Cloud, device_id: str, principals: str = "", top: str = ""
) -> tuple[Daemon, str]:
    """A device made by hand in the mock hub and an aziotd provisioned manually as it."""
    key = base64.b64encode(os.urandom(32)).decode()
    cloud.hub.add_device(device_id, primary_key=key)
    return start(world_dir, cloud, manual_config(cloud, device_id, principals, top), key), key


def dps_config_with(cloud: Cloud, registration_id: str, principals: str, top: str) -> Any:
    """tests.test_identityd's DPS config, with top-level settings (before any table)."""
    base = dps_config(cloud, registration_id, principals)

    def config(service: ServiceDir) -> str:
        return top + "\n" + base(service)  # type: ignore[operator]

    return config


def reconfigure(daemon: Daemon, config: Callable[[ServiceDir], str]) -> None:
    """New identityd config, then a restart."""
    daemon.stop()
    service = daemon.services["identityd"]
    service.config.write_text(config(service))
    daemon.start()


def check_shape(status: int, body: Any) -> None:
    """Every error answer is exactly `{"message": <str>}` (spec/api.md §5.3)."""
    if status >= 400:
        assert isinstance(body, dict) and set(body) == {"message"}, (status, body)
        assert isinstance(body["message"], str), body


def versioned(path: str) -> str:
    return (
        path
        if "api-version=" in path
        else f"{path}{'&' if '?' in path else '?'}api-version={VERSION}"
    )


def call(daemon: Daemon, uid: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to identityd as `uid` (0: this process, root), error shape checked."""
    if uid == 0:
        reply = daemon.request("identityd", method, versioned(path), body)
        status, answer = reply.status, (reply.json() if reply.body else {})
    else:
        socket = str(daemon.services["identityd"].socket)
        os.chmod(socket, 0o666)
        status, answer = as_uid(uid, socket, method, versioned(path), body)
    check_shape(status, answer)
    return status, answer


def root(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return call(daemon, 0, method, path, body)


def hub_client(cloud: Cloud) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(cloud.server_ca_pem_path))
    return httpx.Client(verify=context, base_url=f"https://{cloud.hub_hostname}")


def hub_token(cloud: Cloud, device_id: str, key: str) -> str:
    return mock_sas.make_token(f"{cloud.hub_hostname}/devices/{device_id}", key)


def hub_put_module(cloud: Cloud, device_id: str, key: str, module_id: str) -> str:
    """A module made in the hub behind identityd's back (as IoT Edge or a portal user would);
    its generation id."""
    with hub_client(cloud) as client:
        reply = client.put(
            f"/devices/{device_id}/modules/{module_id}",
            params={"api-version": "2017-11-08-preview"},
            headers={"Authorization": hub_token(cloud, device_id, key)},
            json={"moduleId": module_id, "deviceId": device_id},
        )
    assert reply.status_code == 200, reply.text
    return reply.json()["generationId"]


def hub_delete_module(cloud: Cloud, device_id: str, key: str, module_id: str) -> None:
    with hub_client(cloud) as client:
        reply = client.delete(
            f"/devices/{device_id}/modules/{module_id}",
            params={"api-version": "2017-11-08-preview"},
            headers={"Authorization": hub_token(cloud, device_id, key)},
        )
    assert reply.status_code == 204, reply.text


def generation(cloud: Cloud, device_id: str, module_id: str) -> str | None:
    module = cloud.hub.module(device_id, module_id)
    return None if module is None else module.generation_id


def hub_calls(cloud: Cloud, method: str, device_id: str, module_id: str) -> int:
    path = f"/devices/{device_id}/modules/{module_id}"
    return len([r for r in cloud.hub.requests if r.method == method and r.path == path])


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def backup_dir(daemon: Daemon, hub: str, device_id: str) -> Path:
    home = daemon.services["identityd"].home
    return home / "modules" / f"{sha(hub)}-{sha(device_id)}"


def backup_name(module_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", module_id) + "-" + sha(module_id)


# -- the authorization matrix (spec/api.md §2.3) ------------------------------------------------

MATRIX_PRINCIPALS = (
    principal(MOD_UID, "mod1", ["module"])
    + principal(DEV_UID, "devproc", ["device"])
    + principal(BOTH_UID, "both", ["module", "device"])
    + principal(EDGED_UID, "edged", None)
    + principal(EDGED2_UID, "edged2", None)  # a second daemon principal: ignored
    + principal(EMPTY_UID, "empty", [])  # a host process with no id type: nothing of its own
)

# Everything only root and the daemon principal may do; `{uid}` keeps denied creates apart.
MANAGING = [
    ("GET", "/identities/modules?type=aziot", None),
    ("POST", "/identities/modules", {"type": "aziot", "moduleId": "made-{uid}"}),
    ("PUT", "/identities/modules/mod1?type=aziot", {}),
    ("DELETE", "/identities/modules/mod1?type=aziot", None),
    ("POST", "/identities/device/reprovision", {"type": "aziot"}),
    # authorization comes before the `type` checks:
    ("GET", "/identities/modules?type=bad", None),
    ("GET", "/identities/modules", None),
    ("POST", "/identities/modules", {"type": "bad", "moduleId": "made-{uid}"}),
    ("PUT", "/identities/modules/mod1?type=bad", {}),
    ("DELETE", "/identities/modules/mod1", None),
]


def expect_denied(daemon: Daemon, uid: int, requests: list[tuple[str, str, Any]]) -> None:
    for method, path, body in requests:
        if isinstance(body, dict):
            body = {k: v.format(uid=uid) for k, v in body.items()}
        assert call(daemon, uid, method, path, body) == (401, AUTH_ERROR), (uid, method, path)


def expect_open(daemon: Daemon, uid: int, cloud: Cloud) -> None:
    """What everyone gets: the trust bundle and the provisioning info (no auth at all)."""
    assert call(daemon, uid, "GET", "/trust-bundle") == (200, {"certificate": ""})
    assert call(daemon, uid, "GET", "/identities/provisioning") == (
        200,
        {"source": "manual", "auth": "sas"},
    )


def test_authorization_matrix_as_real_uids(world_dir: Path, cloud: Cloud) -> None:
    daemon, _ = start_manual(world_dir, cloud, "authz-dev", MATRIX_PRINCIPALS)
    try:
        hub = cloud.hub_hostname
        # The second idtype-less principal is dropped with a warning.
        logs = daemon.logs()
        assert "edged2" in logs and "ignored" in logs, logs[-3000:]
        # Reconciliation made the module principals' identities, and only those.
        assert generation(cloud, "authz-dev", "mod1") and generation(cloud, "authz-dev", "both")
        assert cloud.hub.module("authz-dev", "devproc") is None

        # -- a host process with idtype ["module"]: its own module identity, nothing else
        status, own = call(daemon, MOD_UID, "GET", "/identities/identity")
        assert status == 200, own
        assert own["type"] == "aziot"
        assert own["spec"]["moduleId"] == "mod1" and own["spec"]["deviceId"] == "authz-dev"
        assert own["spec"]["hubName"] == hub == own["spec"]["gatewayHost"]
        assert own["spec"]["genId"] == generation(cloud, "authz-dev", "mod1")
        assert own["spec"]["auth"]["type"] == "sas" and own["spec"]["auth"]["keyHandle"]
        status, same = call(daemon, MOD_UID, "GET", "/identities/modules/mod1?type=aziot")
        assert status == 200 and same["spec"]["moduleId"] == "mod1", same
        assert same["spec"]["genId"] == own["spec"]["genId"]
        # its own module with a bad or missing type: now the type is checked (400)
        assert call(daemon, MOD_UID, "GET", "/identities/modules/mod1?type=bad") == (
            400,
            invalid_type("invalid type: bad"),
        )
        assert call(daemon, MOD_UID, "GET", "/identities/modules/mod1") == (
            400,
            invalid_type("missing parameter"),
        )
        expect_denied(
            daemon,
            MOD_UID,
            [
                ("GET", "/identities/modules/both?type=aziot", None),
                ("GET", "/identities/modules/devproc?type=aziot", None),
                ("GET", "/identities/modules/both?type=bad", None),  # 401 before 400
                ("GET", "/identities/modules/both", None),
                ("POST", "/identities/device", {"type": "aziot"}),
                *MANAGING,
            ],
        )
        expect_open(daemon, MOD_UID, cloud)

        # -- a host process with idtype ["device"]: the device identity, no module
        status, device = call(daemon, DEV_UID, "GET", "/identities/identity")
        assert status == 200, device
        assert device["spec"]["deviceId"] == "authz-dev" and "moduleId" not in device["spec"]
        assert "genId" not in device["spec"]
        assert device["spec"]["auth"]["type"] == "sas" and device["spec"]["auth"]["keyHandle"]
        status, posted = call(daemon, DEV_UID, "POST", "/identities/device", {"type": "aziot"})
        assert status == 200 and posted["spec"]["deviceId"] == "authz-dev", posted
        expect_denied(
            daemon,
            DEV_UID,
            [
                ("GET", "/identities/modules/devproc?type=aziot", None),  # no "module" idtype
                ("GET", "/identities/modules/mod1?type=aziot", None),
                ("GET", "/identities/modules/mod1?type=bad", None),
                *MANAGING,
            ],
        )
        expect_open(daemon, DEV_UID, cloud)

        # -- ["module", "device"]: /identities/identity prefers the device identity
        status, either = call(daemon, BOTH_UID, "GET", "/identities/identity")
        assert status == 200 and "moduleId" not in either["spec"], either
        assert either["spec"]["deviceId"] == "authz-dev"
        status, module = call(daemon, BOTH_UID, "GET", "/identities/modules/both?type=aziot")
        assert status == 200 and module["spec"]["moduleId"] == "both", module
        status, posted = call(daemon, BOTH_UID, "POST", "/identities/device", {"type": "aziot"})
        assert status == 200, posted
        expect_denied(
            daemon, BOTH_UID, [("GET", "/identities/modules/mod1?type=aziot", None), *MANAGING]
        )

        # -- unknown uids (nobody, and the ignored second daemon principal): 401 everywhere
        # except the trust bundle and the provisioning info
        for uid in (NOBODY, EDGED2_UID, EMPTY_UID):
            expect_denied(
                daemon,
                uid,
                [
                    ("GET", "/identities/identity", None),
                    ("POST", "/identities/device", {"type": "aziot"}),
                    ("GET", "/identities/modules/mod1?type=aziot", None),
                    ("GET", "/identities/modules/mod1?type=bad", None),
                    ("GET", "/identities/modules/mod1", None),
                    *MANAGING,
                ],
            )
            expect_open(daemon, uid, cloud)
        # The body is read and checked before anyone is authorized (spec/api.md §1.3): an
        # unknown caller's POST without a body is 400, with a bad body 422.
        assert call(daemon, NOBODY, "POST", "/identities/device") == (
            400,
            {"message": "missing request body"},
        )
        assert call(daemon, NOBODY, "POST", "/identities/device", {"kind": "x"})[0] == 422
        assert call(daemon, NOBODY, "POST", "/identities/modules", {"type": "aziot"})[0] == 422
        # nothing the denied callers asked for happened
        for uid in (MOD_UID, DEV_UID, BOTH_UID, NOBODY, EDGED2_UID, EMPTY_UID):
            assert cloud.hub.module("authz-dev", f"made-{uid}") is None
        assert cloud.hub.module("authz-dev", "mod1") is not None

        # -- the daemon principal (no idtype): everything
        status, device = call(daemon, EDGED_UID, "GET", "/identities/identity")
        assert status == 200 and "moduleId" not in device["spec"], device
        assert call(daemon, EDGED_UID, "POST", "/identities/device", {"type": "aziot"})[0] == 200
        for name in ("mod1", "both"):
            status, got = call(daemon, EDGED_UID, "GET", f"/identities/modules/{name}?type=aziot")
            assert status == 200 and got["spec"]["moduleId"] == name, got
        body = {"type": "aziot", "moduleId": "made-edged"}
        status, made = call(daemon, EDGED_UID, "POST", "/identities/modules", body)
        assert status == 200 and made["spec"]["moduleId"] == "made-edged", made
        status, listed = call(daemon, EDGED_UID, "GET", "/identities/modules?type=aziot")
        assert status == 200, listed
        names = sorted(i["spec"]["moduleId"] for i in listed["identities"])
        assert names == ["both", "made-edged", "mod1"]
        for item in listed["identities"]:  # AziotIdentity without "auth" (spec/api.md §5.1)
            module_id = item["spec"]["moduleId"]
            assert item == {
                "type": "aziot",
                "spec": {
                    "hubName": hub,
                    "gatewayHost": hub,
                    "deviceId": "authz-dev",
                    "moduleId": module_id,
                    "genId": generation(cloud, "authz-dev", module_id),
                },
            }
        status, updated = call(daemon, EDGED_UID, "PUT", "/identities/modules/mod1?type=aziot", {})
        assert status == 200 and updated["spec"]["moduleId"] == "mod1", updated
        assert call(daemon, EDGED_UID, "DELETE", "/identities/modules/made-edged?type=aziot") == (
            204,
            {},
        )
        assert cloud.hub.module("authz-dev", "made-edged") is None
        # the daemon's type errors, now that it is authorized
        assert call(daemon, EDGED_UID, "GET", "/identities/modules?type=bad") == (
            400,
            invalid_type("invalid type: bad"),
        )
        assert call(daemon, EDGED_UID, "DELETE", "/identities/modules/mod1") == (
            400,
            invalid_type("missing parameter"),
        )
        assert call(
            daemon, EDGED_UID, "POST", "/identities/device/reprovision", {"type": "aziot"}
        ) == (204, {})
        expect_open(daemon, EDGED_UID, cloud)

        # -- root without a principal: local root, everything
        status, device = root(daemon, "GET", "/identities/identity")
        assert status == 200 and "moduleId" not in device["spec"], device
        assert root(daemon, "GET", "/identities/modules?type=aziot")[0] == 200
        assert root(daemon, "POST", "/identities/device/reprovision", {"type": "aziot"}) == (
            204,
            {},
        )

        # -- a principal for uid 0 makes root a restricted host process
        reconfigure(
            daemon,
            manual_config(
                cloud, "authz-dev", MATRIX_PRINCIPALS + principal(0, "rootmod", ["module"])
            ),
        )
        status, own = root(daemon, "GET", "/identities/identity")
        assert status == 200 and own["spec"]["moduleId"] == "rootmod", own
        assert root(daemon, "GET", "/identities/modules/rootmod?type=aziot")[0] == 200
        expect_denied(
            daemon,
            0,
            [
                ("GET", "/identities/modules/mod1?type=aziot", None),
                ("POST", "/identities/device", {"type": "aziot"}),
                *MANAGING,
            ],
        )
        expect_open(daemon, 0, cloud)
        # the daemon principal still manages
        assert call(daemon, EDGED_UID, "GET", "/identities/modules?type=aziot")[0] == 200
    finally:
        daemon.stop()


# -- reconciliation (spec/provisioning.md §12.3) -----------------------------------------------

RECONCILED = principal(MOD_UID, "mod1", ["module"]) + principal(DEV_UID, "mod2", ["module"])


def test_reconciliation_rules(world_dir: Path, cloud: Cloud) -> None:
    device = "rec-dev"
    key = base64.b64encode(os.urandom(32)).decode()
    cloud.hub.add_device(device, primary_key=key)
    # In the hub before identityd ever ran: a module that will be a principal, and two that
    # identityd never managed.
    before = {m: hub_put_module(cloud, device, key, m) for m in ("mod1", "$edgeAgent", "other")}
    config = manual_config(cloud, device, RECONCILED, NO_RETRY)
    home = world_dir / "d" / "identityd" / "home"

    # A start with the hub unreachable: served offline, nothing written (§12.3 step 6).
    cloud.hub.misbehave("refuse")
    daemon = start(world_dir, cloud, config, key)
    try:
        assert not (home / "device_info").exists()
        assert not (home / "prev_state").exists()
        status, ident = root(daemon, "GET", "/identities/identity")
        assert status == 200 and ident["spec"]["deviceId"] == device, ident
        assert generation(cloud, device, "mod1") == before["mod1"]
        assert cloud.hub.module(device, "mod2") is None

        # The hub back: mod1 is a principal not in prev (there is none): deleted and made
        # again with a new generation id; mod2 made; the others left alone. (Stopped first,
        # so that no retry of the offline reconciliation runs in between.)
        daemon.stop()
        cloud.hub.behave()
        cloud.hub.clear_requests()
        daemon.start()
        assert hub_calls(cloud, "DELETE", device, "mod1") == 1
        first = {m: generation(cloud, device, m) for m in ("mod1", "mod2")}
        assert first["mod1"] and first["mod1"] != before["mod1"]
        assert first["mod2"]
        for untouched in ("$edgeAgent", "other"):
            assert generation(cloud, device, untouched) == before[untouched]
            assert hub_calls(cloud, "DELETE", device, untouched) == 0
            assert hub_calls(cloud, "PUT", device, untouched) == 0
        info = (home / "device_info").read_text()
        assert f'device_id = "{device}"' in info and cloud.hub_hostname in info
        prev = (home / "prev_state").read_text()
        assert '"mod1"' in prev and '"mod2"' in prev
        status, got = root(daemon, "GET", "/identities/modules/mod1?type=aziot")
        assert status == 200 and got["spec"]["genId"] == first["mod1"], got

        # Same principals, same device: in prev and current, kept without a call.
        cloud.hub.clear_requests()
        daemon.restart()
        for name in ("mod1", "mod2"):
            assert generation(cloud, device, name) == first[name]
            assert hub_calls(cloud, "DELETE", device, name) == 0
            assert hub_calls(cloud, "PUT", device, name) == 0

        # A principal added while the hub is down: prev_state is not rewritten.
        prev_before = (home / "prev_state").read_text()
        cloud.hub.misbehave("refuse")
        reconfigure(
            daemon,
            manual_config(
                cloud, device, RECONCILED + principal(4250, "mod3", ["module"]), NO_RETRY
            ),
        )
        assert (home / "prev_state").read_text() == prev_before
        daemon.stop()
        cloud.hub.behave()
        daemon.start()
        assert generation(cloud, device, "mod3") is not None
        assert '"mod3"' in (home / "prev_state").read_text()

        # mod2 no longer a principal, but in prev: deleted (and its backup with it).
        cloud.hub.clear_requests()
        reconfigure(
            daemon, manual_config(cloud, device, principal(MOD_UID, "mod1", ["module"]), NO_RETRY)
        )
        assert cloud.hub.module(device, "mod2") is None
        assert cloud.hub.module(device, "mod3") is None
        assert generation(cloud, device, "mod1") == first["mod1"]
        for untouched in ("$edgeAgent", "other"):
            assert generation(cloud, device, untouched) == before[untouched]
        prev = (home / "prev_state").read_text()
        assert '"mod2"' not in prev and '"mod1"' in prev
        status, body = root(daemon, "GET", "/identities/modules/mod2?type=aziot")
        assert status == 404 and body["message"].startswith(HUB_ERROR), body
        # A module identityd did not make stays unmanaged after a restart too.
        status, edge = root(daemon, "GET", "/identities/modules/$edgeAgent?type=aziot")
        assert status == 200 and edge["spec"]["genId"] == before["$edgeAgent"], edge

        # prev counts only for the device of device_info: another device there makes prev
        # empty, so mod1 is deleted and made again.
        daemon.stop()
        (home / "device_info").write_text(
            f'hub_name = "{cloud.hub_hostname}"\nlocal_gateway_hostname = "{cloud.hub_hostname}"\n'
            'device_id = "someone-else"\n'
        )
        daemon.start()
        assert generation(cloud, device, "mod1") not in (None, first["mod1"])
        assert f'device_id = "{device}"' in (home / "device_info").read_text()
        assert generation(cloud, device, "$edgeAgent") == before["$edgeAgent"]
    finally:
        if daemon.process is not None:
            daemon.stop()


# -- module reads (spec/provisioning.md §12.5) ---------------------------------------------------


def module_gen(daemon: Daemon, uid: int, name: str) -> str:
    status, body = call(daemon, uid, "GET", f"/identities/modules/{name}?type=aziot")
    assert status == 200, (name, body)
    assert body["spec"]["auth"]["type"] == "sas" and body["spec"]["auth"]["keyHandle"]
    return body["spec"]["genId"]


def listed(daemon: Daemon) -> list[str]:
    status, body = root(daemon, "GET", "/identities/modules?type=aziot")
    assert status == 200, body
    assert all("auth" not in i["spec"] for i in body["identities"])
    return sorted(i["spec"]["moduleId"] for i in body["identities"])


# (method, path, body, rawhttp options, status): the framework's and the routes' own errors.
GENERIC_ERRORS: list[tuple[str, str, Any, dict[str, Any], int]] = [
    ("GET", "/identities/identity?api-version=", None, {}, 400),
    ("GET", "/identities/identity?api-version=2019-01-01", None, {}, 400),
    ("GET", "/identities/nothing", None, {}, 404),
    ("GET", "/identities/identity/", None, {}, 404),
    ("GET", "/identities/provisioning?api-version=2020-09-01", None, {}, 404),
    ("PATCH", "/identities/identity", None, {}, 400),
    ("DELETE", "/identities/identity", None, {}, 400),
    ("POST", "/identities/device", None, {}, 400),
    ("POST", "/identities/device", {"kind": "aziot"}, {}, 422),
    ("POST", "/identities/modules", {"type": "aziot"}, {}, 422),
    ("POST", "/identities/modules", {"type": "bad", "moduleId": "x"}, {}, 400),
    ("POST", "/identities/modules", {"type": "aziot", "moduleId": ""}, {}, 400),
    ("PUT", "/identities/modules/mod1?type=aziot", None, {}, 422),
    ("POST", "/identities/device/reprovision", None, {"raw_body": b"{not json"}, 422),
    (
        "PUT",
        "/identities/modules/mod1?type=aziot",
        None,
        {"raw_body": b"{}", "content_type": "text/plain"},
        415,
    ),
]


def test_module_reads_hub_first_then_backups(world_dir: Path, cloud: Cloud) -> None:
    device = "read-dev"
    # No transport retry (each costs 3 s): the hub is refused on purpose below.
    daemon, key = start_manual(
        world_dir, cloud, device, principal(MOD_UID, "mod1", ["module"]), NO_RETRY
    )
    try:
        # Reconciliation made mod1 and its backup; identityd has not read it from the hub yet.
        first = generation(cloud, device, "mod1")
        backups = backup_dir(daemon, cloud.hub_hostname, device)
        assert first in (backups / backup_name("mod1")).read_text()

        # The hub is asked first: a module remade behind identityd's back is seen, not its
        # backup, and the backup is refreshed. (Only the first read after the remake is
        # checked: whether every later read asks the hub again is left out, see the report.)
        hub_delete_module(cloud, device, key, "mod1")
        second = hub_put_module(cloud, device, key, "mod1")
        cloud.hub.clear_requests()
        assert module_gen(daemon, 0, "mod1") == second != first
        assert hub_calls(cloud, "GET", device, "mod1") == 1
        assert second in (backups / backup_name("mod1")).read_text()

        # The hub unreachable, or failing: the backup answers; a module with no backup is the
        # hub's error (404 Hub client error); the list comes from the backups.
        for mode in ("refuse", "error", "unauthorized"):
            cloud.hub.misbehave(mode)
            assert module_gen(daemon, 0, "mod1") == second, mode
            assert module_gen(daemon, MOD_UID, "mod1") == second, mode
            status, own = call(daemon, MOD_UID, "GET", "/identities/identity")
            assert status == 200 and own["spec"]["genId"] == second, (mode, own)
            status, body = root(daemon, "GET", "/identities/modules/ghost?type=aziot")
            assert status == 404 and body["message"].startswith(HUB_ERROR), (mode, body)
            assert listed(daemon) == ["mod1"], mode
            cloud.hub.behave()

        # Unknown everywhere, the hub answering: 404 Hub client error too.
        status, body = root(daemon, "GET", "/identities/modules/ghost?type=aziot")
        assert status == 404 and body["message"].startswith(HUB_ERROR), body
        status, body = root(daemon, "PUT", "/identities/modules/ghost?type=aziot", {})
        assert status == 404 and body["message"].startswith(HUB_ERROR), body
        status, body = root(daemon, "DELETE", "/identities/modules/ghost?type=aziot")
        assert status == 404 and body["message"].startswith(HUB_ERROR), body

        # Every other error of the API has the same shape (spec/api.md §1.3, §5.3, §7).
        for method, path, body, options, status in GENERIC_ERRORS:
            reply = daemon.request("identityd", method, path, body, **options)
            assert reply.status == status, (method, path, reply.body)
            check_shape(reply.status, reply.json())
        assert call(daemon, MOD_UID, "GET", "/identities/modules/mod1?type=local") == (
            400,
            {
                "message": 'parameter "moduleId" has an invalid value\n'
                "caused by: local identity for mod1 doesn't exist"
            },
        )

        # A module made directly in the hub: listed from the hub while it answers.
        hub_put_module(cloud, device, key, "other")
        assert listed(daemon) == ["mod1", "other"]

        # prefer_module_identity_cache: the backup first, the hub only for what it lacks.
        reconfigure(
            daemon,
            manual_config(
                cloud,
                device,
                principal(MOD_UID, "mod1", ["module"]),
                NO_RETRY + "\nprefer_module_identity_cache = true",
            ),
        )
        assert generation(cloud, device, "mod1") == second  # kept by reconciliation
        hub_delete_module(cloud, device, key, "mod1")
        third = hub_put_module(cloud, device, key, "mod1")
        cloud.hub.clear_requests()
        assert module_gen(daemon, 0, "mod1") == second
        assert module_gen(daemon, MOD_UID, "mod1") == second
        assert hub_calls(cloud, "GET", device, "mod1") == 0
        assert third != second
        # The backups, not the hub's list: "other" has one since it was listed from the hub
        # (the original backs up every module it lists), so the hub is not asked for it.
        assert listed(daemon) == ["mod1", "other"]
        other = module_gen(daemon, 0, "other")
        assert other == generation(cloud, device, "other")
        assert hub_calls(cloud, "GET", device, "other") == 0
    finally:
        daemon.stop()


# -- reprovisioning (spec/api.md §5.2, spec/provisioning.md §12.2) -------------------------------


def registrations(cloud: Cloud) -> int:
    return len([r for r in cloud.dps.requests if r.method == "PUT"])


def test_reprovision_success_failure_and_recovery(world_dir: Path, cloud: Cloud) -> None:
    device = "rp-dev"
    enrollment = cloud.dps.add_symmetric_enrollment(device)
    daemon = start(
        world_dir,
        cloud,
        dps_config_with(cloud, device, principal(MOD_UID, "mod1", ["module"]), NO_RETRY),
        enrollment.primary_key,
    )
    home = daemon.services["identityd"].home
    try:
        assert registrations(cloud) == 1
        first = module_gen(daemon, 0, "mod1")
        status, made = root(
            daemon, "POST", "/identities/modules", {"type": "aziot", "moduleId": "made"}
        )
        assert status == 200, made
        backups = backup_dir(daemon, cloud.hub_hostname, device)
        assert sorted(p.name for p in backups.iterdir()) == sorted(
            [backup_name("mod1"), backup_name("made")]
        )

        # Reprovision: DPS again, the backups cleared, and (prev being empty once device_info is
        # gone) the module principals made anew; "made" is not identityd's and stays in the hub.
        assert root(daemon, "POST", "/identities/device/reprovision", {"type": "aziot"}) == (
            204,
            {},
        )
        assert registrations(cloud) == 2
        second = generation(cloud, device, "mod1")
        assert second not in (None, first)
        assert module_gen(daemon, 0, "mod1") == second
        assert cloud.hub.module(device, "made") is not None
        assert sorted(p.name for p in backups.iterdir()) == [backup_name("mod1")]
        assert f'device_id = "{device}"' in (home / "device_info").read_text()
        # "made" lost its backup: with the hub down it is not found.
        cloud.hub.misbehave("refuse")
        status, body = root(daemon, "GET", "/identities/modules/made?type=aziot")
        assert status == 404 and body["message"].startswith(HUB_ERROR), body
        cloud.hub.behave()

        # DPS answers but the hub is down: the reconciliation's error is the answer (404 Hub
        # client error), and the registration is not written to device_info (§12.3 step 6);
        # unlike the original, the previous device_info is kept (lessons.md row 7).
        info_before = (home / "device_info").read_text()
        cloud.hub.misbehave("refuse")
        status, body = root(daemon, "POST", "/identities/device/reprovision", {"type": "aziot"})
        assert status == 404 and body["message"].startswith(HUB_ERROR), body
        assert registrations(cloud) == 3
        assert (home / "device_info").read_text() == info_before
        cloud.hub.behave()

        # DPS refuses the device: 404 DPS client error, as the original; unlike it, the device
        # DPS last gave stays served and device_info stays on disk.
        cloud.dps.misbehave("unauthorized")
        status, body = root(daemon, "POST", "/identities/device/reprovision", {"type": "aziot"})
        assert status == 404 and body["message"].startswith(DPS_ERROR), body
        cloud.dps.behave()
        assert (home / "device_info").read_text() == info_before
        status, ident = root(daemon, "GET", "/identities/identity")
        assert status == 200 and ident["spec"]["deviceId"] == device, ident

        # A disabled enrollment: the same.
        cloud.dps.set_enabled(device, False)
        status, body = root(daemon, "POST", "/identities/device/reprovision", {"type": "aziot"})
        assert status == 404 and body["message"].startswith(DPS_ERROR), body
        status, ident = root(daemon, "GET", "/identities/identity")
        assert status == 200 and ident["spec"]["deviceId"] == device, ident

        # Until a reprovision succeeds.
        cloud.dps.set_enabled(device, True)
        assert root(daemon, "POST", "/identities/device/reprovision", {"type": "aziot"}) == (
            204,
            {},
        )
        status, ident = root(daemon, "GET", "/identities/identity")
        assert status == 200 and ident["spec"]["deviceId"] == device, ident
        third = module_gen(daemon, MOD_UID, "mod1")
        assert third == generation(cloud, device, "mod1") and third != second
        assert (home / "device_info").is_file()

        # At start the backup is used (no DPS call); if the hub then refuses the device (not a
        # network error), identityd registers with DPS again and reconciles (§12.1 step 4).
        daemon.stop()
        before = registrations(cloud)
        cloud.hub.misbehave("unauthorized", count=1)
        daemon.start()
        assert registrations(cloud) == before + 1
        status, ident = root(daemon, "GET", "/identities/identity")
        assert status == 200 and ident["spec"]["deviceId"] == device, ident
        assert module_gen(daemon, MOD_UID, "mod1") == generation(cloud, device, "mod1")
        daemon.stop()
        cloud.hub.clear_requests()
        daemon.start()  # and the backup again, with nothing to reconcile
        assert registrations(cloud) == before + 1
        assert [r.method for r in cloud.hub.requests] == ["GET"]
    finally:
        if daemon.process is not None:
            daemon.stop()
