"""identityd's cloud calls through an HTTPS proxy (spec/lessons.md row 13; iotedge PR #3716: X.509
DPS through a proxy once lost its TLS client identity).

A real aziotd runs with `HTTPS_PROXY` naming `ConnectProxy`. The cloud is reachable only through
the proxy: DPS is configured at a loopback port nothing listens on and the hub DPS assigns has a
name nothing resolves; the proxy alone routes both to mockcloud. So every request mockcloud saw
came through a CONNECT tunnel, and what it saw of the client (its certificate, its SAS token)
crossed the tunnel intact.

The original takes the proxy from `HTTPS_PROXY`, else `https_proxy`, sends every call through it
and has no `NO_PROXY` (http-common's `get_proxy_uri` and `Intercept::All`); so do we.
"""

from __future__ import annotations

import base64
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aziot.actors.identity.cloud import CloudError, proxy_from_env
from aziot.actors.proxy import PROXY_VARIABLES
from mockcloud.cloud import Cloud
from tests.connect_proxy import ConnectProxy
from tests.daemon import Daemon, ServiceDir, keyd_config
from tests.test_identityd import MODULE_PRINCIPAL, get, local_ca_issuing, write_device_key

HUB_HOST = "hub.proxied.test"  # .test names never resolve (RFC 6761): only the proxy knows it


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: a direct connection to it is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture
def cloud(world_dir: Path) -> Iterator[Cloud]:
    with Cloud(world_dir / "cloud", hub_hosts=(HUB_HOST,)) as cloud:
        yield cloud


@pytest.fixture
def proxy(cloud: Cloud, closed_port: int) -> Iterator[ConnectProxy]:
    routes = {
        f"127.0.0.1:{closed_port}": ("127.0.0.1", cloud.dps.port),
        cloud.hub_hostname: ("127.0.0.1", cloud.hub.port),
    }
    with ConnectProxy(routes) as proxy:
        yield proxy


def identityd_config(cloud: Cloud, closed_port: int, attestation: str) -> object:
    def config(service: ServiceDir) -> str:
        return f"""hostname = "proxied"
homedir = "{service.home}"
[provisioning]
source = "dps"
global_endpoint = "https://127.0.0.1:{closed_port}"
scope_id = "{cloud.id_scope}"
[provisioning.attestation]
{attestation}
{MODULE_PRINCIPAL}"""

    return config


def proxied_env(cloud: Cloud, **variables: str) -> dict[str, str]:
    env = dict.fromkeys(PROXY_VARIABLES + ("NO_PROXY", "no_proxy"), "")
    env["SSL_CERT_FILE"] = str(cloud.server_ca_pem_path)
    env.update(variables)
    return env


def assert_all_tunnelled(proxy: ConnectProxy, cloud: Cloud, closed_port: int) -> None:
    targets = {
        f"CONNECT 127.0.0.1:{closed_port} HTTP/1.1",
        f"CONNECT {cloud.hub_hostname} HTTP/1.1",
    }
    assert set(proxy.seen) == targets, proxy.seen
    assert cloud.dps.requests and cloud.hub.requests


