"""The shared file store (aziot.actors.files) as a second service would use it: certd's
`certs/<alnum>-<sha256>.cer`, its own fault points, the same atomicity and directory checks."""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
from pathlib import Path

import pytest
import trio

from aziot.actors.b64 import NonCanonical, decode_strict, encode
from aziot.actors.files import (
    FileStore,
    UnsafeDirectory,
    file_name,
    make_directories,
    write_atomic,
)
from aziot.actors.keys.store import key_file_name
from aziot.bus.errors import BusError
from aziot.bus.faults import Faults


def cert_store(
    directory: Path, faults: Faults | None = None, service_user: str | None = None, **options: int
) -> FileStore:
    return FileStore(
        directory,
        faults or Faults(),
        extension="cer",
        points="certs.store",
        contents="the certificates",
        service_user=service_user,
        **options,
    )


def test_names_are_the_originals_with_the_extension_given() -> None:
    digest = hashlib.sha256("device-id/ü 1".encode()).hexdigest()
    assert file_name("device-id/ü 1", "cer") == f"deviceid1-{digest}.cer"
    assert key_file_name("device-id/ü 1") == f"deviceid1-{digest}.key"


async def test_a_cert_store_writes_reads_renames_and_removes(tmp_path: Path) -> None:
    store = cert_store(tmp_path / "home" / "certs")
    store.prepare()
    assert os.stat(tmp_path / "home").st_mode & 0o777 == 0o700
    path = store.path_of("device-ca")
    assert path is not None and path.name == file_name("device-ca", "cer")
    await store.write(path, b"-----BEGIN CERTIFICATE-----\n")
    assert path.stat().st_mode & 0o777 == 0o600
    assert await store.read(path) == b"-----BEGIN CERTIFICATE-----\n"
    parsed = await store.parsed(path, "lines", lambda data: data.count(b"\n"))
    assert parsed == (b"-----BEGIN CERTIFICATE-----\n", 1)
    other = store.path_of("device-ca-new")
    assert other is not None
    await store.rename(path, other)
    assert await store.read(path) is None
    await store.remove(other)
    assert await store.read(other) is None
    assert list(path.parent.iterdir()) == []


async def test_the_cache_is_bounded_by_the_bytes_given(tmp_path: Path) -> None:
    store = cert_store(tmp_path / "certs", cache_bytes=10_000)
    store.prepare()
    for number in range(20):
        path = store.path_of(f"cert-{number}")
        assert path is not None
        await store.write(path, bytes(2_000))
        assert await store.read(path) == bytes(2_000)
        assert store.cached_bytes <= 10_000
    assert store.cached_bytes > 0


async def test_the_store_passes_its_own_fault_points(tmp_path: Path) -> None:
    store = cert_store(tmp_path / "certs")
    store.prepare()
    path = store.path_of("c")
    assert path is not None
    await store.write(path, b"old")
    # keyd's points ("store.*") do not reach another service's store; its own do.
    await cert_store(tmp_path / "certs", Faults.from_spec("store.write=error")).write(path, b"old")
    faults = Faults.from_spec("certs.store.write=error")
    with pytest.raises(BusError, match="certs.store.write"):
        await cert_store(tmp_path / "certs", faults).write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_directory_others_can_write_is_refused_naming_what_they_could_replace(
    tmp_path: Path,
) -> None:
    (tmp_path / "certs").mkdir(mode=0o700)
    os.chmod(tmp_path / "certs", 0o777)
    with pytest.raises(UnsafeDirectory, match="could replace the certificates"):
        cert_store(tmp_path / "certs").prepare()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: aziotd as installed, over chown'd dirs")
def test_as_root_the_services_own_user_may_own_the_store_and_no_other(tmp_path: Path) -> None:
    # `nobody` stands for the original's `aziotks`/`aziotcs`, which this machine lacks.
    nobody = pwd.getpwnam("nobody").pw_uid
    home = tmp_path / "home"
    (home / "certs").mkdir(mode=0o700, parents=True)
    os.chmod(home, 0o700)
    os.chown(home, nobody, nobody)
    os.chown(home / "certs", nobody, nobody)
    with pytest.raises(UnsafeDirectory, match=f"belongs to uid {nobody}, not to this user"):
        cert_store(home / "certs").prepare()
    trusted = cert_store(home / "certs", service_user="nobody")
    trusted.prepare()
    with pytest.raises(UnsafeDirectory, match=f"uid {nobody}, not to this user .* nor to daemon"):
        cert_store(home / "certs", service_user="daemon").prepare()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: aziotd as installed, over chown'd dirs")
