"""Config in process: the base file and `config.d` merged as the original merges them, and keyd's
config refused with the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from aziot.config.keyd import load_keyd
from aziot.config.loader import ConfigError, ServicePaths, load_merged, merge


def paths_in(tmp_path: Path) -> ServicePaths:
    (tmp_path / "config.d").mkdir(exist_ok=True)
    return ServicePaths("keyd", tmp_path / "config.toml", tmp_path / "config.d")


def test_merge_tables_recursively_arrays_concatenate_values_replace() -> None:
    base = {"a": {"x": 1, "y": [1]}, "list": [1], "scalar": "old", "keep": True}
    overlay = {"a": {"y": [2], "z": 3}, "list": [2], "scalar": "new"}
    assert merge(base, overlay) == {
        "a": {"x": 1, "y": [1, 2], "z": 3},
        "list": [1, 2],
        "scalar": "new",
        "keep": True,
    }
    assert base["a"] == {"x": 1, "y": [1]}  # the inputs are left as they were


def test_drop_ins_apply_in_sorted_order_and_only_toml_files(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    paths.config_file.write_text('max_requests = 1\n[aziot_keys]\nhomedir_path = "/a"\n')
    (paths.config_dir / "20-b.toml").write_text("max_requests = 3\n")
    (paths.config_dir / "10-a.toml").write_text(
        "max_requests = 2\n[[principal]]\nuid = 1\nkeys = ['a']\n"
    )
    (paths.config_dir / "30-c.toml").write_text("[[principal]]\nuid = 2\nkeys = ['b*']\n")
    (paths.config_dir / "99-ignored.txt").write_text("max_requests = 99\n")
    (paths.config_dir / "50-dir.toml").mkdir()
    table = load_merged(paths)
    assert table["max_requests"] == 3
    assert table["principal"] == [{"uid": 1, "keys": ["a"]}, {"uid": 2, "keys": ["b*"]}]
    config = load_keyd(paths)
    assert [p.uid for p in config.principal] == [1, 2]
    assert config.homedir == Path("/a")


def test_a_missing_base_file_is_an_empty_table(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    (paths.config_dir / "00.toml").write_text('[aziot_keys]\nhomedir_path = "/h"\n')
    assert load_keyd(paths).homedir == Path("/h")


@pytest.mark.parametrize(
    ("base", "named"),
    [
        ("max_requests = [\n", "not valid TOML"),
        ('[aziot_keys]\nhomedir_path = "/h"\nhomedir = "/x"\n', "unknown [aziot_keys] names"),
        ('max_requests = 0\n[aziot_keys]\nhomedir_path = "/h"\n', "max_requests must be"),
        ('max_requests = "ten"\n[aziot_keys]\nhomedir_path = "/h"\n', "max_requests"),
        ("[aziot_keys]\n", "neither homedir_path nor pkcs11_base_slot"),
        (
            '[aziot_keys]\nhomedir_path = "/h"\npkcs11_base_slot = "http://x"\n',
            "aziot_keys.pkcs11_base_slot",
        ),
        (
            '[aziot_keys]\nhomedir_path = "/h"\n[preloaded_keys]\nk = "pkcs11:slot-id=x"\n',
            "preloaded_keys.k",
        ),
        ('[aziot_keys]\nhomedir_path = "/h"\n[[principal]]\nkeys = ["a"]\n', "uid"),
    ],
)
def test_a_bad_config_names_the_file_and_the_field(tmp_path: Path, base: str, named: str) -> None:
    paths = paths_in(tmp_path)
    paths.config_file.write_text(base)
    with pytest.raises(ConfigError) as caught:
        load_keyd(paths)
    assert str(paths.config_file) in str(caught.value)
    assert named in str(caught.value)


def test_paths_come_from_the_environment_or_the_originals_defaults() -> None:
    default = ServicePaths.from_env("certd", {})
    assert default.config_file == Path("/etc/aziot/certd/config.toml")
    assert default.config_dir == Path("/etc/aziot/certd/config.d")
    custom = ServicePaths.from_env(
        "keyd", {"AZIOT_KEYD_CONFIG": "/c.toml", "AZIOT_KEYD_CONFIG_DIR": "/d"}
    )
    assert (custom.config_file, custom.config_dir) == (Path("/c.toml"), Path("/d"))
