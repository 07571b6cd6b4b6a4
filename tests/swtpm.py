"""A throw-away software TPM (swtpm) for tests, in Unix-socket mode with its own state dir.

`Swtpm(directory).start()` runs `swtpm socket --tpm2` on `<directory>/tpm.sock` (control channel
`tpm.sock.ctrl`) with `--flags startup-clear`, so the TPM is started and ready; `stop()` ends it
and `start()` again is a TPM reset with the same NV state (persisted keys survive). `tcti` is the
TCTI string tss2, tpmd and tpm2-tools take; `tools()` runs a tpm2-tools command against it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Self


def swtpm_available() -> bool:
    return shutil.which("swtpm") is not None and shutil.which("tpm2_readpublic") is not None


class Swtpm:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state = directory / "state"
        self.socket = directory / "tpm.sock"
        self.ctrl = directory / "tpm.sock.ctrl"
        self.log = directory / "swtpm.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket}"

    def start(self, timeout: float = 10.0) -> Self:
        assert self.process is None
        self.state.mkdir(parents=True, exist_ok=True)
        for path in (self.socket, self.ctrl):
            path.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "swtpm", "socket", "--tpm2",
                    "--server", f"type=unixio,path={self.socket}",
                    "--ctrl", f"type=unixio,path={self.ctrl}",
                    "--tpmstate", f"dir={self.state}",
                    "--flags", "startup-clear",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"swtpm exited with {self.process.returncode}: {self.logs()}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"swtpm did not listen on {self.socket} within {timeout} s")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.ctrl))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tools(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """A tpm2-tools command against this TPM (raises if it fails)."""
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        return subprocess.run(list(args), env=env, capture_output=True, check=True, timeout=60)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