def test_as_root_files_made_in_the_service_users_store_are_its_own(tmp_path: Path) -> None:
    """So that the original, running as that user again, can read what aziotd wrote."""
    nobody = pwd.getpwnam("nobody")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    store = cert_store(home / "certs", service_user="nobody")
    store.prepare()  # certs/ is made inside nobody's home: nobody's too
    written = home / "certs" / "sub" / "a.cer"
    trio.run(store.write, written, b"pem")
    for path in (home / "certs", home / "certs" / "sub", written):
        info = os.stat(path)
        assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home / "certs").st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files")
def test_as_root_files_elsewhere_stay_roots(tmp_path: Path) -> None:
    """A directory of some other user (a checkout run with sudo) gives it nothing."""
    daemon = pwd.getpwnam("daemon")
    (tmp_path / "theirs").mkdir()
    os.chown(tmp_path / "theirs", daemon.pw_uid, daemon.pw_gid)
    write_atomic(tmp_path / "theirs" / "f", b"x", Faults(), "p", service_user="nobody")
    make_directories(tmp_path / "theirs" / "d", 0o700, service_user="nobody")
    write_atomic(tmp_path / "mine", b"x", Faults(), "p", service_user="nobody")
    for path in (tmp_path / "theirs" / "f", tmp_path / "theirs" / "d", tmp_path / "mine"):
        assert os.stat(path).st_uid == 0, path


def test_a_crash_mid_write_leaves_a_temp_file_that_prepare_sweeps(tmp_path: Path) -> None:
    store = cert_store(tmp_path / "certs")
    store.prepare()
    (tmp_path / "certs" / ".abc.tmp").write_bytes(b"torn")
    store.prepare()
    assert list((tmp_path / "certs").iterdir()) == []


def test_base64_is_strict_as_rusts_engine() -> None:
    assert encode(b"\xff\x00") == "/wA="
    assert decode_strict("/wA=") == b"\xff\x00"
    with pytest.raises(NonCanonical):
        decode_strict("/wB=")  # the same bytes with trailing bits set
    for bad in ("/wA", "/w A=", "_wA="):
        with pytest.raises(ValueError):
            decode_strict(bad)


@pytest.mark.parametrize(
    "text",
    ["/wB=", "QR==", "QUJ=", "fpGY=", "fpGY=="],
)
def test_base64_with_more_than_one_text_for_its_bytes_is_not_canonical(text: str) -> None:
    """Set trailing bits, or padding past a whole quantum (which binascii's strict mode lets
    through), decode to bytes whose one canonical text is another."""
    with pytest.raises(NonCanonical):
        decode_strict(text)


@pytest.mark.parametrize(
    "text", ["QQ==QQ==", "QQ===", "=QQ=", "Q", "QQ=", "QU\nI=", "QUI=\n", "é==="]
)
def test_base64_that_is_not_padded_standard_base64_is_refused(text: str) -> None:
    with pytest.raises(ValueError) as refused:
        decode_strict(text)
    assert not isinstance(refused.value, NonCanonical)


def test_base64_decodes_every_length_it_encodes() -> None:
    for size in range(70):
        data = bytes(range(size))
        assert decode_strict(encode(data)) == data


def test_id_to_path_memo_stays_bounded_and_skips_long_ids(tmp_path: Path) -> None:
    """Paths of short ids are remembered (hashing an id costs more than the file's stat), in a
    bounded memo that no caller can grow: long ids are hashed each time."""
    store = cert_store(tmp_path / "certs")
    for n in range(5000):
        assert store.path_of(f"id-{n}") == tmp_path / "certs" / file_name(f"id-{n}", "cer")
    long_id = "x" * 100_000
    assert store.path_of(long_id) == tmp_path / "certs" / file_name(long_id, "cer")
    memo = store._paths  # the bound is the point of this test
    assert len(memo) == 1024
    assert long_id not in memo
    assert "id-4999" in memo and "id-0" not in memo
