"""certd's config in process: a hand-written config of every shape the parser reads, parsed to
every field; `config.d` merged, the defaults, and every refusal naming the file and the key
(spec/provisioning.md §4.3, spec/api.md §4.2–§4.4; the behaviour is the original's
aziot-certd-config, the values were made up for this project). Three tests start a real aziotd.

The original ignores keys it does not know (serde `flatten`); here they stop the start, so a
misspelt key is found when the device is installed rather than at its first EST enrollment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli

from aziot.config.certd import (
    AutoRenew,
    BasicAuth,
    CertdConfig,
    CertKey,
    Endpoints,
    Est,
    EstAuth,
    IssuanceOptions,
    Principal,
    load_certd,
    parse_certd,
)
from aziot.config.loader import ConfigError, ServicePaths
from aziot.config.table import Source
from aziot.supervisor.services.certd import check_certd, load_checked
from tests.certd_world import certd_config, start_certd
from tests.daemon import Daemon, keyd_config

SOURCE = "/etc/aziot/certd/config.toml"
HOME = 'homedir_path = "/var/lib/aziot/certd"\n'

# Every shape the parser reads, written for the kiln works' gateway: inline tables (one closed
# without a space), a full EST table with quoted subject keys, the global EST table, arrays
# indented with tabs, preloaded certs of both kinds, and a principal.
SAMPLE_HOMEDIR = "/srv/kiln/certd"
SAMPLE = f"""
# certd on the kiln works' gateway
homedir_path = "{SAMPLE_HOMEDIR}"
max_requests = 24

[cert_issuance]
kiln-edge-ca = {{ method = "est", common_name = "Kiln Edge CA" }}
kiln-module-id = {{ method = "self_signed", common_name = "kiln-module", expiry_days = 45}}
kiln-tls = {{ method = "local_ca" }}

[cert_issuance.glaze-id]
method = "est"
expiry_days = 120
url = "https://est.kiln.example/.well-known/est/glaze/"
username = "kiln-enrol"
password = "fired-clay-9"
identity_cert = "glaze-est-client"
identity_pk = "glaze-est-client-key"
bootstrap_identity_cert = "kiln-factory"
bootstrap_identity_pk = "kiln-factory-key"
subject = {{ "OU" = "Glazing", "CN" = "glaze-line-3", "O" = "Kiln Works" }}

[cert_issuance.est]
trusted_certs = [
\t"kiln-est-root",
]
identity_cert = "kiln-est-client"
identity_pk = "kiln-est-client-key"
bootstrap_identity_cert = "kiln-factory"
bootstrap_identity_pk = "kiln-factory-key"

[cert_issuance.est.identity_auto_renew]
rotate_key = false
threshold = "14day"
retry = "6%"

[cert_issuance.est.urls]
default = "https://est.kiln.example/.well-known/est/"
kiln-edge-ca = "https://est.kiln.example/.well-known/est/edge-ca/"

[preloaded_certs]
kiln-factory = "file:///srv/kiln/secrets/factory.pem"
kiln-est-root = "file:///srv/kiln/secrets/est-root.pem"
kiln-trust = [
\t"kiln-est-root",
]

