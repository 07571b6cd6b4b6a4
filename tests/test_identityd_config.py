"""identityd's config in process: hand-written configs of each shape the service reads, parsed to
every field; what `aziotctl config apply` renders from our golden vectors (tests/apply_vectors.py)
read back by identityd's parser into the expected typed config; the defaults, `config.d` merged
with principals accumulating, the refusals of the original's `Settings::check`, and every
refusal naming the file and the key (spec/provisioning.md §4.1, §8.5, §8.7; spec/api.md §2.3,
§5.5). Every value in these configs was made up for this project.

The original ignores keys it does not know (serde); here they stop the start.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tomli

from aziot.cli import apply as apply_cmd
from aziot.cli.layout import Layout
from aziot.config.certd import AutoRenew
from aziot.config.identityd import (
    CsrSubject,
    Dps,
    Endpoints,
    IdentitydConfig,
    LocalId,
    LocalIdOpts,
    Manual,
    ManualSas,
    ManualX509,
    NoProvisioning,
    Payload,
    Principal,
    Provisioning,
    SymmetricKeyAttestation,
    TpmAttestation,
    X509Attestation,
    load_identityd,
    parse_identityd,
)
from aziot.config.loader import ConfigError, ServicePaths
from aziot.config.super_config import parse_super_config_text
from aziot.config.table import Source
from tests import apply_vectors
from tests.apply_vectors import BY_NAME, CS_UID, IS_UID, VECTORS, Vector

SOURCE = "/etc/aziot/identityd/config.toml"

# The kiln works' gateway: one device, its hub, its DPS enrollment and its local modules.
HOST = "kiln-gw-3"
HOMEDIR = Path("/srv/kiln/identityd")
HUB = "kiln-works.azure-devices.net"
DEVICE_ID = "glaze-line-3"
SAS_KEY_ID = "glaze-sas"
DPS_ENDPOINT = "https://dps.kiln.example/"
SCOPE_ID = "0ne00B1SCU1"
REGISTRATION_ID = "glaze-line-4"
DPS_KEY_ID = "glaze-dps-key"
PAYLOAD_DIR = "file:///srv/kiln/dps"
PAYLOAD_URI = f"{PAYLOAD_DIR}/enrollment-data.json"
DOMAIN = "kiln.example"

HEAD = f"""\
# identityd on the kiln works' gateway
hostname = "{HOST}"
homedir = "{HOMEDIR}"
"""

MANUAL_SAS = f"""
[provisioning]
source = "manual"
iothub_hostname = "{HUB}"
device_id = "{DEVICE_ID}"

[provisioning.authentication]
method = "sas"
device_id_pk = "{SAS_KEY_ID}"
"""

SAS_CONFIG = HEAD + MANUAL_SAS

# Quoted keys are the same keys to TOML, and must be to the parser.
DPS_CONFIG = (
    HEAD
    + f"""
[provisioning]
source = "dps"
"global_endpoint" = "{DPS_ENDPOINT}"
"scope_id" = "{SCOPE_ID}"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "{REGISTRATION_ID}"
symmetric_key = "{DPS_KEY_ID}"
"""
)

SCOPE_LINE = f'"scope_id" = "{SCOPE_ID}"\n'
PAYLOAD_LINE = f'payload = {{ uri = "{PAYLOAD_URI}" }}\n'
DPS_WITH_PAYLOAD = DPS_CONFIG.replace(SCOPE_LINE, SCOPE_LINE + PAYLOAD_LINE)

# Principals of the three kinds: untyped (a host daemon), device-only, module and local.
PRINCIPALS_CONFIG = (
    HEAD
    + f"""
[localid]
domain = "{DOMAIN}"  # local identities are named <module>.<domain>

[[principal]]
name = "glaze-agent"
uid = 2101

[[principal]]
name = "kiln-monitor"
idtype = ["device"]
uid = 2102

[[principal]]
idtype = ["module", "local"]
name = "kiln-relay"
uid = 2103
"""
    + MANUAL_SAS
)

# No hub; local identities with each localid form; the socket endpoints spelled out; and the
# [connect]/[listen] tables older identityd configs carry, which are read past.
LOCAL_ONLY_CONFIG = (
    HEAD
    + f"""
[provisioning]
source = "none"

[connect]
api_uri = "unix:///run/kiln/identityd.sock"

[listen]
api_uri = "unix:///run/kiln/identityd.sock"

[endpoints]
aziot_keyd = "unix:///run/kiln/keyd.sock"
aziot_certd = "unix:///run/kiln/certd.sock"
aziot_tpmd = "unix:///run/kiln/tpmd.sock"
aziot_identityd = "unix:///run/kiln/identityd.sock"

