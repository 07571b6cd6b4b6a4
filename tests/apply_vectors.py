"""Our golden vectors for `aziotctl config apply`: one per shape of super-config that
spec/provisioning.md §3.2 maps, each a super-config, the four tables the services must read and
the device key's bytes when apply writes one.

Every value here (hub, ids, scope, URLs, paths, PKCS#11 URIs, subjects, keys, uids, hostname)
was made up for this project; the expected tables were worked out by hand from §2–§3 of the spec.
Each vector's comment names the rule it pins.
"""

from __future__ import annotations

from typing import Any

import attrs

IS_UID = 4711
CS_UID = 4712
HOSTNAME = "orchard-edge-12"

HUB = "orchard-hub.azure-devices.net"
DPS_ENDPOINT = "https://provisioning.orchard.example/"
SCOPE = "0ne00FACADE"
SLOT = "slot-id=3"
PIN = "pin-value=8642"
PKCS11_LIB = "/opt/orchard/lib/libsofthsm2.so"
PKCS11_BASE_SLOT = f"pkcs11:{SLOT}?{PIN}"
MASTER = "aziot_identityd_master_id"
SECRET_KEY_FILE = "file:///var/secrets/aziot/keyd/device-id"

# Random keys made for these vectors. 32 bytes encode to base64 with one "=", 64 with two.
PRESS_KEY = bytes.fromhex("24c8ff6a27d4ed7711d30bed09c19beb93432df39f0eb6940e6e7da65c0b41fa")
PRESS_KEY_B64 = "JMj/aifU7XcR0wvtCcGb65NDLfOfDraUDm59plwLQfo="
SAS_KEY = bytes.fromhex("afe00dfe5990d9c93adfe37ca1e5c682f7a0ae2404d433b477cf1899e1c74989")
SAS_KEY_B64 = "r+AN/lmQ2ck63+N8oeXGgvegriQE1DO0d88YmeHHSYk="
SAS_KEY_2 = bytes.fromhex("05c1206b1538053638646f8c5b01bd3664344633175dcd396924f113610d225c")
SAS_KEY_2_B64_NO_PAD = "BcEgaxU4BTY4ZG+MWwG9NmQ0RjMXXc05aSTxE2ENIlw"
CHILD_KEY = bytes.fromhex("ad4465073708a144eeb933fb1cf1c4e86e9a17f4672ce3e7272647de9d6ff92e")
CHILD_KEY_B64 = "rURlBzcIoUTuuTP7HPHE6G6aF/RnLOPnJyZH3p1v+S4="
BUSY_KEY = bytes.fromhex("cf00b5c433da8fa48c556231627e2f2863520523704fb267a692e6a24419c710")
BUSY_KEY_B64 = "zwC1xDPaj6SMVWIxYn4vKGNSBSNwT7JnppLmokQZxxA="
DPS_KEY = bytes.fromhex(
    "0844dfc255ecea39aaf41bf55ab614c60d2378eb123b9ee33254e72893ca514e"
    "ae43bf1a8a2a01f15b2e4a1768ce4c411ae3304026a649d4727c5be3b76209a5"
)
DPS_KEY_B64 = (
    "CETfwlXs6jmq9Bv1WrYUxg0jeOsSO57jMlTnKJPKUU6uQ78aiioB8VsuShdozkxBGuMwQCamSdRyfFvjt2IJpQ=="
)
DPS_KEY_2 = bytes.fromhex(
    "9c4d333b953481d966e5527624502d5e51ab71f951105fb2ecd36172d953bff7"
    "a3b6fd3a020ba94335b5c82f3b39056b2099413f3d210501a3e8a1175b795d29"
)
DPS_KEY_2_B64_NO_PAD = (
    "nE0zO5U0gdlm5VJ2JFAtXlGrcflREF+y7NNhctlTv/ejtv06AgupQzW1yC87OQVrIJlBPz0hBQGj6KEXW3ldKQ"
)


@attrs.frozen
class Vector:
    name: str
    config: str
    keyd: dict[str, Any]
    certd: dict[str, Any]
    identityd: dict[str, Any]
    tpmd: dict[str, Any] = attrs.field(factory=dict)
    device_id_key: bytes | None = None

    def expected(self, service: str) -> dict[str, Any]:
        """The table `service` must read."""
        return {
            "keyd": self.keyd,
            "certd": self.certd,
            "identityd": self.identityd,
            "tpmd": self.tpmd,
        }[service]


