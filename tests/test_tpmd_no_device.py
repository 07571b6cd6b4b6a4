"""tpmd on a device without a TPM: `config apply` configures tpmd on every device, so a missing
TPM device is one clear log line, not tss2's five lines at every retry."""

from __future__ import annotations

import time
from pathlib import Path

from aziot.actors.tpm.device import missing_device
from tests.daemon import Daemon


def test_missing_device_names_what_tss2_would_try(tmp_path: Path) -> None:
    present = tmp_path / "tpm"
    present.touch()
    assert missing_device(f"device:{present}") is None
    assert missing_device(f"device:{tmp_path}/absent") == f"{tmp_path}/absent does not exist"
    assert missing_device("swtpm:path=/nowhere") is None  # the library says what is wrong
    assert missing_device("") is None


def test_no_tpm_device_is_one_log_line_and_a_500(tmp_path: Path) -> None:
    absent = tmp_path / "no-tpm"
    config = f'tcti = "device:{absent}"\n'
    daemon = Daemon(tmp_path / "d", {"tpmd": config}).start()
    try:
        reply = daemon.request("tpmd", "GET", "/get_tpm_keys")
        assert reply.status == 500 and reply.json() == {"message": "internal error"}
        time.sleep(1.0)  # a few retries (0.2 s doubling)
        logs = daemon.logs()
        assert f"no TPM device: {absent} does not exist" in logs
        assert logs.count("the TPM cannot be used") == 1, logs
        assert "tcti-device.c" not in logs and "Tss2_Tcti" not in logs
    finally:
        daemon.stop()
