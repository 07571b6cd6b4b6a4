"""DPS TPM attestation end to end (spec/provisioning.md §8.4): identityd sends the TPM's EK
and SRK (read through tpmd from a real swtpm), DPS answers with an auth key blob only that TPM
can import (made by mockcloud with MakeCredential and a duplicate for the SRK), tpmd imports it,
and every SAS token after that, to DPS and to the hub, is signed inside the TPM."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

import pytest

from mockcloud import sas as mock_sas
from mockcloud.cloud import Cloud
from mockcloud.tpm_blob import tpm_blob
from tests.daemon import Daemon, ServiceDir, keyd_config
from tests.swtpm import Swtpm, swtpm_available
from tests.test_identityd import MODULE_PRINCIPAL, get, telemetry, token_from_keyd

pytestmark = pytest.mark.skipif(not swtpm_available(), reason="swtpm is not installed")

EK_HANDLE = 0x81010001


def test_dps_tpm_attestation_and_tokens_signed_in_the_tpm(world_dir: Path) -> None:
    with Swtpm(world_dir / "tpm") as tpm, Cloud(world_dir / "cloud", tpm_blob=tpm_blob) as cloud:
        # The EK as tpm2-tools makes it (the TCG default template), persisted where tpmd
        # looks: what the operator enrolls in DPS.
        ek_pub = tpm.directory / "ek.pub"
        tpm.tools(
            "tpm2_createek", "-c", hex(EK_HANDLE), "-G", "rsa", "-u", str(ek_pub), "-f", "tss"
        )
        cloud.dps.add_tpm_enrollment("tpm-dev", ek_pub.read_bytes())

        def identityd(service: ServiceDir) -> str:
            return f"""hostname = "tpm-dev"
homedir = "{service.home}"
[provisioning]
source = "dps"
global_endpoint = "{cloud.dps_url}"
scope_id = "{cloud.id_scope}"
[provisioning.attestation]
method = "tpm"
registration_id = "tpm-dev"
{MODULE_PRINCIPAL}"""

        services = {
            "keyd": keyd_config,
            "tpmd": f'tcti = "{tpm.tcti}"\n',
            "identityd": identityd,
        }
        env = {"SSL_CERT_FILE": str(cloud.server_ca_pem_path), "NO_PROXY": "*"}
        daemon = Daemon(world_dir / "d", services, env=env).start(wait=False)
        try:
            daemon.wait_ready(timeout=60)
            reply = get(daemon, "/identities/identity")
            assert reply.status == 200, reply.body
            spec = reply.json()["spec"]
            assert spec["deviceId"] == "tpm-dev" and spec["auth"] == {"type": "tpm"}
            # DPS: a challenge without Authorization, then SAS signed by the TPM.
            registers = [r for r in cloud.dps.requests if r.method == "PUT"]
            assert registers[0].auth == "tpm-challenge"
            assert "authorization" not in registers[0].headers
            assert registers[-1].auth == "sas"
            # The TPM signs with the key DPS delivered: tpmd's digest equals an HMAC computed
            # here with the key mockcloud put in the blob.
            key = cloud.dps.tpm_auth_key("tpm-dev")
            data = b"hello tpm"
            reply = daemon.request(
                "tpmd", "POST", "/sign_with_auth_key", {"data": base64.b64encode(data).decode()}
            )
            digest = base64.b64decode(reply.json()["digest"])
            assert digest == hmac.new(key, data, hashlib.sha256).digest()
            # The hub took the TPM-signed device tokens: the module principal exists, and its
            # keyd-derived handle signs tokens the hub accepts too.
            assert cloud.hub.module("tpm-dev", "mod1") is not None
            module = get(daemon, "/identities/modules/mod1?type=aziot").json()["spec"]
            audience = f"{spec['hubName']}/devices/tpm-dev/modules/mod1"
            token = token_from_keyd(daemon, audience, module["auth"]["keyHandle"])
            assert telemetry(cloud, "/devices/tpm-dev/modules/mod1/messages/events", token) == 204
            # A device token signed through tpmd is accepted by the hub.
            sr = mock_sas.encode_resource(f"{spec['hubName']}/devices/tpm-dev")
            se = str(int(time.time()) + 60)
            to_sign = base64.b64encode(f"{sr}\n{se}".encode()).decode()
            signed = daemon.request("tpmd", "POST", "/sign_with_auth_key", {"data": to_sign})
            sig = signed.json()["digest"]
            device_token = (
                f"SharedAccessSignature sr={sr}&sig={mock_sas.form_urlencode(sig)}&se={se}"
            )
            assert telemetry(cloud, "/devices/tpm-dev/messages/events", device_token) == 204
            assert get(daemon, "/identities/provisioning").json()["auth"] == "tpm"
        finally:
            daemon.stop()