[localid]
domain = "{DOMAIN}"

[[principal]]
uid = 3001
name = "tile-sorter"
idtype = ["local"]

[[principal]]
uid = 3002
name = "tile-camera"
idtype = ["local"]
localid = {{ type = "x509" }}

[[principal]]
uid = 3003
name = "tile-dashboard"
idtype = ["local"]
localid = {{ attributes = "server", type = "x509" }}
"""
)

BAD_SOURCE_CONFIG = DPS_CONFIG.replace('source = "dps"', 'source = "dps-v2"  # no such source')

# A local principal with no [localid] to name its identity by.
LOCAL_WITHOUT_DOMAIN = DPS_CONFIG.replace(
    "[provisioning.attestation]",
    """[[principal]]
uid = 2101
name = "glaze-agent"
idtype = ["local"]

[provisioning.attestation]""",
)

# Bases the refusals below break one key of: x509 by hand, DPS over TPM, DPS x509 with a subject
# table for a registration id and a renewal policy.
MANUAL_X509 = (
    HEAD
    + f"""
[provisioning]
source = "manual"
iothub_hostname = "{HUB}"
device_id = "{DEVICE_ID}"

[provisioning.authentication]
method = "x509"
identity_cert = "glaze-cert"
identity_pk = "glaze-cert-key"
"""
)
DPS_TPM = (
    HEAD
    + f"""
[provisioning]
source = "dps"
global_endpoint = "{DPS_ENDPOINT}"
scope_id = "{SCOPE_ID}"

[provisioning.attestation]
method = "tpm"
registration_id = "{REGISTRATION_ID}"
"""
)
DPS_X509_RENEWED = (
    HEAD
    + f"""
[provisioning]
source = "dps"
global_endpoint = "{DPS_ENDPOINT}"
scope_id = "{SCOPE_ID}"

[provisioning.attestation]
method = "x509"
identity_cert = "glaze-cert"
identity_pk = "glaze-cert-key"

[provisioning.attestation.registration_id]
CN = "{REGISTRATION_ID}"
O = "Kiln Works"
OU = "Glazing"

