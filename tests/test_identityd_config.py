"""identityd's config in process: the original's sample configs and `aziotctl config apply`'s
golden identityd.toml outputs parsed to every field, the defaults, `config.d` merged with
principals accumulating, the refusals of the original's `Settings::check`, and every refusal
naming the file and the key (spec/provisioning.md §4.1, §8.5, §8.7; spec/api.md §2.3, §5.5).

The original ignores keys it does not know (serde); here they stop the start.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tomli

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
from aziot.config.table import Source

SOURCE = "/etc/aziot/identityd/config.toml"
HOMEDIR = Path("/var/lib/aziot/identityd")

HEAD = """
hostname = "iotedge"
homedir = "/var/lib/aziot/identityd"
"""

MANUAL_SAS = """
[provisioning]
source = "manual"
iothub_hostname = "hubname"
device_id = "deviceid"

[provisioning.authentication]
method = "sas"
device_id_pk = "sas"
"""

# The original's aziot-identityd-config test configs, verbatim.
GOOD_SAS_CONFIG = HEAD + MANUAL_SAS

GOOD_DPS_CONFIG = (
    HEAD
    + """
[provisioning]
source = "dps"
"global_endpoint" = "http://globaldevices.net"
"scope_id" = "scope"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "regid"
symmetric_key = "dps"
"""
)

GOOD_DPS_WITH_PAYLOAD = GOOD_DPS_CONFIG.replace(
    '"scope_id" = "scope"\n',
    '"scope_id" = "scope"\npayload = { uri = "file:///tmp/complex_payload.json" }\n',
)

# The original's aziot-identityd test configs, verbatim.
GOOD_AUTH_SETTINGS = (
    HEAD
    + """
# Local ID settings
[localid]
domain = "example.com"

[[principal]]
name = "hostdaemon1"
uid = 1001

[[principal]]
name = "hostprocess1"
idtype = ["device"]
uid = 1002

[[principal]]
name = "hostprocess2"
idtype = ["module", "local"]
uid = 1003
"""
    + MANUAL_SAS
)

GOOD_LOCAL_OPTS = (
    HEAD
    + """
[connect]
api_uri = "unix:///var/run/aziot/identityd.sock"

[listen]
api_uri = "unix:///var/run/aziot/identityd.sock"

[endpoints]
aziot_certd = "unix:///var/run/aziot/certd.sock"
aziot_keyd = "unix:///var/run/aziot/keyd.sock"
aziot_identityd = "unix:///var/run/aziot/identityd.sock"
aziot_tpmd = "unix:///var/run/aziot/tpmd.sock"

[provisioning]
source = "none"

[localid]
domain = "example.com"

[[principal]]
uid = 1000
name = "module1"
idtype = ["local"]

[[principal]]
uid = 1001
name = "module2"
idtype = ["local"]
localid = { type = "x509" }

[[principal]]
uid = 1002
name = "module3"
idtype = ["local"]
localid = { type = "x509", attributes = "server" }
"""
)

BAD_CONFIG = GOOD_DPS_CONFIG.replace('source = "dps"', 'source = "dps2" #Incorrect source type')

BAD_LOCAL_CONFIG = GOOD_DPS_CONFIG.replace(
    "[provisioning.attestation]",
    """# Principal specifies local id, but [localid] not in settings.
[[principal]]
uid = 1001
name = "hostdaemon1"
idtype = ["local"]

[provisioning.attestation]""",
)

# aziotctl config apply's golden outputs (aziotctl-common/test-files/apply/*/identityd.toml).
APPLY_HEAD = """hostname = "my-device"
homedir = "/var/lib/aziot/identityd"
prefer_module_identity_cache = false
"""
DPS_HEAD = """
[provisioning]
source = "dps"
global_endpoint = "https://global.azure-devices-provisioning.net/"
scope_id = "0ab1234C5D6"
"""
MANUAL_HEAD = """
[provisioning]
source = "manual"
iothub_hostname = "example.azure-devices.net"
device_id = "my-device"
"""
APPLY_LOCAL_GATEWAY = (
    APPLY_HEAD
    + """
[provisioning]
local_gateway_hostname = "my-gateway-device"
source = "manual"
iothub_hostname = "example.azure-devices.net"
device_id = "my-device"