# --------------------------------------------------------------------------------------------
# The parts every vector shares, so each one below shows only what its rule changes


def identityd(provisioning: dict[str, Any], **top: Any) -> dict[str, Any]:
    table = {
        "hostname": HOSTNAME,
        "homedir": "/var/lib/aziot/identityd",
        "prefer_module_identity_cache": False,
    }
    table.update(top)
    table["provisioning"] = provisioning
    return table


def keyd(
    preloaded: dict[str, str],
    is_keys: list[str],
    cs_keys: list[str] | None = None,
    aziot_keys: dict[str, str] | None = None,
    **top: Any,
) -> dict[str, Any]:
    principal: list[dict[str, Any]] = [{"uid": IS_UID, "keys": [MASTER, *is_keys]}]
    if cs_keys:
        principal.append({"uid": CS_UID, "keys": cs_keys})
    return {
        **top,
        "aziot_keys": {**(aziot_keys or {}), "homedir_path": "/var/lib/aziot/keyd"},
        "preloaded_keys": preloaded,
        "principal": principal,
    }


def certd(
    issuance: dict[str, Any] | None = None,
    preloaded: dict[str, Any] | None = None,
    is_certs: list[str] | None = None,
    **top: Any,
) -> dict[str, Any]:
    table: dict[str, Any] = {
        "homedir_path": "/var/lib/aziot/certd",
        **top,
        "cert_issuance": issuance or {},
        "preloaded_certs": preloaded or {},
    }
    if is_certs:
        table["principal"] = [{"uid": IS_UID, "certs": is_certs}]
    return table


def manual(device_id: str, authentication: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": "manual",
        "iothub_hostname": HUB,
        "device_id": device_id,
        "authentication": authentication,
    }


def dps(attestation: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": "dps",
        "global_endpoint": DPS_ENDPOINT,
        "scope_id": SCOPE,
        "attestation": attestation,
    }


SAS = {"method": "sas", "device_id_pk": "device-id"}
X509 = {"method": "x509", "identity_cert": "device-id", "identity_pk": "device-id"}
PKCS11_KEYS = {"pkcs11_lib_path": PKCS11_LIB, "pkcs11_base_slot": PKCS11_BASE_SLOT}

MANUAL_HEAD = f"""
[provisioning]
source = "manual"
iothub_hostname = "{HUB}"
"""
DPS_HEAD = f"""
[provisioning]
source = "dps"
global_endpoint = "{DPS_ENDPOINT}"
id_scope = "{SCOPE}"
"""
PKCS11_TABLE = f"""
[aziot_keys]
pkcs11_lib_path = "{PKCS11_LIB}"
pkcs11_base_slot = "{PKCS11_BASE_SLOT}"
"""
EST_TRUST = """
[cert_issuance.est]
trusted_certs = ["file:///etc/orchard/est/root-ca.pem", "file:///etc/orchard/est/issuing-ca.pem"]
"""
EST_TRUST_IDS = ["est-server-ca-1", "est-server-ca-2"]
EST_TRUST_PRELOADED = {
    "est-server-ca-1": "file:///etc/orchard/est/root-ca.pem",
    "est-server-ca-2": "file:///etc/orchard/est/issuing-ca.pem",
}
EST_GLOBAL_BOOTSTRAP = f"""
[cert_issuance.est.auth]
username = "orchard-enrol"
password = "pear-tree-44"
bootstrap_identity_cert = "file:///etc/orchard/est/factory.pem"
bootstrap_identity_pk = "pkcs11:{SLOT};object=factory_key?{PIN}"

[cert_issuance.est.urls]
default = "https://est.orchard.example/.well-known/est"
"""
EST_GLOBAL_BOOTSTRAP_OUT = {
    "trusted_certs": EST_TRUST_IDS,
    "username": "orchard-enrol",
    "password": "pear-tree-44",
    "identity_cert": "est-id",
    "identity_pk": "est-id",
    "bootstrap_identity_cert": "est-bootstrap-id",
    "bootstrap_identity_pk": "est-bootstrap-id",
    "urls": {"default": "https://est.orchard.example/.well-known/est"},
}
# `_` is neither a letter nor a digit: re-encoded as %5F like every other such byte.
FACTORY_KEY = f"pkcs11:{SLOT};object=factory%5Fkey?{PIN}"


def connection_string(device_id: str, key_b64: str) -> str:
    return f"HostName={HUB};DeviceId={device_id};SharedAccessKey={key_b64}"


# --------------------------------------------------------------------------------------------
# The vectors