[[principal]]
uid = 2201
certs = ["kiln-*"]
"""

SAMPLE_EXPECTED = CertdConfig(
    homedir=Path(SAMPLE_HOMEDIR),
    max_requests=24,
    est=Est(
        trusted_certs=["kiln-est-root"],
        auth=EstAuth(
            basic=None,
            identity=CertKey("kiln-est-client", "kiln-est-client-key"),
            bootstrap_identity=CertKey("kiln-factory", "kiln-factory-key"),
        ),
        identity_auto_renew=AutoRenew(rotate_key=False, threshold="14day", retry="6%"),
        urls={
            "default": "https://est.kiln.example/.well-known/est/",
            "kiln-edge-ca": "https://est.kiln.example/.well-known/est/edge-ca/",
        },
    ),
    local_ca=None,
    certs={
        "kiln-edge-ca": IssuanceOptions("est", common_name="Kiln Edge CA"),
        "kiln-module-id": IssuanceOptions("self_signed", expiry_days=45, common_name="kiln-module"),
        "kiln-tls": IssuanceOptions("local_ca"),
        "glaze-id": IssuanceOptions(
            "est",
            expiry_days=120,
            subject={"OU": "Glazing", "CN": "glaze-line-3", "O": "Kiln Works"},
            url="https://est.kiln.example/.well-known/est/glaze/",
            auth=EstAuth(
                basic=BasicAuth("kiln-enrol", "fired-clay-9"),
                identity=CertKey("glaze-est-client", "glaze-est-client-key"),
                bootstrap_identity=CertKey("kiln-factory", "kiln-factory-key"),
            ),
        ),
    },
    preloaded_certs={
        "kiln-factory": "file:///srv/kiln/secrets/factory.pem",
        "kiln-est-root": "file:///srv/kiln/secrets/est-root.pem",
        "kiln-trust": ["kiln-est-root"],
    },
    principal=[Principal(2201, ["kiln-*"])],
    endpoints=Endpoints(),
    not_before_margin_secs=300,
)


def parse(text: str) -> CertdConfig:
    """Parse as aziotd does at start: the parser, then what only issuance can check."""
    config = parse_certd(tomli.loads(text), SOURCE)
    check_certd(config, SOURCE)
    return config


def refusal(text: str) -> str:
    """The message a refused config gives; it always begins with the file."""
    with pytest.raises(ConfigError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: "), message
    return message


def paths_in(folder: Path) -> ServicePaths:
    (folder / "config.d").mkdir(parents=True, exist_ok=True)
    return ServicePaths("certd", folder / "config.toml", folder / "config.d")


# -- what parses --------------------------------------------------------------------------------


def test_the_sample_parses_to_every_field() -> None:
    config = parse(SAMPLE)
    assert config == SAMPLE_EXPECTED
    # Field by field as well, so a mismatch says where it is.
    assert config.est == SAMPLE_EXPECTED.est
    assert config.certs == SAMPLE_EXPECTED.certs
    # The subject's names in the order written: they are the certificate's RDNs, in order.
    assert list(config.certs["glaze-id"].subject or {}) == ["OU", "CN", "O"]
    assert config.preloaded_certs == SAMPLE_EXPECTED.preloaded_certs
    assert config.principal == SAMPLE_EXPECTED.principal


def test_the_sample_read_from_its_file(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    paths.config_file.write_text(SAMPLE)
    assert load_certd(paths) == SAMPLE_EXPECTED
    assert load_checked(paths) == SAMPLE_EXPECTED


def test_the_password_stays_out_of_the_repr() -> None:
    config = parse(SAMPLE)
    assert "kiln-enrol" in repr(config.certs["glaze-id"].auth)
    assert "fired-clay-9" not in repr(config)


def test_explicit_endpoints() -> None:
    config = parse(
        HOME + "[endpoints]\n"
        'aziot_keyd = "unix:///run/kiln/keyd.sock"\n'
        'aziot_certd = "unix:///run/kiln/certd.sock"\n'
    )
    assert config == CertdConfig(
        homedir=Path("/var/lib/aziot/certd"),
        endpoints=Endpoints(
            aziot_certd="unix:///run/kiln/certd.sock", aziot_keyd="unix:///run/kiln/keyd.sock"
        ),
    )


def test_defaults() -> None:
    config = parse(HOME)
    assert config == CertdConfig(homedir=Path("/var/lib/aziot/certd"))
    assert config.max_requests == 10
    assert config.not_before_margin_secs == 300
    assert (config.est, config.local_ca) == (None, None)
    assert (config.certs, config.preloaded_certs, config.principal) == ({}, {}, [])
    assert config.endpoints == Endpoints(None, None)


def test_an_est_table_without_renewal_settings_gets_80_4_and_rotation() -> None:
    config = parse(HOME + "[cert_issuance.est]\n")
    assert config.est == Est(
        trusted_certs=[],
        auth=None,
        identity_auto_renew=AutoRenew(rotate_key=True, threshold="80%", retry="4%"),
        urls={},
    )
    est = parse(HOME + '[cert_issuance.est]\nusername = "u"\npassword = "p"\n').est
    assert est is not None and est.identity_auto_renew == AutoRenew(True, "80%", "4%")


def test_per_cert_options_default_to_none() -> None:
    config = parse(
        HOME + '[cert_issuance]\nx = { method = "est" }\ny = { method = "self_signed" }\n'
    )
    assert config.certs == {
        "x": IssuanceOptions("est", None, None, None, None, None),
        "y": IssuanceOptions("self_signed", None, None, None, None, None),
    }


def test_what_is_accepted_beside_the_sample() -> None:
    config = parse(
        HOME + "max_requests = 1\nnot_before_margin_secs = 0\n"
        "[cert_issuance]\n"
        'local_ca = { cert = "local-ca", pk = "local-ca-key" }\n'
        'basic = { method = "est", username = "u", password = "p" }\n'
        'x509 = { method = "est", identity_cert = "id", identity_pk = "id-key" }\n'
        # http:// is allowed (the original only warns).
        'plain = { method = "est", url = "http://est.local:8085/.well-known/est" }\n'
        'empty-subject = { method = "local_ca", subject = {} }\n'
        "[cert_issuance.est]\n"
        "trusted_certs = []\n"
        "identity_auto_renew = "
        '{ rotate_key = false, threshold = "30day", retry = "90min" }\n'
        # Any key of urls is a cert id.
        'urls = { "any cert" = "https://est.example/x" }\n'
        "[preloaded_certs]\n"
        "nothing = []\n"
        'chain = ["a", "b"]\n'
        "[[principal]]\n"
        "uid = 0\n"
        "certs = []\n"
    )
    assert config.max_requests == 1
    assert config.not_before_margin_secs == 0
    assert config.local_ca == CertKey("local-ca", "local-ca-key")
    assert config.certs["basic"].auth == EstAuth(basic=BasicAuth("u", "p"))
    assert config.certs["x509"].auth == EstAuth(identity=CertKey("id", "id-key"))
    assert config.certs["plain"].url == "http://est.local:8085/.well-known/est"
    assert config.certs["empty-subject"].subject == {}
    assert config.est == Est(
        [], None, AutoRenew(False, "30day", "90min"), {"any cert": "https://est.example/x"}
    )
    assert config.preloaded_certs == {"nothing": [], "chain": ["a", "b"]}
    assert config.principal == [Principal(0, [])]


# -- config.d ------------------------------------------------------------------------------------


def test_drop_ins_merge_principals_accumulate_and_add_issuance(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    paths.config_file.write_text(
        HOME + "[cert_issuance]\n"
        'device-ca = { method = "self_signed", expiry_days = 90 }\n'
        "[cert_issuance.est.urls]\n"
        'default = "https://est.example/.well-known/est/"\n'
        "[[principal]]\nuid = 1000\ncerts = ['a']\n"
    )
    (paths.config_dir / "10-edge.toml").write_text(
        "[cert_issuance.module-server]\n"
        'method = "local_ca"\n'
        "[cert_issuance.est.urls]\n"
        'device-ca = "https://est.example/ca/"\n'
        "[[principal]]\nuid = 1001\ncerts = ['aziot-edged-*']\n"
    )
    (paths.config_dir / "20-more.toml").write_text(
        "max_requests = 20\n[[principal]]\nuid = 1002\ncerts = ['b?']\n"
    )
    (paths.config_dir / "30-ignored.txt").write_text("max_requests = [")
    config = load_certd(paths)
    assert config.max_requests == 20
    assert config.principal == [
        Principal(1000, ["a"]),
        Principal(1001, ["aziot-edged-*"]),
        Principal(1002, ["b?"]),
    ]
    assert config.certs == {
        "device-ca": IssuanceOptions("self_signed", expiry_days=90),
        "module-server": IssuanceOptions("local_ca"),
    }
    assert config.est is not None
    assert config.est.urls == {
        "default": "https://est.example/.well-known/est/",
        "device-ca": "https://est.example/ca/",
    }


def test_a_drop_in_may_hold_the_whole_config(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    (paths.config_dir / "00.toml").write_text(SAMPLE)
    assert load_certd(paths) == SAMPLE_EXPECTED


# (base file after homedir_path, the drop-in, how the refusal starts after the drop-in's path)
DROP_IN_REFUSALS = [
    # The drop-in and the line the key is on, not the pair of places it might be in.
    (
        "",
        '[cert_issuance]\ndevice-ca = { method = "self_signed", expiry = 5 }\n',
        ":2: cert_issuance.device-ca.expiry: unknown key",
    ),
    # The third principal of the merged config is the drop-in's second, whose header is on
    # line 5 of that file.
    (
        "[[principal]]\nuid = 1\ncerts = ['a']\n",
        "[[principal]]\nuid = 2\ncerts = ['b']\n\n[[principal]]\nuid = 3\ncertz = ['c']\n",
        ":5: principal[2].certs: is missing",
    ),
]


@pytest.mark.parametrize(("base", "drop_in", "start"), DROP_IN_REFUSALS)
def test_a_drop_in_refusal_names_the_drop_in_its_line_and_the_key(
    tmp_path: Path, base: str, drop_in: str, start: str
) -> None:
    paths = paths_in(tmp_path)
    paths.config_file.write_text(HOME + base)
    (paths.config_dir / "10-more.toml").write_text(drop_in)
    with pytest.raises(ConfigError) as caught:
        load_certd(paths)
    assert str(caught.value).startswith(f"{paths.config_dir / '10-more.toml'}{start}")


def test_a_refusal_from_the_file_names_its_path(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    paths.config_file.write_text(HOME + "max_request = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_certd(paths)
    assert str(caught.value).startswith(f"{paths.config_file}:2: max_request: unknown key")
    paths.config_file.write_text(HOME + "[cert_issuance]\nx = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_certd(paths)


def test_a_refusal_of_a_text_names_the_line() -> None:
    text = HOME + 'max_requests = 4\n[cert_issuance]\nx = { method = "local_ca", expiry = 5 }\n'
    with pytest.raises(ConfigError) as caught:
        parse_certd(tomli.loads(text), Source(SOURCE, text))
    assert str(caught.value).startswith(f"{SOURCE}:4: cert_issuance.x.expiry: unknown key")


def test_an_unknown_subject_attribute_from_the_file_names_it(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    paths.config_file.write_text(
        HOME + '[cert_issuance]\nx = { method = "local_ca", subject = { Colour = "blue" } }\n'
    )
    load_certd(paths)  # the parser has nothing against it; issuance has
    with pytest.raises(ConfigError) as caught:
        load_checked(paths)
    message = str(caught.value)
    assert message.startswith(
        f"{paths.config_file} (+ {paths.config_dir}/*.toml): cert_issuance.x.subject: "
    )
    assert "unknown subject attribute 'Colour'" in message


# -- refusals ------------------------------------------------------------------------------------

CERT = "[cert_issuance.x]\n"
EST = "[cert_issuance.est]\n"
RENEW = "[cert_issuance.est.identity_auto_renew]\n"


# (config after homedir_path, what the message must contain)
REFUSALS = [
    # Unknown keys, in every table that has a fixed set of them.
    ("max_request = 5\n", "max_request: unknown key"),
    ("[certs_issuance]\n", "certs_issuance: unknown key"),
    (
        CERT + 'method = "self_signed"\nexpiry_day = 5\n',
        "cert_issuance.x.expiry_day: unknown key",
    ),
    (
        CERT + 'method = "est"\nidentity_key = "k"\n',
        "cert_issuance.x.identity_key: unknown key",
    ),
    (EST + 'trusted_cert = ["kiln-est-root"]\n', "cert_issuance.est.trusted_cert: unknown key"),
    # The super-config's nested auth table is not the per-service syntax.
    (
        EST + '[cert_issuance.est.auth]\nusername = "u"\npassword = "p"\n',
        "cert_issuance.est.auth: unknown key",
    ),
    (
        RENEW + 'rotate_key = true\nthreshold = "80%"\nretry = "4%"\nrotate = false\n',
        "cert_issuance.est.identity_auto_renew.rotate: unknown key",
    ),
    (
        "[[principal]]\nuid = 1\ncerts = ['a']\nkeys = ['b']\n",
        "principal[0].keys: unknown key",
    ),
    (
        "[[principal]]\nuid = 1\ncerts = ['a']\n[[principal]]\nuid = 2\ncerts = []\nkey = 1\n",
        "principal[1].key: unknown key",
    ),
    (
        '[cert_issuance]\nlocal_ca = { cert = "c", pk = "k", method = "local_ca" }\n',
        "cert_issuance.local_ca.method: unknown key",
    ),
    (
        '[endpoints]\naziot_identityd = "unix:///x.sock"\n',
        "endpoints.aziot_identityd: unknown key",
    ),
    # Keys only EST uses, under another method.
    (
        CERT + 'method = "local_ca"\nurl = "https://est.example/"\n',
        "cert_issuance.x.url: unknown key",
    ),
    (
        CERT + 'method = "self_signed"\nusername = "u"\npassword = "p"\n',
        "cert_issuance.x.password: unknown key (and cert_issuance.x.username)",
    ),
    (
        CERT + 'method = "local_ca"\nidentity_cert = "i"\nidentity_pk = "i"\n',
        "cert_issuance.x.identity_cert: unknown key (and cert_issuance.x.identity_pk)",
    ),
    (
        CERT + 'method = "self_signed"\nbootstrap_identity_cert = "b"\n',
        "cert_issuance.x.bootstrap_identity_cert: unknown key",
    ),
    # Each entry is a table with a method the original knows.
    (
        '[cert_issuance]\nworkload-ca = "local_ca"\n',
        "cert_issuance.workload-ca: expected a table, found a string",
    ),
    (
        CERT + 'method = "est2"\n',
        "cert_issuance.x.method: expected one of self_signed, local_ca, est, found 'est2'",
    ),
    (
        CERT + "expiry_days = 5\n",
        "cert_issuance.x.method: expected one of self_signed, local_ca, est, found nothing",
    ),
    (CERT + 'method = "selfSigned"\n', "found 'selfSigned'"),
    # The original's words for expiry_days = 0.
    (
        CERT + 'method = "self_signed"\nexpiry_days = 0\n',
        "cert_issuance.x.expiry_days: expiry_days must be greater than 0",
    ),
    (
        CERT + 'method = "local_ca"\nexpiry_days = -1\n',
        "cert_issuance.x.expiry_days: expiry_days must be greater than 0",
    ),
    # Halves of pairs.
    (
        CERT + 'method = "est"\nusername = "u"\n',
        "cert_issuance.x.username: is set but cert_issuance.x.password is not",
    ),
    (
        CERT + 'method = "est"\npassword = "p"\n',
        "cert_issuance.x.password: is set but cert_issuance.x.username is not",
    ),
    (
        CERT + 'method = "est"\nidentity_cert = "i"\n',
        "cert_issuance.x.identity_cert: is set but cert_issuance.x.identity_pk is not",
    ),
    (
        EST + 'identity_pk = "i"\n',
        "cert_issuance.est.identity_pk: is set but cert_issuance.est.identity_cert is not",
    ),
    (
        EST + 'identity_cert = "i"\nidentity_pk = "i"\nbootstrap_identity_cert = "b"\n',
        "cert_issuance.est.bootstrap_identity_cert: is set but "
        "cert_issuance.est.bootstrap_identity_pk is not",
    ),
    (
        EST + 'bootstrap_identity_cert = "b"\nbootstrap_identity_pk = "b"\n',
        "cert_issuance.est.bootstrap_identity_cert: is set but cert_issuance.est.identity_cert",
    ),
    (
        CERT + 'method = "est"\nusername = "u"\npassword = "p"\n'
        'bootstrap_identity_cert = "b"\nbootstrap_identity_pk = "b"\n',
        "cert_issuance.x.bootstrap_identity_cert: is set but cert_issuance.x.identity_cert",
    ),
    (
        '[cert_issuance]\nlocal_ca = { cert = "c" }\n',
        "cert_issuance.local_ca.cert: is set but cert_issuance.local_ca.pk is not",
    ),
    ("[cert_issuance]\nlocal_ca = {}\n", "cert_issuance.local_ca: needs cert"),
    # identity_auto_renew: all three keys once the table is there, as in the original.
    (RENEW + 'threshold = "80%"\nretry = "4%"\n', "identity_auto_renew.rotate_key: is missing"),
    (RENEW + 'rotate_key = true\nretry = "4%"\n', "identity_auto_renew.threshold: is missing"),
    (RENEW + 'rotate_key = true\nthreshold = "80%"\n', "identity_auto_renew.retry: is missing"),
    # One subject or the other.
    (
        CERT + 'method = "local_ca"\ncommon_name = "a"\nsubject = { CN = "b" }\n',
        "cert_issuance.x: set common_name or subject, not both",
    ),
    # Preloaded certs are file:// URIs or lists of ids.
    (
        '[preloaded_certs]\nc = "https://certs.kiln.example/c.pem"\n',
        "preloaded_certs.c: 'https://certs.kiln.example/c.pem' is not a file:// URI",
    ),
    (
        '[preloaded_certs]\nc = "/var/secrets/c.pem"\n',
        "preloaded_certs.c: '/var/secrets/c.pem' is not a file:// URI",
    ),
    (
        '[preloaded_certs]\nc = "pkcs11:object=c"\n',
        "preloaded_certs.c: 'pkcs11:object=c' is not a file:// URI",
    ),
    (
        "[preloaded_certs]\nc = 5\n",
        "preloaded_certs.c: expected a file:// URI or an array of cert ids, found an integer",
    ),
    (
        "[preloaded_certs]\nc = [1, 2]\n",
        "preloaded_certs.c: expected a file:// URI or an array of cert ids, found an array",
    ),
    (
        '[preloaded_certs.c]\nuri = "file:///c.pem"\n',
        "preloaded_certs.c: expected a file:// URI or an array of cert ids, found a table",
    ),
    ('preloaded_certs = "file:///c.pem"\n', "preloaded_certs: expected a table"),
    # Wrong types, each named.
    ('max_requests = "ten"\n', "max_requests: expected an integer, found a string"),
    ("max_requests = true\n", "max_requests: expected an integer, found a boolean"),
    ("max_requests = 1.5\n", "max_requests: expected an integer, found a float"),
    ("max_requests = 0\n", "max_requests: 0 is out of range (expected an integer at least 1)"),
    (
        "not_before_margin_secs = -1\n",
        "not_before_margin_secs: -1 is out of range (expected an integer at least 0)",
    ),
    ('not_before_margin_secs = "5m"\n', "not_before_margin_secs: expected an integer"),
    ('cert_issuance = "est"\n', "cert_issuance: expected a table, found a string"),
    ('[cert_issuance]\nest = "https://e/"\n', "cert_issuance.est: expected a table"),
    (
        CERT + 'method = "est"\nurl = 5\n',
        "cert_issuance.x.url: expected a string, found an integer",
    ),
    (CERT + "method = 1\n", "cert_issuance.x.method: expected a string, found an integer"),
    (
        CERT + 'method = "self_signed"\nexpiry_days = "90"\n',
        "cert_issuance.x.expiry_days: expected an integer, found a string",
    ),
    (
        CERT + 'method = "self_signed"\nexpiry_days = 1.5\n',
        "cert_issuance.x.expiry_days: expected an integer, found a float",
    ),
    (
        CERT + 'method = "self_signed"\ncommon_name = ["a"]\n',
        "cert_issuance.x.common_name: expected a string, found an array",
    ),
    (
        CERT + 'method = "local_ca"\nsubject = "CN=a"\n',
        "cert_issuance.x.subject: expected a table, found a string",
    ),
    (
        CERT + 'method = "local_ca"\nsubject = { CN = 5 }\n',
        "cert_issuance.x.subject.CN: expected a string, found an integer",
    ),
    (
        CERT + 'method = "est"\nusername = "u"\npassword = 1234\n',
        "cert_issuance.x.password: expected a string, found an integer",
    ),
    (
        EST + 'trusted_certs = "kiln-est-root"\n',
        "cert_issuance.est.trusted_certs: expected an array of strings, found a string",
    ),
    (
        EST + "trusted_certs = [1]\n",
        "cert_issuance.est.trusted_certs: expected an array of strings, found an integer",
    ),
    (
        EST + 'urls = "https://est.example/"\n',
        "cert_issuance.est.urls: expected a table, found a string",
    ),
    (
        EST + "urls = { default = 5 }\n",
        "cert_issuance.est.urls.default: expected a string, found an integer",
    ),
    (
        RENEW + 'rotate_key = "yes"\nthreshold = "80%"\nretry = "4%"\n',
        "identity_auto_renew.rotate_key: expected true or false, found a string",
    ),
    (
        RENEW + "rotate_key = true\nthreshold = 80\nretry = '4%'\n",
        "identity_auto_renew.threshold: expected a string, found an integer",
    ),
    (
        EST + 'identity_auto_renew = "80%"\n',
        "cert_issuance.est.identity_auto_renew: expected a table, found a string",
    ),
    (
        "[[principal]]\nuid = 1\ncerts = [1, 2]\n",
        "principal[0].certs: expected an array of strings, found an integer",
    ),
    ("[[principal]]\nuid = 1\ncerts = 'a'\n", "principal[0].certs: expected an array"),
    ('[[principal]]\nuid = "1000"\ncerts = []\n', "principal[0].uid: expected an integer"),
    ("[[principal]]\nuid = -1\ncerts = []\n", "principal[0].uid: expected a uid"),
    ("[[principal]]\ncerts = ['a']\n", "principal[0].uid: expected a uid"),
    ("[[principal]]\nuid = 1\n", "principal[0].certs: is missing"),
    ("[principal]\nuid = 1\ncerts = []\n", "principal: expected an array of tables"),
    ("principal = 0\n", "principal: expected an array of tables"),
    ("principal = [1]\n", "principal[0]: expected a table, found an integer"),
    ("[endpoints]\naziot_certd = 5\n", "endpoints.aziot_certd: expected a string"),
    # EST URLs must be http(s) URLs with a host.
    (
        CERT + 'method = "est"\nurl = "ftp://est.example/est"\n',
        "cert_issuance.x.url: 'ftp://est.example/est' is not an http:// or https:// URL",
    ),
    (
        CERT + 'method = "est"\nurl = "est.example/.well-known/est"\n',
        "cert_issuance.x.url: 'est.example/.well-known/est' is not an http:// or https://",
    ),
    (
        EST + '[cert_issuance.est.urls]\ndefault = "https://"\n',
        "cert_issuance.est.urls.default: 'https://' is not an http:// or https:// URL",
    ),
    (
        EST + '[cert_issuance.est.urls]\ndevice-ca = "file:///est"\n',
        "cert_issuance.est.urls.device-ca: 'file:///est' is not an http:// or https://",
    ),
    # Subject names OpenSSL does not know (checked by check_certd, as issuance builds them).
    (
        CERT + 'method = "local_ca"\nsubject = { CN = "a", Colour = "blue" }\n',
        "cert_issuance.x.subject: unknown subject attribute 'Colour'",
    ),
    (
        # OpenSSL's names are case-sensitive: `cn` is not `CN`.
        CERT + 'method = "est"\nsubject = { cn = "a" }\n',
        "cert_issuance.x.subject: unknown subject attribute 'cn'",
    ),
]


@pytest.mark.parametrize(("text", "named"), REFUSALS, ids=[named for _, named in REFUSALS])
def test_a_refusal_names_the_file_and_the_key(text: str, named: str) -> None:
    message = refusal(HOME + text)
    assert named in message, message


def test_missing_homedir_path_is_named() -> None:
    assert "homedir_path: is missing" in refusal("max_requests = 5\n")
    assert "homedir_path: is missing" in refusal("")
    message = refusal("homedir_path = 5\n")
    assert "homedir_path: expected a string, found an integer" in message


def test_an_unknown_key_refusal_lists_the_known_ones() -> None:
    message = refusal(HOME + "max_request = 5\n")
    for key in ("homedir_path", "max_requests", "cert_issuance", "preloaded_certs", "principal"):
        assert key in message.partition("known here:")[2]
    message = refusal(HOME + CERT + 'method = "local_ca"\nurl = "https://e/"\n')
    assert (
        'known here (for method = "local_ca"): method, expiry_days, common_name, subject'
    ) in message
    message = refusal(HOME + CERT + 'method = "est"\nuri = "https://e/"\n')
    assert 'known here (for method = "est"): ' in message and "url, username, password" in message


def test_several_unknown_keys_are_named_together() -> None:
    message = refusal(HOME + "a = 1\nb = 2\n")
    assert "a: unknown key (and b)" in message


# -- where this parser differs from the original without a reason ---------------------------


BAD_POLICIES = [
    ('threshold = "100%"\nretry = "4%"', "'100%'", "threshold"),
    ('threshold = "80%"\nretry = "0min"', "'0min'", "retry"),
    ('threshold = "5days"\nretry = "4%"', "'5days'", "threshold"),
    ('threshold = "80%"\nretry = "5 min"', "'5 min'", "retry"),
    ('threshold = ""\nretry = "4%"', "''", "threshold"),
    ('threshold = "-5min"\nretry = "4%"', "'-5min'", "threshold"),
]


@pytest.mark.parametrize(("renew", "value", "key"), BAD_POLICIES)
def test_a_bad_renewal_policy_is_refused_at_load(renew: str, value: str, key: str) -> None:
    """The original's Policy deserializer refuses these at load (spec/provisioning.md §16)."""
    message = refusal(HOME + RENEW + f"rotate_key = true\n{renew}\n")
    assert "cert_issuance.est.identity_auto_renew" in message, message
    assert f"invalid renewal policy {value}" in message, message