[provisioning.attestation.identity_auto_renew]
rotate_key = false
threshold = "3day"
retry = "20%"
"""
)


def parse(text: str) -> IdentitydConfig:
    return parse_identityd(tomli.loads(text), SOURCE)


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: "), message
    return message


def basic(provisioning: Provisioning, **fields: object) -> IdentitydConfig:
    return IdentitydConfig(HOST, HOMEDIR, provisioning, **fields)  # type: ignore[arg-type]


SAS_PROVISIONING = Provisioning(Manual(HUB, DEVICE_ID, ManualSas(SAS_KEY_ID)))


# Each shape, by hand ------------------------------------------------------------------------------


def test_manual_sas_config() -> None:
    assert parse(SAS_CONFIG) == basic(SAS_PROVISIONING)


def test_dps_symmetric_key_config_with_quoted_keys() -> None:
    config = parse(DPS_CONFIG)
    assert config == basic(
        Provisioning(
            Dps(DPS_ENDPOINT, SCOPE_ID, SymmetricKeyAttestation(REGISTRATION_ID, DPS_KEY_ID))
        )
    )
    assert config.provisioning.source == "dps"


def test_dps_config_with_an_inline_payload_table() -> None:
    config = parse(DPS_WITH_PAYLOAD)
    assert config == basic(
        Provisioning(
            Dps(
                DPS_ENDPOINT,
                SCOPE_ID,
                SymmetricKeyAttestation(REGISTRATION_ID, DPS_KEY_ID),
                Payload(PAYLOAD_URI),
            )
        )
    )
    assert isinstance(config.provisioning.kind, Dps)
    payload = config.provisioning.kind.payload
    assert payload is not None
    assert payload.path == Path("/srv/kiln/dps/enrollment-data.json")


def test_principals_of_each_kind() -> None:
    config = parse(PRINCIPALS_CONFIG)
    assert config == basic(
        SAS_PROVISIONING,
        localid=LocalId(DOMAIN),
        principal=[
            Principal(2101, "glaze-agent"),
            Principal(2102, "kiln-monitor", ["device"]),
            Principal(2103, "kiln-relay", ["module", "local"]),
        ],
    )


def test_local_only_config(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aziot.config.identityd"):
        config = parse(LOCAL_ONLY_CONFIG)
    assert config == basic(
        Provisioning(NoProvisioning()),
        localid=LocalId(DOMAIN),
        endpoints=Endpoints(
            aziot_certd="unix:///run/kiln/certd.sock",
            aziot_identityd="unix:///run/kiln/identityd.sock",
            aziot_keyd="unix:///run/kiln/keyd.sock",
            aziot_tpmd="unix:///run/kiln/tpmd.sock",
        ),
        principal=[
            Principal(3001, "tile-sorter", ["local"]),
            Principal(3002, "tile-camera", ["local"], LocalIdOpts("x509", "client")),
            Principal(3003, "tile-dashboard", ["local"], LocalIdOpts("x509", "server")),
        ],
    )
    # The old [connect] and [listen] tables are ignored, as serde does, but said.
    assert "connect: ignored" in caplog.text and "listen: ignored" in caplog.text


def test_by_hand_manual_x509_and_dps_bases() -> None:
    # The bases the refusals break must themselves be good, or those refusals prove nothing.
    assert parse(MANUAL_X509) == basic(
        Provisioning(Manual(HUB, DEVICE_ID, ManualX509("glaze-cert", "glaze-cert-key")))
    )
    assert parse(DPS_TPM) == basic(
        Provisioning(Dps(DPS_ENDPOINT, SCOPE_ID, TpmAttestation(REGISTRATION_ID)))
    )
    assert parse(DPS_X509_RENEWED) == basic(
        Provisioning(
            Dps(
                DPS_ENDPOINT,
                SCOPE_ID,
                X509Attestation(
                    "glaze-cert",
                    "glaze-cert-key",
                    CsrSubject(REGISTRATION_ID, {"O": "Kiln Works", "OU": "Glazing"}),
                    AutoRenew(rotate_key=False, threshold="3day", retry="20%"),
                ),
            )
        )
    )


def test_an_unknown_source_refused() -> None:
    message = refused(BAD_SOURCE_CONFIG)
    assert "provisioning.source" in message and "'dps-v2'" in message


def test_a_local_principal_without_localid_refused() -> None:
    message = refused(LOCAL_WITHOUT_DOMAIN)
    assert "principal[0].idtype" in message and "[localid]" in message


# What `aziotctl config apply` writes, identityd reads ---------------------------------------------

# Each golden vector's identityd config as identityd's parser must type it. Apply renders under
# Layout() at /, so the homedir is the installed one.
APPLIED_HOMEDIR = Path("/var/lib/aziot/identityd")
V_HUB = apply_vectors.HUB
V_DPS = apply_vectors.DPS_ENDPOINT
V_SCOPE = apply_vectors.SCOPE
DEVICE_KEY = "device-id"  # apply's key and cert id for the device identity


def _applied(provisioning: Provisioning, **fields: object) -> IdentitydConfig:
    return IdentitydConfig(
        apply_vectors.HOSTNAME,
        APPLIED_HOMEDIR,
        provisioning,
        **fields,  # type: ignore[arg-type]
    )


def _manual_sas(device_id: str) -> Provisioning:
    return Provisioning(Manual(V_HUB, device_id, ManualSas(DEVICE_KEY)))


def _manual_x509(device_id: str, subject: CsrSubject | None = None) -> Provisioning:
    return Provisioning(Manual(V_HUB, device_id, ManualX509(DEVICE_KEY, DEVICE_KEY, subject)))


def _dps_x509(subject: CsrSubject, renew: AutoRenew | None = None) -> Provisioning:
    return Provisioning(
        Dps(V_DPS, V_SCOPE, X509Attestation(DEVICE_KEY, DEVICE_KEY, subject, renew))
    )


def _dps_sas(registration_id: str) -> Provisioning:
    return Provisioning(Dps(V_DPS, V_SCOPE, SymmetricKeyAttestation(registration_id, DEVICE_KEY)))


APPLIED = {
    "manual-connection-string": _applied(
        _manual_sas("press-04"), prefer_module_identity_cache=True
    ),
    "manual-symmetric-key": _applied(_manual_sas("press-05")),
    "manual-symmetric-key-no-pad": _applied(_manual_sas("press-05b")),
    "manual-x509": _applied(_manual_x509("press-06")),
    "manual-x509-pkcs11": _applied(_manual_x509("press-07")),
    "manual-x509-est-custom": _applied(_manual_x509("press-08")),
    "manual-x509-est-custom-http": _applied(_manual_x509("press-09")),
    # The subject's names upper-cased and sorted, the CN the device id.
    "manual-x509-est-subject-dn": _applied(
        _manual_x509("press-10", CsrSubject("press-10", {"C": "NZ", "O": "Orchard Ltd"}))
    ),
    "local-gateway": _applied(
        Provisioning(Manual(V_HUB, "child-21", ManualSas(DEVICE_KEY)), "parent-edge.orchard.lan")
    ),
    "throttle-limits": _applied(_manual_sas("busy-22"), max_requests=34),
    "dps-symmetric-key": _applied(_dps_sas("hall-b-sensor-1")),
    "dps-symmetric-key-no-pad": _applied(_dps_sas("hall-b-sensor-2")),
    "dps-tpm": _applied(Provisioning(Dps(V_DPS, V_SCOPE, TpmAttestation("hall-b-tpm-3")))),
    # A string registration id is a subject of its CN alone.
    "dps-x509": _applied(_dps_x509(CsrSubject("hall-b-cam-4"))),
    "dps-x509-pkcs11": _applied(_dps_x509(CsrSubject("hall-b-cam-5"))),
    "dps-x509-pkcs11-est": _applied(_dps_x509(CsrSubject("hall-b-cam-6"))),
    "dps-x509-pkcs11-est-bootstrap": _applied(
        _dps_x509(CsrSubject("hall-b-cam-7"), AutoRenew(True, "75%", "2%"))
    ),
    "dps-x509-pkcs11-est-custom-bootstrap": _applied(_dps_x509(CsrSubject("hall-b-cam-8"))),
    "dps-x509-pkcs11-est-subject-dn-bootstrap": _applied(
        _dps_x509(CsrSubject("hall-b-cam-9", {"O": "Orchard Ltd", "OU": "Cameras"}))
    ),
    "dps-x509-est-bootstrap-auto-renew": _applied(
        _dps_x509(
            CsrSubject("hall-c-gate-1", {"L": "Nelson", "O": "Orchard Ltd"}),
            AutoRenew(rotate_key=False, threshold="2day", retry="15%"),
        )
    ),
    "dps-x509-pkcs11-localca": _applied(_dps_x509(CsrSubject("hall-c-gate-2"))),
    "manual-x509-local-ca-issued": _applied(_manual_x509("press-11")),
}


def rendered_identityd(vector: Vector) -> str:
    """The identityd config text `aziotctl config apply` writes for `vector`."""
    layout = Layout()
    result = apply_cmd.render(
        parse_super_config_text(vector.config, "/etc/aziot/config.toml"),
        identityd_uid=IS_UID,
        certd_uid=CS_UID,
        hostname=apply_vectors.HOSTNAME,
        layout=layout,
    )
    apply_cmd.check_rendered(result, layout)
    return result.text("identityd")


def test_every_vector_has_its_typed_identityd_config() -> None:
    assert set(APPLIED) == set(BY_NAME)


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
def test_identityd_reads_what_apply_writes(vector: Vector) -> None:
    text = rendered_identityd(vector)
    assert tomli.loads(text) == vector.identityd
    source = str(Layout().applied_config("identityd"))
    config = parse_identityd(tomli.loads(text), Source(source, text))
    assert config == APPLIED[vector.name]
    # Spelled out where the default would hide a field that was not carried over.
    assert config.prefer_module_identity_cache is (vector.name == "manual-connection-string")
    assert config.max_requests == (34 if vector.name == "throttle-limits" else 10)
    assert config.principal == [] and config.localid is None


# Defaults and values -----------------------------------------------------------------------------


def test_defaults() -> None:
    config = parse(SAS_CONFIG)
    assert config.prefer_module_identity_cache is False
    assert config.max_requests == 10
    assert config.cloud_timeout_sec == 70
    assert config.cloud_retries == 1
    assert config.principal == []
    assert config.localid is None
    assert config.endpoints == Endpoints()
    assert config.provisioning.local_gateway_hostname is None


def test_cloud_knobs() -> None:
    config = parse("cloud_timeout_sec = 300\ncloud_retries = 0\nmax_requests = 3\n" + SAS_CONFIG)
    assert (config.cloud_timeout_sec, config.cloud_retries, config.max_requests) == (300, 0, 3)


def test_csr_subject_keys_upper_cased_and_sorted() -> None:
    text = (
        MANUAL_X509
        + 'csr_subject = { st = "Otago", cn = "glaze", o = "Kiln Works", L = "Dunedin" }\n'
    )
    kind = parse(text).provisioning.kind
    assert isinstance(kind, Manual) and isinstance(kind.authentication, ManualX509)
    subject = kind.authentication.csr_subject
    assert subject == CsrSubject("glaze", {"L": "Dunedin", "O": "Kiln Works", "ST": "Otago"})
    assert list(subject.rest) == ["L", "O", "ST"]


def test_none_provisioning_allows_untyped_and_local_principals() -> None:
    text = (
        HEAD
        + '[provisioning]\nsource = "none"\nlocal_gateway_hostname = "gw"\n'
        + '[localid]\ndomain = "d"\n'
        + '[[principal]]\nuid = 0\nname = "edged"\n'
        + '[[principal]]\nuid = 4294967295\nname = "l"\nidtype = ["local", "local"]\n'
    )
    config = parse(text)
    assert config.provisioning == Provisioning(NoProvisioning(), "gw")
    assert config.provisioning.source == "none"
    assert config.principal == [
        Principal(0, "edged"),
        Principal(4294967295, "l", ["local", "local"]),
    ]


def test_duplicate_uids_refused() -> None:
    text = (
        SAS_CONFIG
        + '[[principal]]\nuid = 5\nname = "a"\n[[principal]]\nuid = 5\nname = "b"\nidtype = ["module"]\n'
    )
    message = refused(text)
    assert "principal[1].uid" in message and "uid 5 already has a principal" in message
    assert "principal[0]" in message


# Refusals: Settings::check ----------------------------------------------------------------------


def test_duplicate_principal_names_refused() -> None:
    text = (
        SAS_CONFIG
        + '[[principal]]\nuid = 1\nname = "m"\n[[principal]]\nuid = 2\nname = "m"\nidtype = ["module"]\n'
    )
    message = refused(text)
    assert "principal[1].name" in message and "duplicate module name 'm'" in message
    assert "principal[0]" in message


def test_localid_options_without_local_refused() -> None:
    text = (
        SAS_CONFIG
        + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["module"]\n'
        + 'localid = { type = "x509" }\n'
    )
    message = refused(text)
    assert "principal[0].localid" in message and "non-local" in message


def test_localid_options_on_untyped_principal_refused() -> None:
    text = (
        SAS_CONFIG
        + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "d"\nlocalid = { type = "x509" }\n'
    )
    assert "principal[0].localid" in refused(text)


@pytest.mark.parametrize("idtype", ["module", "device"])
def test_hub_identity_without_provisioning_refused(idtype: str) -> None:
    text = (
        HEAD
        + f'[provisioning]\nsource = "none"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["{idtype}"]\n'
    )
    message = refused(text)
    assert "principal[0].idtype" in message and "requires provisioning with IoT Hub" in message


def test_dps_in_nested_mode_refused() -> None:
    text = DPS_CONFIG.replace('source = "dps"', 'source = "dps"\nlocal_gateway_hostname = "gw"')
    message = refused(text)
    assert "provisioning.local_gateway_hostname" in message and "nested mode" in message


# Refusals: keys, types, values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        # top level
        (SAS_CONFIG.replace(f'hostname = "{HOST}"\n', ""), "hostname: is missing"),
        (
            SAS_CONFIG.replace(f'homedir = "{HOMEDIR}"\n', ""),
            "homedir: is missing",
        ),
        (HEAD, "provisioning: is missing"),
        (SAS_CONFIG.replace(f'"{HOST}"', "5"), "hostname: expected a string"),
        ("cloud_timeout_sec = 69\n" + SAS_CONFIG, "cloud_timeout_sec: 69 is out of range"),
        ('cloud_timeout_sec = "70"\n' + SAS_CONFIG, "cloud_timeout_sec: expected an integer"),
        ("cloud_retries = -1\n" + SAS_CONFIG, "cloud_retries: -1 is out of range"),
        ("cloud_retries = 4294967296\n" + SAS_CONFIG, "cloud_retries: 4294967296 is out"),
        ("max_requests = 0\n" + SAS_CONFIG, "max_requests: 0 is out of range"),
        (
            'prefer_module_identity_cache = "yes"\n' + SAS_CONFIG,
            "prefer_module_identity_cache: expected true or false",
        ),
        ("cloud_timeout = 100\n" + SAS_CONFIG, "cloud_timeout: unknown key"),
        ("principal = 5\n" + SAS_CONFIG, "principal: expected an array of tables"),
        (SAS_CONFIG + "[localid]\n", "localid.domain: is missing"),
        (
            SAS_CONFIG + '[localid]\ndomain = "d"\ndomian = "d"\n',
            "localid.domian: unknown key",
        ),
        (SAS_CONFIG + '[endpoints]\naziot_keyd = "/run/keyd.sock"\n', "endpoints.aziot_keyd"),
        (
            SAS_CONFIG + '[endpoints]\naziot_keys = "unix:///k"\n',
            "endpoints.aziot_keys: unknown key",
        ),
        (SAS_CONFIG + "[connect]\napi_uri = 5\n", None),  # legacy, ignored
        ("connect = 5\n" + SAS_CONFIG, "connect: expected a table"),
        # provisioning
        (
            SAS_CONFIG.replace('source = "manual"\n', ""),
            "provisioning.source: is missing: expected one of",
        ),
        (SAS_CONFIG.replace('"manual"', '"Manual"'), "provisioning.source: expected one of"),
        (
            SAS_CONFIG.replace('"manual"', '"none"'),
            "provisioning.authentication: unknown key (and provisioning.device_id, provisioning.iothub_hostname)",
        ),
        (
            SAS_CONFIG.replace(f'device_id = "{DEVICE_ID}"', 'device_id = ""'),
            "provisioning.device_id: is empty",
        ),
        (
            SAS_CONFIG.replace(f'device_id = "{DEVICE_ID}"', "device_id = 1"),
            "provisioning.device_id: expected a string",
        ),
        (
            SAS_CONFIG.replace(f'iothub_hostname = "{HUB}"\n', ""),
            "provisioning.iothub_hostname: is missing",
        ),
        (
            SAS_CONFIG.replace(f'{HUB}"', f'{HUB}"\nhub_name = "x"'),
            "provisioning.hub_name: unknown key",
        ),
        (
            SAS_CONFIG.replace(
                f'{HUB}"',
                f'{HUB}"\nconnection_string = "HostName=h;DeviceId=d;SharedAccessKey=k"',
            ),
            "provisioning.connection_string: identityd does not read connection strings",
        ),
        (
            SAS_CONFIG.replace('method = "sas"', 'method = "symmetric_key"'),
            "provisioning.authentication.method: expected one of 'sas', 'x509', found 'symmetric_key'",
        ),
        (
            SAS_CONFIG.replace(
                f'device_id_pk = "{SAS_KEY_ID}"', 'device_id_pk = { value = "abc=" }'
            ),
            "provisioning.authentication.device_id_pk: expected a string, found a table",
        ),
        (
            SAS_CONFIG.replace(
                f'device_id_pk = "{SAS_KEY_ID}"',
                f'device_id_pk = "{SAS_KEY_ID}"\nidentity_cert = "c"',
            ),
            "provisioning.authentication.identity_cert: unknown key",
        ),
        (
            HEAD + MANUAL_SAS.split("[provisioning.authentication]")[0],
            "provisioning.authentication: is missing",
        ),
        (
            MANUAL_X509.replace('identity_pk = "glaze-cert-key"\n', ""),
            "provisioning.authentication.identity_pk: is missing",
        ),
        (
            MANUAL_X509 + 'csr_subject = { L = "Dunedin" }\n',
            "provisioning.authentication.csr_subject: a subject table needs CN",
        ),
        (
            MANUAL_X509 + "csr_subject = 5\n",
            "provisioning.authentication.csr_subject: expected a common name",
        ),
        (
            MANUAL_X509 + 'csr_subject = { CN = "a", L = 1 }\n',
            "provisioning.authentication.csr_subject.L: expected a string",
        ),
        (
            MANUAL_X509 + 'csr_subject = { CN = "a", cn = "b" }\n',
            "provisioning.authentication.csr_subject.cn: CN is given twice",
        ),
        # dps
        (
            DPS_CONFIG.replace(DPS_ENDPOINT, "dps.kiln.example/"),
            "provisioning.global_endpoint: 'dps.kiln.example/' is not an http:// or https:// URL",
        ),
        (
            DPS_CONFIG.replace(DPS_ENDPOINT, "ftp://dps.kiln.example/"),
            "provisioning.global_endpoint: 'ftp://",
        ),
        (
            DPS_CONFIG.replace('"scope_id"', '"id_scope"'),
            "provisioning.id_scope: identityd's config spells it scope_id",
        ),
        (
            DPS_CONFIG.replace(SCOPE_LINE, ""),
            "provisioning.scope_id: is missing",
        ),
        (
            DPS_WITH_PAYLOAD.replace(PAYLOAD_DIR, "https://kiln.example/dps"),
            "provisioning.payload.uri: 'https://kiln.example/dps/enrollment-data.json' is not a file:// URI",
        ),
        (
            DPS_WITH_PAYLOAD.replace(PAYLOAD_DIR, "file://kiln-nas/srv/kiln/dps"),
            "provisioning.payload.uri",
        ),
        (
            DPS_WITH_PAYLOAD.replace('uri = "file', 'url = "file'),
            "provisioning.payload.uri: is missing",
        ),
        (
            DPS_WITH_PAYLOAD.replace(PAYLOAD_LINE, f'payload = "{PAYLOAD_URI}"\n'),
            "provisioning.payload: expected a table",
        ),
        (
            DPS_WITH_PAYLOAD.replace('.json" }', '.json", extra = 1 }'),
            "provisioning.payload.extra: unknown key",
        ),
        (
            DPS_CONFIG.split("[provisioning.attestation]")[0],
            "provisioning.attestation: is missing",
        ),
        (
            DPS_CONFIG.replace('method = "symmetric_key"', 'method = "sas"'),
            "provisioning.attestation.method: expected one of",
        ),
        (
            DPS_CONFIG.replace(f'registration_id = "{REGISTRATION_ID}"\n', ""),
            "provisioning.attestation.registration_id: is missing",
        ),
        (
            DPS_CONFIG.replace(
                f'symmetric_key = "{DPS_KEY_ID}"', 'symmetric_key = { value = "abc=" }'
            ),
            "provisioning.attestation.symmetric_key: expected a string",
        ),
        (
            DPS_CONFIG.replace(
                f'symmetric_key = "{DPS_KEY_ID}"',
                f'symmetric_key = "{DPS_KEY_ID}"\nregistraton_id = "x"',
            ),
            "provisioning.attestation.registraton_id: unknown key",
        ),
        (
            DPS_TPM + 'identity_cert = "c"\n',
            "provisioning.attestation.identity_cert: unknown key",
        ),
        (
            DPS_TPM.replace(
                f'registration_id = "{REGISTRATION_ID}"', 'registration_id = { CN = "x" }'
            ),
            "provisioning.attestation.registration_id: expected a string",
        ),
        (
            DPS_X509_RENEWED.replace("rotate_key = false\n", ""),
            "provisioning.attestation.identity_auto_renew.rotate_key: is missing",
        ),
        (
            DPS_X509_RENEWED.replace('threshold = "3day"\n', ""),
            "provisioning.attestation.identity_auto_renew.threshold: is missing",
        ),
        (
            DPS_X509_RENEWED.replace('retry = "20%"\n', ""),
            "provisioning.attestation.identity_auto_renew.retry: is missing",
        ),
        (
            DPS_X509_RENEWED.replace('retry = "20%"', "retry = 10"),
            "provisioning.attestation.identity_auto_renew.retry: expected a string",
        ),
        (
            DPS_X509_RENEWED + "rotate = true\n",
            "provisioning.attestation.identity_auto_renew.rotate: unknown key",
        ),
        (
            DPS_X509_RENEWED.replace(f'CN = "{REGISTRATION_ID}"\n', ""),
            "provisioning.attestation.registration_id: a subject table needs CN",
        ),
        # principals
        (SAS_CONFIG + '[[principal]]\nname = "m"\n', "principal[0].uid: is missing"),
        (
            SAS_CONFIG + '[[principal]]\nuid = -1\nname = "m"\n',
            "principal[0].uid: -1 is out of range",
        ),
        (
            SAS_CONFIG + '[[principal]]\nuid = 4294967296\nname = "m"\n',
            "principal[0].uid: 4294967296 is out of range",
        ),
        (
            SAS_CONFIG + '[[principal]]\nuid = "1000"\nname = "m"\n',
            "principal[0].uid: expected an integer",
        ),
        (SAS_CONFIG + "[[principal]]\nuid = 1\n", "principal[0].name: is missing"),
        (
            SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nidtype = "module"\n',
            "principal[0].idtype: expected an array",
        ),
        (
            SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nidtype = ["modul"]\n',
            "principal[0].idtype: expected an array of 'device', 'module', 'local', found 'modul'",
        ),
        (
            SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nidtype = [1]\n',
            "found an integer",
        ),
        (
            SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nid_type = ["module"]\n',
            "principal[0].id_type: unknown key",
        ),
        (
            SAS_CONFIG
            + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["local"]\nlocalid = { attributes = "server" }\n',
            "principal[0].localid.type: is missing: expected one of 'x509'",
        ),
        (
            SAS_CONFIG
            + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["local"]\nlocalid = { type = "x509", attributes = "both" }\n',
            "principal[0].localid.attributes: expected one of 'client', 'server', found 'both'",
        ),
        (
            SAS_CONFIG
            + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["local"]\nlocalid = { type = "x509", attribute = "server" }\n',
            "principal[0].localid.attribute: unknown key",
        ),
        (
            SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\ncerts = ["x"]\n',
            "principal[0].certs: unknown key",
        ),
    ],
)
def test_refusal_names_file_and_key(text: str, named: str | None) -> None:
    if named is None:
        parse(text)
        return
    message = refused(text)
    assert named in message, message


# config.d ---------------------------------------------------------------------------------------


def write_paths(tmp_path: Path, base: str | None, extra: dict[str, str]) -> ServicePaths:
    config_file = tmp_path / "config.toml"
    config_dir = tmp_path / "config.d"
    if base is not None:
        config_file.write_text(base)
    config_dir.mkdir()
    for name, text in extra.items():
        (config_dir / name).write_text(text)
    return ServicePaths("identityd", config_file, config_dir)


def test_config_d_principals_accumulate(tmp_path: Path) -> None:
    paths = write_paths(
        tmp_path,
        SAS_CONFIG + '[[principal]]\nuid = 1\nname = "base"\nidtype = ["device"]\n',
        {
            "50-edge.toml": '[[principal]]\nuid = 2\nname = "edged"\n',
            "60-modules.toml": (
                '[[principal]]\nuid = 3\nname = "m1"\nidtype = ["module"]\n'
                '[[principal]]\nuid = 4\nname = "m2"\nidtype = ["module", "local"]\n'
                f'[localid]\ndomain = "{DOMAIN}"\n'
            ),
            "70-timeout.toml": "cloud_timeout_sec = 120\n",
            "ignored.txt": "not toml at all [",
        },
    )
    config = load_identityd(paths)
    assert [p.name for p in config.principal] == ["base", "edged", "m1", "m2"]
    assert config.principal[3] == Principal(4, "m2", ["module", "local"])
    assert config.localid == LocalId(DOMAIN)
    assert config.cloud_timeout_sec == 120
    assert config.provisioning.kind == SAS_PROVISIONING.kind


def test_config_d_overrides_provisioning_keys(tmp_path: Path) -> None:
    paths = write_paths(
        tmp_path,
        SAS_CONFIG,
        {"10-hub.toml": '[provisioning]\niothub_hostname = "other-hub"\n'},
    )
    kind = load_identityd(paths).provisioning.kind
    assert isinstance(kind, Manual) and kind.iothub_hostname == "other-hub"


def test_config_d_refusal_names_the_file(tmp_path: Path) -> None:
    paths = write_paths(
        tmp_path,
        SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nidtype = ["module"]\n',
        {
            "50-a.toml": '[[principal]]\nuid = 2\nname = "ok"\n',
            "60-b.toml": '[[principal]]\nuid = 3\nname = "m"\nidtype = ["module"]\n',
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    # Each principal where its file has it: the third is the drop-in's first, on its line 1.
    first_line = SAS_CONFIG.count("\n") + 1
    assert str(caught.value) == (
        f"{paths.config_dir / '60-b.toml'}:3: principal[2].name: duplicate module name 'm' "
        f"(also principal[0] ({paths.config_file}:{first_line}))"
    )


def test_config_d_unknown_key_names_the_file(tmp_path: Path) -> None:
    paths = write_paths(
        tmp_path, SAS_CONFIG, {"50-typo.toml": '[provisioning]\ndevice_idd = "x"\n'}
    )
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    assert str(caught.value).startswith(
        f"{paths.config_dir / '50-typo.toml'}:2: provisioning.device_idd: unknown key"
    )


def test_config_d_missing_key_names_the_table_file(tmp_path: Path) -> None:
    paths = write_paths(tmp_path, HEAD, {"50-p.toml": '[provisioning]\nsource = "manual"\n'})
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    # Placed at the table the drop-in gave, in that file.
    expected = f"{paths.config_dir / '50-p.toml'}:1: provisioning.iothub_hostname: is missing"
    assert str(caught.value).startswith(expected)


def test_single_file_refusal_names_it(tmp_path: Path) -> None:
    paths = write_paths(tmp_path, "cloud_timeout_sec = 10\n" + SAS_CONFIG, {})
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    assert str(caught.value).startswith(f"{paths.config_file}:1: cloud_timeout_sec: 10 is out")


def test_a_refusal_of_a_text_names_the_line_of_an_inline_key() -> None:
    text = (
        SAS_CONFIG
        + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["local"]\n'
        + '[[principal]]\nuid = 2\nname = "n"\nidtype = ["local"]\n'
        + 'localid = { type = "x509", attribute = "server" }\n'
    )
    with pytest.raises(ConfigError) as caught:
        parse_identityd(tomli.loads(text), Source(SOURCE, text))
    line = text.count("\n")
    assert str(caught.value).startswith(
        f"{SOURCE}:{line}: principal[1].localid.attribute: unknown key"
    )


def test_missing_files(tmp_path: Path) -> None:
    paths = ServicePaths("identityd", tmp_path / "none.toml", tmp_path / "none.d")
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    assert (
        str(caught.value)
        == f"{tmp_path / 'none.toml'} (missing): hostname: is missing: expected the device's host name"
    )


def test_config_d_only(tmp_path: Path) -> None:
    paths = write_paths(tmp_path, None, {"00-all.toml": SAS_CONFIG})
    assert load_identityd(paths) == parse(SAS_CONFIG)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    paths = write_paths(tmp_path, SAS_CONFIG, {"50-bad.toml": "[[principal]\n"})
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    assert str(caught.value).startswith(f"{paths.config_dir / '50-bad.toml'}: not valid TOML")