VECTORS = [
    # §3.2 manual connection_string: sas with device_id_pk "device-id", the key's bytes written
    # under keyd's secrets; §2.1 parts other than the three are ignored; the cache flag is passed.
    Vector(
        "manual-connection-string",
        "prefer_module_identity_cache = true\n"
        + "[provisioning]\n"
        + 'source = "manual"\n'
        + f'connection_string = "{connection_string("press-04", PRESS_KEY_B64)};'
        + 'GatewayHostName=ignored.orchard.lan"\n',
        keyd({"device-id": SECRET_KEY_FILE}, ["device-id"]),
        certd(),
        identityd(manual("press-04", SAS), prefer_module_identity_cache=True),
        device_id_key=PRESS_KEY,
    ),
    # §3.2 manual sas with an inline key (padded base64): same as a connection string.
    Vector(
        "manual-symmetric-key",
        MANUAL_HEAD
        + 'device_id = "press-05"\n[provisioning.authentication]\nmethod = "sas"\n'
        + f'device_id_pk = {{ value = "{SAS_KEY_B64}" }}\n',
        keyd({"device-id": SECRET_KEY_FILE}, ["device-id"]),
        certd(),
        identityd(manual("press-05", SAS)),
        device_id_key=SAS_KEY,
    ),
    # §2.1 inline keys without base64 padding are still taken (legacy releases wrote them).
    Vector(
        "manual-symmetric-key-no-pad",
        MANUAL_HEAD
        + 'device_id = "press-05b"\n[provisioning.authentication]\nmethod = "sas"\n'
        + f'device_id_pk = {{ value = "{SAS_KEY_2_B64_NO_PAD}" }}\n',
        keyd({"device-id": SECRET_KEY_FILE}, ["device-id"]),
        certd(),
        identityd(manual("press-05b", SAS)),
        device_id_key=SAS_KEY_2,
    ),
    # §3.2 manual x509 preloaded from files: cert and key preloaded as device-id, no certd
    # principal (nothing is issued); file://localhost/ is written as file:///.
    Vector(
        "manual-x509",
        MANUAL_HEAD
        + 'device_id = "press-06"\n[provisioning.authentication]\nmethod = "x509"\n'
        + 'identity_cert = "file://localhost/etc/orchard/certs/press-06.pem"\n'
        + 'identity_pk = "file:///etc/orchard/private/press-06.key.pem"\n',
        keyd({"device-id": "file:///etc/orchard/private/press-06.key.pem"}, ["device-id"]),
        certd(preloaded={"device-id": "file:///etc/orchard/certs/press-06.pem"}),
        identityd(manual("press-06", X509)),
    ),
    # §3.2 manual x509 with the key in PKCS#11: the URI re-encoded, [aziot_keys] passed through.
    Vector(
        "manual-x509-pkcs11",
        MANUAL_HEAD
        + 'device_id = "press-07"\n[provisioning.authentication]\nmethod = "x509"\n'
        + 'identity_cert = "file:///etc/orchard/certs/press-07.pem"\n'
        + f'identity_pk = "pkcs11:{SLOT};object=press-07.key?{PIN}"\n'
        + PKCS11_TABLE,
        keyd(
            {"device-id": f"pkcs11:{SLOT};object=press%2D07%2Ekey?{PIN}"},
            ["device-id"],
            aziot_keys=PKCS11_KEYS,
        ),
        certd(preloaded={"device-id": "file:///etc/orchard/certs/press-07.pem"}),
        identityd(manual("press-07", X509)),
    ),
    # §3.2 manual x509 issued over EST with common_name and per-cert EST auth (basic + identity
    # cert): est-id-device-id preloaded for certd; no csr_subject without a subject table.
    Vector(
        "manual-x509-est-custom",
        MANUAL_HEAD
        + 'device_id = "press-08"\n[provisioning.authentication]\nmethod = "x509"\n'
        + "[provisioning.authentication.identity_cert]\n"
        + 'method = "est"\ncommon_name = "press-08.orchard"\nexpiry_days = 90\n'
        + 'url = "https://est.orchard.example/.well-known/est/presses"\n'
        + 'username = "press-enrol"\npassword = "quince-17"\n'
        + 'identity_cert = "file:///etc/orchard/est/press-client.pem"\n'
        + f'identity_pk = "pkcs11:{SLOT};object=press-client?{PIN}"\n',
        keyd(
            {"est-id-device-id": f"pkcs11:{SLOT};object=press%2Dclient?{PIN}"},
            ["device-id"],
            ["est-id-device-id"],
        ),
        certd(
            {
                "device-id": {
                    "method": "est",
                    "url": "https://est.orchard.example/.well-known/est/presses",
                    "username": "press-enrol",
                    "password": "quince-17",
                    "identity_cert": "est-id-device-id",
                    "identity_pk": "est-id-device-id",
                    "expiry_days": 90,
                    "common_name": "press-08.orchard",
                }
            },
            {"est-id-device-id": "file:///etc/orchard/est/press-client.pem"},
            ["device-id"],
        ),
        identityd(manual("press-08", X509)),
    ),
    # §2.1 an http:// EST URL is only warned about: mapped exactly as https.
    Vector(
        "manual-x509-est-custom-http",
        MANUAL_HEAD
        + 'device_id = "press-09"\n[provisioning.authentication]\nmethod = "x509"\n'
        + "[provisioning.authentication.identity_cert]\n"
        + 'method = "est"\ncommon_name = "press-09"\nexpiry_days = 14\n'
        + 'url = "http://est.orchard.lan:8085/.well-known/est"\n'
        + 'username = "press-enrol"\npassword = "quince-17"\n'
        + 'identity_cert = "file:///etc/orchard/est/press-client.pem"\n'
        + f'identity_pk = "pkcs11:{SLOT};object=press-client?{PIN}"\n',
        keyd(
            {"est-id-device-id": f"pkcs11:{SLOT};object=press%2Dclient?{PIN}"},
            ["device-id"],
            ["est-id-device-id"],
        ),
        certd(
            {
                "device-id": {
                    "method": "est",
                    "url": "http://est.orchard.lan:8085/.well-known/est",
                    "username": "press-enrol",
                    "password": "quince-17",
                    "identity_cert": "est-id-device-id",
                    "identity_pk": "est-id-device-id",
                    "expiry_days": 14,
                    "common_name": "press-09",
                }
            },
            {"est-id-device-id": "file:///etc/orchard/est/press-client.pem"},
            ["device-id"],
        ),
        identityd(manual("press-09", X509)),
    ),
    # §3.2 manual x509 issued with a subject table: identityd's csr_subject is CN = device_id
    # plus the other names (the given CN dropped); certd gets the subject as written.
    Vector(
        "manual-x509-est-subject-dn",
        MANUAL_HEAD
        + 'device_id = "press-10"\n[provisioning.authentication]\nmethod = "x509"\n'
        + "[provisioning.authentication.identity_cert]\n"
        + 'method = "est"\nexpiry_days = 180\n'
        + 'subject = { C = "NZ", O = "Orchard Ltd", CN = "not-the-device" }\n'
        + 'url = "https://est.orchard.example/.well-known/est/presses"\n'
        + 'username = "press-enrol"\npassword = "quince-17"\n'
        + 'identity_cert = "file:///etc/orchard/est/press-client.pem"\n'
        + f'identity_pk = "pkcs11:{SLOT};object=press-client?{PIN}"\n',
        keyd(
            {"est-id-device-id": f"pkcs11:{SLOT};object=press%2Dclient?{PIN}"},
            ["device-id"],
            ["est-id-device-id"],
        ),
        certd(
            {
                "device-id": {
                    "method": "est",
                    "url": "https://est.orchard.example/.well-known/est/presses",
                    "username": "press-enrol",
                    "password": "quince-17",
                    "identity_cert": "est-id-device-id",
                    "identity_pk": "est-id-device-id",
                    "expiry_days": 180,
                    "subject": {"C": "NZ", "O": "Orchard Ltd", "CN": "not-the-device"},
                }
            },
            {"est-id-device-id": "file:///etc/orchard/est/press-client.pem"},
            ["device-id"],
        ),
        identityd(
            manual(
                "press-10",
                {**X509, "csr_subject": {"CN": "press-10", "C": "NZ", "O": "Orchard Ltd"}},
            )
        ),
    ),
    # §3.2 local_gateway_hostname: the first key of identityd's [provisioning].
    Vector(
        "local-gateway",
        'local_gateway_hostname = "parent-edge.orchard.lan"\n[provisioning]\nsource = "manual"\n'
        + f'connection_string = "{connection_string("child-21", CHILD_KEY_B64)}"\n',
        keyd({"device-id": SECRET_KEY_FILE}, ["device-id"]),
        certd(),
        identityd({"local_gateway_hostname": "parent-edge.orchard.lan", **manual("child-21", SAS)}),
        device_id_key=CHILD_KEY,
    ),
    # §2 [aziot_max_requests]: each service's max_requests written (tpmd's too).
    Vector(
        "throttle-limits",
        f'[provisioning]\nsource = "manual"\n'
        f'connection_string = "{connection_string("busy-22", BUSY_KEY_B64)}"\n'
        "[aziot_max_requests]\nkeyd = 7\ncertd = 13\ntpmd = 21\nidentityd = 34\n",
        keyd({"device-id": SECRET_KEY_FILE}, ["device-id"], max_requests=7),
        certd(max_requests=13),
        identityd(manual("busy-22", SAS), max_requests=34),
        {"max_requests": 21},
        device_id_key=BUSY_KEY,
    ),
    # §3.2 dps symmetric_key, inline (two padding characters): like manual sas, scope_id.
    Vector(
        "dps-symmetric-key",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "symmetric_key"\n'
        + f'registration_id = "hall-b-sensor-1"\nsymmetric_key = {{ value = "{DPS_KEY_B64}" }}\n',
        keyd({"device-id": SECRET_KEY_FILE}, ["device-id"]),
        certd(),
        identityd(
            dps(
                {
                    "method": "symmetric_key",
                    "registration_id": "hall-b-sensor-1",
                    "symmetric_key": "device-id",
                }
            )
        ),
        device_id_key=DPS_KEY,
    ),
    # §2.1 the DPS key without its padding.
    Vector(
        "dps-symmetric-key-no-pad",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "symmetric_key"\n'
        + 'registration_id = "hall-b-sensor-2"\n'
        + f'symmetric_key = {{ value = "{DPS_KEY_2_B64_NO_PAD}" }}\n',
        keyd({"device-id": SECRET_KEY_FILE}, ["device-id"]),
        certd(),
        identityd(
            dps(
                {
                    "method": "symmetric_key",
                    "registration_id": "hall-b-sensor-2",
                    "symmetric_key": "device-id",
                }
            )
        ),
        device_id_key=DPS_KEY_2,
    ),
    # §3.2 dps tpm: nothing for keyd beyond identityd's master key, nothing for certd.
    Vector(
        "dps-tpm",
        DPS_HEAD + '[provisioning.attestation]\nmethod = "tpm"\nregistration_id = "hall-b-tpm-3"\n',
        keyd({}, []),
        certd(),
        identityd(dps({"method": "tpm", "registration_id": "hall-b-tpm-3"})),
    ),
    # §3.2 dps x509 preloaded from files: registration_id kept as given.
    Vector(
        "dps-x509",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "x509"\nregistration_id = "hall-b-cam-4"\n'
        + 'identity_cert = "file:///etc/orchard/certs/cam-4.pem"\n'
        + 'identity_pk = "file:///etc/orchard/private/cam-4.key.pem"\n',
        keyd({"device-id": "file:///etc/orchard/private/cam-4.key.pem"}, ["device-id"]),
        certd(preloaded={"device-id": "file:///etc/orchard/certs/cam-4.pem"}),
        identityd(dps({**X509, "registration_id": "hall-b-cam-4"})),
    ),
    # §3.2 dps x509 preloaded, key in PKCS#11 (re-encoded URI).
    Vector(
        "dps-x509-pkcs11",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "x509"\nregistration_id = "hall-b-cam-5"\n'
        + 'identity_cert = "file:///etc/orchard/certs/cam-5.pem"\n'
        + f'identity_pk = "pkcs11:{SLOT};object=cam%205?{PIN}"\n'
        + PKCS11_TABLE,
        keyd(
            {"device-id": f"pkcs11:{SLOT};object=cam%205?{PIN}"},
            ["device-id"],
            aziot_keys=PKCS11_KEYS,
        ),
        certd(preloaded={"device-id": "file:///etc/orchard/certs/cam-5.pem"}),
        identityd(dps({**X509, "registration_id": "hall-b-cam-5"})),
    ),
    # §3.2 dps x509 issued over EST with common_name, global EST auth by identity cert:
    # trusted_certs numbered from 1, est-id preloaded for certd, registration_id kept.
    Vector(
        "dps-x509-pkcs11-est",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "x509"\nregistration_id = "hall-b-cam-6"\n'
        + 'identity_cert = { method = "est", common_name = "cam-6.hall-b" }\n'
        + PKCS11_TABLE
        + EST_TRUST
        + "[cert_issuance.est.auth]\n"
        + 'username = "orchard-enrol"\npassword = "pear-tree-44"\n'
        + 'identity_cert = "file:///etc/orchard/est/gateway-client.pem"\n'
        + f'identity_pk = "pkcs11:{SLOT};object=gateway-client?{PIN}"\n'
        + "[cert_issuance.est.urls]\n"
        + 'default = "https://est.orchard.example/.well-known/est"\n',
        keyd(
            {"est-id": f"pkcs11:{SLOT};object=gateway%2Dclient?{PIN}"},
            ["device-id"],
            ["est-id"],
            aziot_keys=PKCS11_KEYS,
        ),
        certd(
            {
                "est": {
                    "trusted_certs": EST_TRUST_IDS,
                    "username": "orchard-enrol",
                    "password": "pear-tree-44",
                    "identity_cert": "est-id",
                    "identity_pk": "est-id",
                    "urls": {"default": "https://est.orchard.example/.well-known/est"},
                },
                "device-id": {"method": "est", "common_name": "cam-6.hall-b"},
            },
            {**EST_TRUST_PRELOADED, "est-id": "file:///etc/orchard/est/gateway-client.pem"},
            ["device-id"],
        ),
        identityd(dps({**X509, "registration_id": "hall-b-cam-6"})),
    ),
    # §3.2 dps x509 EST with auto_renew rotate_key = true and global bootstrap auth: identityd
    # gets device-id-temp's key, certd issues device-id-temp alike (listed first); certd's keys
    # est-bootstrap-id, est-id, est-id-temp; a non-default identity_auto_renew is copied.
    Vector(
        "dps-x509-pkcs11-est-bootstrap",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "x509"\nregistration_id = "hall-b-cam-7"\n'
        + "[provisioning.attestation.identity_cert]\n"
        + 'method = "est"\ncommon_name = "cam-7.hall-b"\n'
        + "[provisioning.attestation.identity_cert.auto_renew]\n"
        + 'rotate_key = true\nthreshold = "75%"\nretry = "2%"\n'
        + PKCS11_TABLE
        + EST_TRUST
        + '[cert_issuance.est.identity_auto_renew]\nrotate_key = true\nthreshold = "60%"\n'
        + 'retry = "5%"\n'
        + EST_GLOBAL_BOOTSTRAP,
        keyd(
            {"est-bootstrap-id": FACTORY_KEY},
            ["device-id", "device-id-temp"],
            ["est-bootstrap-id", "est-id", "est-id-temp"],
            aziot_keys=PKCS11_KEYS,
        ),
        certd(
            {
                "est": {
                    **EST_GLOBAL_BOOTSTRAP_OUT,
                    "identity_auto_renew": {
                        "rotate_key": True,
                        "threshold": "60%",
                        "retry": "5%",
                    },
                },
                "device-id": {"method": "est", "common_name": "cam-7.hall-b"},
                "device-id-temp": {"method": "est", "common_name": "cam-7.hall-b"},
            },
            {**EST_TRUST_PRELOADED, "est-bootstrap-id": "file:///etc/orchard/est/factory.pem"},
            ["device-id-temp", "device-id"],
        ),
        identityd(
            dps(
                {
                    **X509,
                    "registration_id": "hall-b-cam-7",
                    "identity_auto_renew": {
                        "rotate_key": True,
                        "threshold": "75%",
                        "retry": "2%",
                    },
                }
            )
        ),
    ),
    # §3.2 per-cert EST bootstrap for device-id beside a global bootstrap: certd's keys for the
    # cert first (est-bootstrap-id-device-id, est-id-device-id-temp, est-id-device-id), then the
    # global ones; est-id-temp because the global identity_auto_renew rotates keys by default.
    Vector(
        "dps-x509-pkcs11-est-custom-bootstrap",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "x509"\nregistration_id = "hall-b-cam-8"\n'
        + "[provisioning.attestation.identity_cert]\n"
        + 'method = "est"\ncommon_name = "cam-8.hall-b"\n'
        + 'url = "https://est.orchard.example/.well-known/est/cameras"\n'
        + 'bootstrap_identity_cert = "file:///etc/orchard/est/cam-factory.pem"\n'
        + f'bootstrap_identity_pk = "pkcs11:{SLOT};object=cam-factory?{PIN}"\n'
        + PKCS11_TABLE
        + EST_TRUST
        + EST_GLOBAL_BOOTSTRAP,
        keyd(
            {
                "est-bootstrap-id-device-id": f"pkcs11:{SLOT};object=cam%2Dfactory?{PIN}",
                "est-bootstrap-id": FACTORY_KEY,
            },
            ["device-id"],
            [
                "est-bootstrap-id-device-id",
                "est-id-device-id-temp",
                "est-id-device-id",
                "est-bootstrap-id",
                "est-id",
                "est-id-temp",
            ],
            aziot_keys=PKCS11_KEYS,
        ),
        certd(
            {
                "est": EST_GLOBAL_BOOTSTRAP_OUT,
                "device-id": {
                    "method": "est",
                    "url": "https://est.orchard.example/.well-known/est/cameras",
                    "identity_cert": "est-id-device-id",
                    "identity_pk": "est-id-device-id",
                    "bootstrap_identity_cert": "est-bootstrap-id-device-id",
                    "bootstrap_identity_pk": "est-bootstrap-id-device-id",
                    "common_name": "cam-8.hall-b",
                },
            },
            {
                **EST_TRUST_PRELOADED,
                "est-bootstrap-id-device-id": "file:///etc/orchard/est/cam-factory.pem",
                "est-bootstrap-id": "file:///etc/orchard/est/factory.pem",
            },
            ["device-id"],
        ),
        identityd(dps({**X509, "registration_id": "hall-b-cam-8"})),
    ),
    # §3.2 dps x509 issued with a subject table: registration_id becomes the table
    # { CN = registration_id, the other names }; certd keeps the subject as written.
    Vector(
        "dps-x509-pkcs11-est-subject-dn-bootstrap",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "x509"\nregistration_id = "hall-b-cam-9"\n'
        + "[provisioning.attestation.identity_cert]\n"
        + 'method = "est"\n'
        + 'url = "https://est.orchard.example/.well-known/est/cameras"\n'
        + 'bootstrap_identity_cert = "file:///etc/orchard/est/cam-factory.pem"\n'
        + f'bootstrap_identity_pk = "pkcs11:{SLOT};object=cam-factory?{PIN}"\n'
        + 'subject = { OU = "Cameras", O = "Orchard Ltd", CN = "cam-9-given" }\n'
        + PKCS11_TABLE
        + EST_TRUST
        + EST_GLOBAL_BOOTSTRAP,
        keyd(
            {
                "est-bootstrap-id-device-id": f"pkcs11:{SLOT};object=cam%2Dfactory?{PIN}",
                "est-bootstrap-id": FACTORY_KEY,
            },
            ["device-id"],
            [
                "est-bootstrap-id-device-id",
                "est-id-device-id-temp",
                "est-id-device-id",
                "est-bootstrap-id",
                "est-id",
                "est-id-temp",
            ],
            aziot_keys=PKCS11_KEYS,
        ),
        certd(
            {
                "est": EST_GLOBAL_BOOTSTRAP_OUT,
                "device-id": {
                    "method": "est",
                    "url": "https://est.orchard.example/.well-known/est/cameras",
                    "identity_cert": "est-id-device-id",
                    "identity_pk": "est-id-device-id",
                    "bootstrap_identity_cert": "est-bootstrap-id-device-id",
                    "bootstrap_identity_pk": "est-bootstrap-id-device-id",
                    "subject": {"OU": "Cameras", "O": "Orchard Ltd", "CN": "cam-9-given"},
                },
            },
            {
                **EST_TRUST_PRELOADED,
                "est-bootstrap-id-device-id": "file:///etc/orchard/est/cam-factory.pem",
                "est-bootstrap-id": "file:///etc/orchard/est/factory.pem",
            },
            ["device-id"],
        ),
        identityd(
            dps(
                {
                    **X509,
                    "registration_id": {
                        "CN": "hall-b-cam-9",
                        "OU": "Cameras",
                        "O": "Orchard Ltd",
                    },
                }
            )
        ),
    ),
    # §3.2 auto_renew with rotate_key = false: device-id-temp is issued alike but gets no key
    # of identityd's; per-cert bootstrap with keys in files; only trusted_certs globally.
    Vector(
        "dps-x509-est-bootstrap-auto-renew",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "x509"\nregistration_id = "hall-c-gate-1"\n'
        + "[provisioning.attestation.identity_cert]\n"
        + 'method = "est"\nurl = "https://est.orchard.example/.well-known/est/gates"\n'
        + 'bootstrap_identity_cert = "file:///etc/orchard/est/gate-factory.pem"\n'
        + 'bootstrap_identity_pk = "file:///etc/orchard/est/gate-factory.key.pem"\n'
        + "[provisioning.attestation.identity_cert.subject]\n"
        + 'O = "Orchard Ltd"\nL = "Nelson"\nCN = "gate-1-given"\n'
        + "[provisioning.attestation.identity_cert.auto_renew]\n"
        + 'rotate_key = false\nthreshold = "2day"\nretry = "15%"\n'
        + EST_TRUST,
        keyd(
            {"est-bootstrap-id-device-id": "file:///etc/orchard/est/gate-factory.key.pem"},
            ["device-id"],
            ["est-bootstrap-id-device-id", "est-id-device-id-temp", "est-id-device-id"],
        ),
        certd(
            {
                "est": {"trusted_certs": EST_TRUST_IDS},
                **{
                    cert_id: {
                        "method": "est",
                        "url": "https://est.orchard.example/.well-known/est/gates",
                        "identity_cert": "est-id-device-id",
                        "identity_pk": "est-id-device-id",
                        "bootstrap_identity_cert": "est-bootstrap-id-device-id",
                        "bootstrap_identity_pk": "est-bootstrap-id-device-id",
                        "subject": {"O": "Orchard Ltd", "L": "Nelson", "CN": "gate-1-given"},
                    }
                    for cert_id in ("device-id", "device-id-temp")
                },
            },
            {
                **EST_TRUST_PRELOADED,
                "est-bootstrap-id-device-id": "file:///etc/orchard/est/gate-factory.pem",
            },
            ["device-id-temp", "device-id"],
        ),
        identityd(
            dps(
                {
                    **X509,
                    "registration_id": {"CN": "hall-c-gate-1", "O": "Orchard Ltd", "L": "Nelson"},
                    "identity_auto_renew": {
                        "rotate_key": False,
                        "threshold": "2day",
                        "retry": "15%",
                    },
                }
            )
        ),
    ),
    # §3.2 local CA preloaded (key in PKCS#11) issuing device-id: local-ca cert/key preloaded,
    # certd's key local-ca, [cert_issuance.local_ca] naming them.
    Vector(
        "dps-x509-pkcs11-localca",
        DPS_HEAD
        + '[provisioning.attestation]\nmethod = "x509"\nregistration_id = "hall-c-gate-2"\n'
        + 'identity_cert = { method = "local_ca", common_name = "gate-2.hall-c" }\n'
        + PKCS11_TABLE
        + "[cert_issuance.local_ca]\n"
        + 'cert = "file:///etc/orchard/ca/site-ca.pem"\n'
        + f'pk = "pkcs11:{SLOT};object=site-ca?{PIN}"\n',
        keyd(
            {"local-ca": f"pkcs11:{SLOT};object=site%2Dca?{PIN}"},
            ["device-id"],
            ["local-ca"],
            aziot_keys=PKCS11_KEYS,
        ),
        certd(
            {
                "local_ca": {"cert": "local-ca", "pk": "local-ca"},
                "device-id": {"method": "local_ca", "common_name": "gate-2.hall-c"},
            },
            {"local-ca": "file:///etc/orchard/ca/site-ca.pem"},
            ["device-id"],
        ),
        identityd(dps({**X509, "registration_id": "hall-c-gate-2"})),
    ),
    # §3.2 local CA issued (self-signed) for a manual x509 identity it issues; manual identities
    # are not renewed, so auto_renew adds no device-id-temp.
    Vector(
        "manual-x509-local-ca-issued",
        MANUAL_HEAD
        + 'device_id = "press-11"\n[provisioning.authentication]\nmethod = "x509"\n'
        + "[provisioning.authentication.identity_cert]\n"
        + 'method = "local_ca"\ncommon_name = "press-11"\nexpiry_days = 30\n'
        + 'auto_renew = { rotate_key = true, threshold = "80%", retry = "4%" }\n'
        + "[cert_issuance.local_ca.cert]\n"
        + 'method = "self_signed"\ncommon_name = "Orchard Site CA"\nexpiry_days = 3650\n',
        keyd({}, ["device-id"], ["local-ca"]),
        certd(
            {
                "local_ca": {"cert": "local-ca", "pk": "local-ca"},
                "local-ca": {
                    "method": "self_signed",
                    "expiry_days": 3650,
                    "common_name": "Orchard Site CA",
                },
                "device-id": {"method": "local_ca", "expiry_days": 30, "common_name": "press-11"},
            },
            is_certs=["device-id"],
        ),
        identityd(manual("press-11", X509)),
    ),
]

BY_NAME = {vector.name: vector for vector in VECTORS}