@pytest.mark.parametrize("policy", ["1%", "99%", "1min", "+5min", "05min", "30day"])
def test_renewal_policies_the_original_takes_are_taken(policy: str) -> None:
    config = parse(
        HOME + RENEW + f'rotate_key = false\nthreshold = "{policy}"\nretry = "{policy}"\n'
    )
    assert config.est is not None
    assert config.est.identity_auto_renew == AutoRenew(False, policy, policy)


@pytest.mark.parametrize(("renew", "value", "key"), BAD_POLICIES[:2])
def test_a_bad_renewal_policy_names_its_key(renew: str, value: str, key: str) -> None:
    message = refusal(HOME + RENEW + f"rotate_key = true\n{renew}\n")
    assert f"cert_issuance.est.identity_auto_renew.{key}" in message, message


@pytest.mark.parametrize("name", ["streetAddress", "businessCategory", "2.5.4.5"])
def test_subject_names_openssl_knows_are_accepted(name: str) -> None:
    config = parse(HOME + CERT + f'method = "local_ca"\nsubject = {{ "{name}" = "v" }}\n')
    assert config.certs["x"].subject == {name: "v"}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            CERT + 'method = "self_signed"\nexpiry_days = 4294967296\n',
            "cert_issuance.x.expiry_days",
        ),
        ("[[principal]]\nuid = 4294967296\ncerts = []\n", "principal[0].uid"),
    ],
)
def test_integers_beyond_the_originals_u32_are_refused(text: str, named: str) -> None:
    assert named in refusal(HOME + text)