[provisioning.authentication]
method = "sas"
device_id_pk = "device-id"
"""
)
APPLY_DPS_TPM = (
    APPLY_HEAD
    + DPS_HEAD
    + """
[provisioning.attestation]
method = "tpm"
registration_id = "my-device"
"""
)
APPLY_DPS_X509_AUTO_RENEW = (
    APPLY_HEAD
    + DPS_HEAD
    + """
[provisioning.attestation]
method = "x509"
identity_cert = "device-id"
identity_pk = "device-id"

[provisioning.attestation.registration_id]
CN = "my-device"
L = "AQ"
ST = "Antarctica"

[provisioning.attestation.identity_auto_renew]
rotate_key = false
threshold = "50%"
retry = "10%"
"""
)
APPLY_DPS_X509_STRING_ID = (
    APPLY_HEAD
    + DPS_HEAD
    + """
[provisioning.attestation]
method = "x509"
identity_cert = "device-id"
identity_pk = "device-id"
registration_id = "my-device"

[provisioning.attestation.identity_auto_renew]
rotate_key = true
threshold = "90%"
retry = "1%"
"""
)
APPLY_MANUAL_X509_SUBJECT = (
    APPLY_HEAD
    + MANUAL_HEAD
    + """
[provisioning.authentication]
method = "x509"
identity_cert = "device-id"
identity_pk = "device-id"

[provisioning.authentication.csr_subject]
CN = "my-device"
L = "AQ"
ST = "Antarctica"
"""
)
APPLY_MANUAL_X509 = (
    APPLY_HEAD
    + MANUAL_HEAD
    + """
[provisioning.authentication]
method = "x509"
identity_cert = "device-id"
identity_pk = "device-id"
"""
)
APPLY_THROTTLE = (
    APPLY_HEAD.replace("= false", "= true")
    + "max_requests = 50\n"
    + MANUAL_HEAD
    + """