def header_value(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def start_sas_device(
    world_dir: Path, cloud: Cloud, closed_port: int, env: dict[str, str], wait: bool = True
) -> Daemon:
    enrollment = cloud.dps.add_symmetric_enrollment("sas-dev")
    key_file = write_device_key(world_dir / "secrets", enrollment.primary_key)

    def keyd(service: ServiceDir) -> str:
        return keyd_config(service) + f'[preloaded_keys]\ndevice-key = "file://{key_file}"\n'

    attestation = """method = "symmetric_key"
registration_id = "sas-dev"
symmetric_key = "device-key"
"""
    identityd = identityd_config(cloud, closed_port, attestation)
    services = {"keyd": keyd, "identityd": identityd}
    return Daemon(world_dir / "d", services, env=env).start(wait=wait)


def test_dps_x509_and_the_hub_through_the_proxy_keep_the_client_cert(
    world_dir: Path, cloud: Cloud, proxy: ConnectProxy, closed_port: int
) -> None:
    ca_cert, keyd, certd = local_ca_issuing(world_dir)
    cloud.dps.add_x509_group("proxied-group", ca_cert)

    attestation = """method = "x509"
identity_cert = "device-id"
identity_pk = "device-id"
registration_id = "x509-proxied"
"""
    services = {
        "keyd": keyd,
        "certd": certd,
        "identityd": identityd_config(cloud, closed_port, attestation),
    }
    env = proxied_env(cloud, HTTPS_PROXY=proxy.url)
    daemon = Daemon(world_dir / "d", services, env=env).start()
    try:
        reply = get(daemon, "/identities/identity")
        assert reply.status == 200, reply.body
        spec = reply.json()["spec"]
        assert spec["deviceId"] == "x509-proxied" and spec["hubName"] == cloud.hub_hostname
        assert spec["auth"]["type"] == "x509"
        # The module the principal asks for was made in the hub, over the tunnel.
        assert cloud.hub.module("x509-proxied", "mod1") is not None
        made = daemon.request(
            "identityd", "POST", "/identities/modules", {"type": "aziot", "moduleId": "extra"}
        )
        assert made.status == 200, made.body
        assert cloud.hub.module("x509-proxied", "extra") is not None
        # Each DPS and hub request carried the device's certificate through the tunnel.
        for seen in cloud.requests:
            assert seen.client_cert_subject == "CN=x509-proxied", seen
            assert seen.auth == "x509" and "authorization" not in seen.headers, seen
        assert_all_tunnelled(proxy, cloud, closed_port)
    finally:
        daemon.stop()


def test_dps_symmetric_key_and_module_calls_through_the_proxy(
    world_dir: Path, cloud: Cloud, proxy: ConnectProxy, closed_port: int
) -> None:
    # Credentials in the proxy URL become Basic proxy authorization, percent-decoded.
    port = proxy.url.rpartition(":")[2]
    env = proxied_env(cloud, https_proxy=f"http://op%40site:s%3Acret@127.0.0.1:{port}")
    daemon = start_sas_device(world_dir, cloud, closed_port, env)
    try:
        reply = get(daemon, "/identities/identity")
        assert reply.status == 200, reply.body
        assert reply.json()["spec"]["deviceId"] == "sas-dev"
        assert cloud.hub.module("sas-dev", "mod1") is not None
        body = {"type": "aziot", "moduleId": "made"}
        made = daemon.request("identityd", "POST", "/identities/modules", body)
        assert made.status == 200, made.body
        assert made.json()["spec"]["auth"]["type"] == "sas"
        listed = get(daemon, "/identities/modules?type=aziot").json()["identities"]
        assert sorted(i["spec"]["moduleId"] for i in listed) == ["made", "mod1"]
        deleted = daemon.request("identityd", "DELETE", "/identities/modules/made?type=aziot")
        assert deleted.status == 204, deleted.body
        assert cloud.hub.module("sas-dev", "made") is None
        for seen in cloud.requests:
            assert seen.auth == "sas" and seen.client_cert_subject is None, seen
        assert_all_tunnelled(proxy, cloud, closed_port)
        expected = "Basic " + base64.b64encode(b"op@site:s:cret").decode()
        assert proxy.heads and all(
            header_value(head, "proxy-authorization") == expected for head in proxy.heads
        ), proxy.heads
        # The password never reaches the log.
        assert "s%3Acret" not in daemon.logs() and "s:cret" not in daemon.logs()
    finally:
        daemon.stop()


def test_no_proxy_is_not_honoured_as_in_the_original(
    world_dir: Path, cloud: Cloud, proxy: ConnectProxy, closed_port: int
) -> None:
    env = proxied_env(cloud, HTTPS_PROXY=proxy.url, NO_PROXY="*", no_proxy="*")
    daemon = start_sas_device(world_dir, cloud, closed_port, env)
    try:
        reply = get(daemon, "/identities/identity")
        assert reply.status == 200, reply.body
        assert cloud.hub.module("sas-dev", "mod1") is not None
        assert_all_tunnelled(proxy, cloud, closed_port)
    finally:
        daemon.stop()


# -- which proxy, from which variable ---------------------------------------------------------


def test_https_proxy_comes_before_https_proxy_in_lower_case() -> None:
    both = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://lower:3128"}
    assert proxy_from_env(both) == "http://upper:3128"
    assert proxy_from_env({"https_proxy": "http://lower:3128"}) == "http://lower:3128"
    # Only HTTPS_PROXY counts: the cloud is HTTPS, and there is no NO_PROXY.
    others = {"HTTP_PROXY": "http://a:1", "ALL_PROXY": "http://b:2", "NO_PROXY": "*"}
    assert proxy_from_env(others) is None
    # Empty is unset (the original would refuse to start on an empty value).
    assert proxy_from_env({"HTTPS_PROXY": "", "https_proxy": "http://lower:3128"}) == (
        "http://lower:3128"
    )


@pytest.mark.parametrize(
    "value", ["proxy.example:3128", "ftp://proxy.example", "http://", "http://h:x"]
)
def test_a_proxy_url_that_cannot_be_used_is_named_with_its_variable(value: str) -> None:
    with pytest.raises(CloudError) as raised:
        proxy_from_env({"HTTPS_PROXY": value})
    assert "HTTPS_PROXY" in raised.value.message and repr(value) in raised.value.message


def test_a_proxy_password_is_masked_where_the_url_is_shown() -> None:
    with pytest.raises(CloudError) as raised:
        proxy_from_env({"https_proxy": "gopher://me:secret@proxy:1"})
    assert "secret" not in raised.value.message
    assert "'gopher://me:******@proxy:1'" in raised.value.message
    assert "https_proxy" in raised.value.message


def test_a_proxy_that_cannot_be_reached_is_named_in_the_log(
    world_dir: Path, cloud: Cloud, closed_port: int
) -> None:
    """identityd serves only once provisioned; until then the log says why, naming the proxy
    (password masked) and not only the DPS address it could not reach."""
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        proxy_url = f"http://op:hidden@127.0.0.1:{dead.getsockname()[1]}"
        env = proxied_env(cloud, HTTPS_PROXY=proxy_url)
        daemon = start_sas_device(world_dir, cloud, closed_port, env, wait=False)
        try:
            masked = proxy_url.replace("hidden", "******")
            failed = (
                f"provisioning failed (DPS client: cannot connect to https://127.0.0.1:"
                f"{closed_port}/"
            )
            deadline = time.monotonic() + 20
            while failed not in (logs := daemon.logs()):
                assert time.monotonic() < deadline, logs
                time.sleep(0.1)
            line = logs[logs.index(failed) :].splitlines()[0]
            assert f"through the proxy {masked}: " in line, line
            assert "hidden" not in logs
            assert not cloud.requests
            # SIGTERM stops it although identityd never became ready to serve
            assert daemon.stop(timeout=10) == 0
        finally:
            if daemon.process is not None:
                daemon.stop(signal.SIGKILL)