# -- end to end: a real aziotd -------------------------------------------------------------------


def stopped(daemon: Daemon) -> int:
    """The exit code of an aziotd expected to exit by itself."""
    assert daemon.process is not None
    try:
        return daemon.process.wait(30)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(10)
        daemon.process = None


def test_aziotd_exits_78_on_an_unknown_certd_key(world_dir: Path) -> None:
    daemon = Daemon(
        world_dir / "d",
        {
            "keyd": keyd_config,
            "certd": certd_config('[cert_issuance]\nx = { method = "self_signed", expiry = 5 }\n'),
        },
    ).start(wait=False)
    assert stopped(daemon) == 78
    logs = daemon.logs()
    assert str(daemon.services["certd"].config) in logs
    assert "cert_issuance.x.expiry: unknown key" in logs
    assert not daemon.services["certd"].socket.exists()
    assert not daemon.services["keyd"].socket.exists()  # nothing is served half-configured


def test_aziotd_exits_78_on_certd_without_keyd(world_dir: Path) -> None:
    missing = world_dir / "d" / "keyd" / "config.toml"
    daemon = Daemon(
        world_dir / "d",
        {"certd": certd_config()},
        env={"AZIOT_KEYD_CONFIG": str(missing), "AZIOT_KEYD_CONFIG_DIR": str(missing.parent)},
    ).start(wait=False)
    assert stopped(daemon) == 78
    logs = daemon.logs()
    assert "certd needs keyd in the same aziotd" in logs
    assert f"no keyd config at {missing}" in logs
    assert not daemon.services["certd"].socket.exists()


def test_the_sample_starts_and_answers(world_dir: Path) -> None:
    secrets = world_dir / "secrets"
    secrets.mkdir()
    (secrets / "est-root.pem").write_text("kiln est root contents\n")
    # aziotd's world gives certd its homedir; the preloaded certs point into the world.
    sample = SAMPLE.replace(f'homedir_path = "{SAMPLE_HOMEDIR}"\n', "").replace(
        "file:///srv/kiln/secrets/", f"file://{secrets}/"
    )
    daemon = start_certd(world_dir / "d", sample)
    try:
        reply = daemon.request("certd", "GET", "/certificates/x?api-version=2020-09-01")
        assert reply.status == 400
        assert reply.json() == {
            "message": 'parameter "id" has an invalid value\ncaused by: not found'
        }
        reply = daemon.request("certd", "GET", "/certificates/kiln-est-root")
        assert (reply.status, reply.json()) == (200, {"pem": "kiln est root contents\n"})
    finally:
        daemon.stop()