[provisioning.authentication]
method = "sas"
device_id_pk = "device-id"
"""
)

HUB = "example.azure-devices.net"
DPS_ENDPOINT = "https://global.azure-devices-provisioning.net/"


def parse(text: str) -> IdentitydConfig:
    return parse_identityd(tomli.loads(text), SOURCE)


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: "), message
    return message


def basic(provisioning: Provisioning, **fields: object) -> IdentitydConfig:
    return IdentitydConfig("iotedge", HOMEDIR, provisioning, **fields)  # type: ignore[arg-type]


def applied(provisioning: Provisioning, **fields: object) -> IdentitydConfig:
    return IdentitydConfig("my-device", HOMEDIR, provisioning, **fields)  # type: ignore[arg-type]


# The original's samples --------------------------------------------------------------------------


def test_original_good_sas_config() -> None:
    assert parse(GOOD_SAS_CONFIG) == basic(
        Provisioning(Manual("hubname", "deviceid", ManualSas("sas")))
    )


def test_original_good_dps_config() -> None:
    config = parse(GOOD_DPS_CONFIG)
    assert config == basic(
        Provisioning(
            Dps("http://globaldevices.net", "scope", SymmetricKeyAttestation("regid", "dps"))
        )
    )
    assert config.provisioning.source == "dps"


def test_original_dps_config_with_payload() -> None:
    config = parse(GOOD_DPS_WITH_PAYLOAD)
    assert isinstance(config.provisioning.kind, Dps)
    payload = config.provisioning.kind.payload
    assert payload == Payload("file:///tmp/complex_payload.json")
    assert payload.path == Path("/tmp/complex_payload.json")


def test_original_good_auth_settings() -> None:
    config = parse(GOOD_AUTH_SETTINGS)
    assert config.localid == LocalId("example.com")
    assert config.principal == [
        Principal(1001, "hostdaemon1"),
        Principal(1002, "hostprocess1", ["device"]),
        Principal(1003, "hostprocess2", ["module", "local"]),
    ]


def test_original_good_local_opts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aziot.config.identityd"):
        config = parse(GOOD_LOCAL_OPTS)
    assert config == basic(
        Provisioning(NoProvisioning()),
        localid=LocalId("example.com"),
        endpoints=Endpoints(
            aziot_certd="unix:///var/run/aziot/certd.sock",
            aziot_identityd="unix:///var/run/aziot/identityd.sock",
            aziot_keyd="unix:///var/run/aziot/keyd.sock",
            aziot_tpmd="unix:///var/run/aziot/tpmd.sock",
        ),
        principal=[
            Principal(1000, "module1", ["local"]),
            Principal(1001, "module2", ["local"], LocalIdOpts("x509", "client")),
            Principal(1002, "module3", ["local"], LocalIdOpts("x509", "server")),
        ],
    )
    # The old [connect] and [listen] tables are ignored, as serde does, but said.
    assert "connect: ignored" in caplog.text and "listen: ignored" in caplog.text


def test_original_bad_config_refused() -> None:
    message = refused(BAD_CONFIG)
    assert "provisioning.source" in message and "'dps2'" in message


def test_original_bad_local_config_refused() -> None:
    message = refused(BAD_LOCAL_CONFIG)
    assert "principal[0].idtype" in message and "[localid]" in message


# aziotctl config apply's outputs ----------------------------------------------------------------


def test_apply_local_gateway() -> None:
    assert parse(APPLY_LOCAL_GATEWAY) == applied(
        Provisioning(Manual(HUB, "my-device", ManualSas("device-id")), "my-gateway-device")
    )


def test_apply_dps_tpm() -> None:
    assert parse(APPLY_DPS_TPM) == applied(
        Provisioning(Dps(DPS_ENDPOINT, "0ab1234C5D6", TpmAttestation("my-device")))
    )


def test_apply_dps_x509_subject_and_auto_renew() -> None:
    assert parse(APPLY_DPS_X509_AUTO_RENEW) == applied(
        Provisioning(
            Dps(
                DPS_ENDPOINT,
                "0ab1234C5D6",
                X509Attestation(
                    "device-id",
                    "device-id",
                    CsrSubject("my-device", {"L": "AQ", "ST": "Antarctica"}),
                    AutoRenew(rotate_key=False, threshold="50%", retry="10%"),
                ),
            )
        )
    )


def test_apply_dps_x509_string_registration_id() -> None:
    config = parse(APPLY_DPS_X509_STRING_ID)
    assert isinstance(config.provisioning.kind, Dps)
    assert config.provisioning.kind.attestation == X509Attestation(
        "device-id", "device-id", CsrSubject("my-device"), AutoRenew(True, "90%", "1%")
    )


def test_apply_manual_x509() -> None:
    assert parse(APPLY_MANUAL_X509) == applied(
        Provisioning(Manual(HUB, "my-device", ManualX509("device-id", "device-id")))
    )
    assert parse(APPLY_MANUAL_X509_SUBJECT).provisioning.kind == Manual(
        HUB,
        "my-device",
        ManualX509(
            "device-id", "device-id", CsrSubject("my-device", {"L": "AQ", "ST": "Antarctica"})
        ),
    )


def test_apply_throttle_and_prefer_cache() -> None:
    config = parse(APPLY_THROTTLE)
    assert config.max_requests == 50
    assert config.prefer_module_identity_cache is True


# Defaults and values -----------------------------------------------------------------------------


def test_defaults() -> None:
    config = parse(GOOD_SAS_CONFIG)
    assert config.prefer_module_identity_cache is False
    assert config.max_requests == 10
    assert config.cloud_timeout_sec == 70
    assert config.cloud_retries == 1
    assert config.principal == []
    assert config.localid is None
    assert config.endpoints == Endpoints()
    assert config.provisioning.local_gateway_hostname is None


def test_cloud_knobs() -> None:
    config = parse(
        "cloud_timeout_sec = 300\ncloud_retries = 0\nmax_requests = 3\n" + GOOD_SAS_CONFIG
    )
    assert (config.cloud_timeout_sec, config.cloud_retries, config.max_requests) == (300, 0, 3)


def test_csr_subject_keys_upper_cased_and_sorted() -> None:
    text = (
        APPLY_MANUAL_X509 + 'csr_subject = { st = "Antarctica", cn = "x", o = "Org", L = "AQ" }\n'
    )
    kind = parse(text).provisioning.kind
    assert isinstance(kind, Manual) and isinstance(kind.authentication, ManualX509)
    subject = kind.authentication.csr_subject
    assert subject == CsrSubject("x", {"L": "AQ", "O": "Org", "ST": "Antarctica"})
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
        GOOD_SAS_CONFIG
        + '[[principal]]\nuid = 5\nname = "a"\n[[principal]]\nuid = 5\nname = "b"\nidtype = ["module"]\n'
    )
    message = refused(text)
    assert "principal[1].uid" in message and "uid 5 already has a principal" in message
    assert "principal[0]" in message


# Refusals: Settings::check ----------------------------------------------------------------------


def test_duplicate_principal_names_refused() -> None:
    text = (
        GOOD_SAS_CONFIG
        + '[[principal]]\nuid = 1\nname = "m"\n[[principal]]\nuid = 2\nname = "m"\nidtype = ["module"]\n'
    )
    message = refused(text)
    assert "principal[1].name" in message and "duplicate module name 'm'" in message
    assert "principal[0]" in message


def test_localid_options_without_local_refused() -> None:
    text = (
        GOOD_SAS_CONFIG
        + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["module"]\n'
        + 'localid = { type = "x509" }\n'
    )
    message = refused(text)
    assert "principal[0].localid" in message and "non-local" in message


def test_localid_options_on_untyped_principal_refused() -> None:
    text = (
        GOOD_SAS_CONFIG
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
    text = GOOD_DPS_CONFIG.replace(
        'source = "dps"', 'source = "dps"\nlocal_gateway_hostname = "gw"'
    )
    message = refused(text)
    assert "provisioning.local_gateway_hostname" in message and "nested mode" in message


# Refusals: keys, types, values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        # top level
        (GOOD_SAS_CONFIG.replace('hostname = "iotedge"\n', ""), "hostname: is missing"),
        (
            GOOD_SAS_CONFIG.replace('homedir = "/var/lib/aziot/identityd"\n', ""),
            "homedir: is missing",
        ),
        (HEAD, "provisioning: is missing"),
        ("hostname = 5\n" + GOOD_SAS_CONFIG.split("\n", 2)[2], "hostname: expected a string"),
        ("cloud_timeout_sec = 69\n" + GOOD_SAS_CONFIG, "cloud_timeout_sec: 69 is out of range"),
        ('cloud_timeout_sec = "70"\n' + GOOD_SAS_CONFIG, "cloud_timeout_sec: expected an integer"),
        ("cloud_retries = -1\n" + GOOD_SAS_CONFIG, "cloud_retries: -1 is out of range"),
        ("cloud_retries = 4294967296\n" + GOOD_SAS_CONFIG, "cloud_retries: 4294967296 is out"),
        ("max_requests = 0\n" + GOOD_SAS_CONFIG, "max_requests: 0 is out of range"),
        (
            'prefer_module_identity_cache = "yes"\n' + GOOD_SAS_CONFIG,
            "prefer_module_identity_cache: expected true or false",
        ),
        ("cloud_timeout = 100\n" + GOOD_SAS_CONFIG, "cloud_timeout: unknown key"),
        ("principal = 5\n" + GOOD_SAS_CONFIG, "principal: expected an array of tables"),
        (GOOD_SAS_CONFIG + "[localid]\n", "localid.domain: is missing"),
        (
            GOOD_SAS_CONFIG + '[localid]\ndomain = "d"\ndomian = "d"\n',
            "localid.domian: unknown key",
        ),
        (GOOD_SAS_CONFIG + '[endpoints]\naziot_keyd = "/run/keyd.sock"\n', "endpoints.aziot_keyd"),
        (
            GOOD_SAS_CONFIG + '[endpoints]\naziot_keys = "unix:///k"\n',
            "endpoints.aziot_keys: unknown key",
        ),
        (GOOD_SAS_CONFIG + "[connect]\napi_uri = 5\n", None),  # legacy, ignored
        ("connect = 5\n" + GOOD_SAS_CONFIG, "connect: expected a table"),
        # provisioning
        (
            GOOD_SAS_CONFIG.replace('source = "manual"\n', ""),
            "provisioning.source: is missing: expected one of",
        ),
        (GOOD_SAS_CONFIG.replace('"manual"', '"Manual"'), "provisioning.source: expected one of"),
        (
            GOOD_SAS_CONFIG.replace('"manual"', '"none"'),
            "provisioning.authentication: unknown key (and provisioning.device_id, provisioning.iothub_hostname)",
        ),
        (
            GOOD_SAS_CONFIG.replace('device_id = "deviceid"', 'device_id = ""'),
            "provisioning.device_id: is empty",
        ),
        (
            GOOD_SAS_CONFIG.replace('device_id = "deviceid"', "device_id = 1"),
            "provisioning.device_id: expected a string",
        ),
        (
            GOOD_SAS_CONFIG.replace('iothub_hostname = "hubname"\n', ""),
            "provisioning.iothub_hostname: is missing",
        ),
        (
            GOOD_SAS_CONFIG.replace('hubname"', 'hubname"\nhub_name = "x"'),
            "provisioning.hub_name: unknown key",
        ),
        (
            GOOD_SAS_CONFIG.replace(
                'hubname"',
                'hubname"\nconnection_string = "HostName=h;DeviceId=d;SharedAccessKey=k"',
            ),
            "provisioning.connection_string: identityd does not read connection strings",
        ),
        (
            GOOD_SAS_CONFIG.replace('method = "sas"', 'method = "symmetric_key"'),
            "provisioning.authentication.method: expected one of 'sas', 'x509', found 'symmetric_key'",
        ),
        (
            GOOD_SAS_CONFIG.replace('device_id_pk = "sas"', 'device_id_pk = { value = "abc=" }'),
            "provisioning.authentication.device_id_pk: expected a string, found a table",
        ),
        (
            GOOD_SAS_CONFIG.replace(
                'device_id_pk = "sas"', 'device_id_pk = "sas"\nidentity_cert = "c"'
            ),
            "provisioning.authentication.identity_cert: unknown key",
        ),
        (
            HEAD + MANUAL_SAS.split("[provisioning.authentication]")[0],
            "provisioning.authentication: is missing",
        ),
        (
            APPLY_MANUAL_X509.replace('identity_pk = "device-id"\n', ""),
            "provisioning.authentication.identity_pk: is missing",
        ),
        (
            APPLY_MANUAL_X509 + 'csr_subject = { L = "AQ" }\n',
            "provisioning.authentication.csr_subject: a subject table needs CN",
        ),
        (
            APPLY_MANUAL_X509 + "csr_subject = 5\n",
            "provisioning.authentication.csr_subject: expected a common name",
        ),
        (
            APPLY_MANUAL_X509 + 'csr_subject = { CN = "a", L = 1 }\n',
            "provisioning.authentication.csr_subject.L: expected a string",
        ),
        (
            APPLY_MANUAL_X509 + 'csr_subject = { CN = "a", cn = "b" }\n',
            "provisioning.authentication.csr_subject.cn: CN is given twice",
        ),
        # dps
        (
            GOOD_DPS_CONFIG.replace("http://globaldevices.net", "globaldevices.net"),
            "provisioning.global_endpoint: 'globaldevices.net' is not an http:// or https:// URL",
        ),
        (
            GOOD_DPS_CONFIG.replace("http://globaldevices.net", "ftp://globaldevices.net"),
            "provisioning.global_endpoint: 'ftp://",
        ),
        (
            GOOD_DPS_CONFIG.replace('"scope_id"', '"id_scope"'),
            "provisioning.id_scope: identityd's config spells it scope_id",
        ),
        (
            GOOD_DPS_CONFIG.replace('"scope_id" = "scope"\n', ""),
            "provisioning.scope_id: is missing",
        ),
        (
            GOOD_DPS_WITH_PAYLOAD.replace("file:///tmp", "https://example.com"),
            "provisioning.payload.uri: 'https://example.com/complex_payload.json' is not a file:// URI",
        ),
        (
            GOOD_DPS_WITH_PAYLOAD.replace("file:///tmp", "file://otherhost/tmp"),
            "provisioning.payload.uri",
        ),
        (
            GOOD_DPS_WITH_PAYLOAD.replace('uri = "file', 'url = "file'),
            "provisioning.payload.uri: is missing",
        ),
        (
            GOOD_DPS_WITH_PAYLOAD.replace(
                'payload = { uri = "file:///tmp/complex_payload.json" }',
                'payload = "file:///tmp/p.json"',
            ),
            "provisioning.payload: expected a table",
        ),
        (
            GOOD_DPS_WITH_PAYLOAD.replace('.json" }', '.json", extra = 1 }'),
            "provisioning.payload.extra: unknown key",
        ),
        (
            GOOD_DPS_CONFIG.split("[provisioning.attestation]")[0],
            "provisioning.attestation: is missing",
        ),
        (
            GOOD_DPS_CONFIG.replace('method = "symmetric_key"', 'method = "sas"'),
            "provisioning.attestation.method: expected one of",
        ),
        (
            GOOD_DPS_CONFIG.replace('registration_id = "regid"\n', ""),
            "provisioning.attestation.registration_id: is missing",
        ),
        (
            GOOD_DPS_CONFIG.replace('symmetric_key = "dps"', 'symmetric_key = { value = "abc=" }'),
            "provisioning.attestation.symmetric_key: expected a string",
        ),
        (
            GOOD_DPS_CONFIG.replace(
                'symmetric_key = "dps"', 'symmetric_key = "dps"\nregistraton_id = "x"'
            ),
            "provisioning.attestation.registraton_id: unknown key",
        ),
        (
            APPLY_DPS_TPM + 'identity_cert = "c"\n',
            "provisioning.attestation.identity_cert: unknown key",
        ),
        (
            APPLY_DPS_TPM.replace(
                'registration_id = "my-device"', 'registration_id = { CN = "x" }'
            ),
            "provisioning.attestation.registration_id: expected a string",
        ),
        (
            APPLY_DPS_X509_AUTO_RENEW.replace("rotate_key = false\n", ""),
            "provisioning.attestation.identity_auto_renew.rotate_key: is missing",
        ),
        (
            APPLY_DPS_X509_AUTO_RENEW.replace('threshold = "50%"\n', ""),
            "provisioning.attestation.identity_auto_renew.threshold: is missing",
        ),
        (
            APPLY_DPS_X509_AUTO_RENEW.replace('retry = "10%"\n', ""),
            "provisioning.attestation.identity_auto_renew.retry: is missing",
        ),
        (
            APPLY_DPS_X509_AUTO_RENEW.replace('retry = "10%"', "retry = 10"),
            "provisioning.attestation.identity_auto_renew.retry: expected a string",
        ),
        (
            APPLY_DPS_X509_AUTO_RENEW + "rotate = true\n",
            "provisioning.attestation.identity_auto_renew.rotate: unknown key",
        ),
        (
            APPLY_DPS_X509_AUTO_RENEW.replace('CN = "my-device"\n', ""),
            "provisioning.attestation.registration_id: a subject table needs CN",
        ),
        # principals
        (GOOD_SAS_CONFIG + '[[principal]]\nname = "m"\n', "principal[0].uid: is missing"),
        (
            GOOD_SAS_CONFIG + '[[principal]]\nuid = -1\nname = "m"\n',
            "principal[0].uid: -1 is out of range",
        ),
        (
            GOOD_SAS_CONFIG + '[[principal]]\nuid = 4294967296\nname = "m"\n',
            "principal[0].uid: 4294967296 is out of range",
        ),
        (
            GOOD_SAS_CONFIG + '[[principal]]\nuid = "1000"\nname = "m"\n',
            "principal[0].uid: expected an integer",
        ),
        (GOOD_SAS_CONFIG + "[[principal]]\nuid = 1\n", "principal[0].name: is missing"),
        (
            GOOD_SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nidtype = "module"\n',
            "principal[0].idtype: expected an array",
        ),
        (
            GOOD_SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nidtype = ["modul"]\n',
            "principal[0].idtype: expected an array of 'device', 'module', 'local', found 'modul'",
        ),
        (
            GOOD_SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nidtype = [1]\n',
            "found an integer",
        ),
        (
            GOOD_SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nid_type = ["module"]\n',
            "principal[0].id_type: unknown key",
        ),
        (
            GOOD_SAS_CONFIG
            + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["local"]\nlocalid = { attributes = "server" }\n',
            "principal[0].localid.type: is missing: expected one of 'x509'",
        ),
        (
            GOOD_SAS_CONFIG
            + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["local"]\nlocalid = { type = "x509", attributes = "both" }\n',
            "principal[0].localid.attributes: expected one of 'client', 'server', found 'both'",
        ),
        (
            GOOD_SAS_CONFIG
            + '[localid]\ndomain = "d"\n[[principal]]\nuid = 1\nname = "m"\nidtype = ["local"]\nlocalid = { type = "x509", attribute = "server" }\n',
            "principal[0].localid.attribute: unknown key",
        ),
        (
            GOOD_SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\ncerts = ["x"]\n',
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
        GOOD_SAS_CONFIG + '[[principal]]\nuid = 1\nname = "base"\nidtype = ["device"]\n',
        {
            "50-edge.toml": '[[principal]]\nuid = 2\nname = "edged"\n',
            "60-modules.toml": (
                '[[principal]]\nuid = 3\nname = "m1"\nidtype = ["module"]\n'
                '[[principal]]\nuid = 4\nname = "m2"\nidtype = ["module", "local"]\n'
                '[localid]\ndomain = "example.com"\n'
            ),
            "70-timeout.toml": "cloud_timeout_sec = 120\n",
            "ignored.txt": "not toml at all [",
        },
    )
    config = load_identityd(paths)
    assert [p.name for p in config.principal] == ["base", "edged", "m1", "m2"]
    assert config.principal[3] == Principal(4, "m2", ["module", "local"])
    assert config.localid == LocalId("example.com")
    assert config.cloud_timeout_sec == 120
    assert config.provisioning.kind == Manual("hubname", "deviceid", ManualSas("sas"))


def test_config_d_overrides_provisioning_keys(tmp_path: Path) -> None:
    paths = write_paths(
        tmp_path,
        GOOD_SAS_CONFIG,
        {"10-hub.toml": '[provisioning]\niothub_hostname = "other-hub"\n'},
    )
    kind = load_identityd(paths).provisioning.kind
    assert isinstance(kind, Manual) and kind.iothub_hostname == "other-hub"


def test_config_d_refusal_names_the_file(tmp_path: Path) -> None:
    paths = write_paths(
        tmp_path,
        GOOD_SAS_CONFIG + '[[principal]]\nuid = 1\nname = "m"\nidtype = ["module"]\n',
        {
            "50-a.toml": '[[principal]]\nuid = 2\nname = "ok"\n',
            "60-b.toml": '[[principal]]\nuid = 3\nname = "m"\nidtype = ["module"]\n',
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    # Each principal where its file has it: the third is the drop-in's first, on its line 1.
    first_line = GOOD_SAS_CONFIG.count("\n") + 1
    assert str(caught.value) == (
        f"{paths.config_dir / '60-b.toml'}:3: principal[2].name: duplicate module name 'm' "
        f"(also principal[0] ({paths.config_file}:{first_line}))"
    )


def test_config_d_unknown_key_names_the_file(tmp_path: Path) -> None:
    paths = write_paths(
        tmp_path, GOOD_SAS_CONFIG, {"50-typo.toml": '[provisioning]\ndevice_idd = "x"\n'}
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
    paths = write_paths(tmp_path, "cloud_timeout_sec = 10\n" + GOOD_SAS_CONFIG, {})
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    assert str(caught.value).startswith(f"{paths.config_file}:1: cloud_timeout_sec: 10 is out")


def test_a_refusal_of_a_text_names_the_line_of_an_inline_key() -> None:
    text = (
        GOOD_SAS_CONFIG
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
    paths = write_paths(tmp_path, None, {"00-all.toml": GOOD_SAS_CONFIG})
    assert load_identityd(paths) == parse(GOOD_SAS_CONFIG)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    paths = write_paths(tmp_path, GOOD_SAS_CONFIG, {"50-bad.toml": "[[principal]\n"})
    with pytest.raises(ConfigError) as caught:
        load_identityd(paths)
    assert str(caught.value).startswith(f"{paths.config_dir / '50-bad.toml'}: not valid TOML")
