"""A throw-away software TPM (swtpm) for tests, in Unix-socket mode with its own state dir.

`Swtpm(directory).start()` runs `swtpm socket --tpm2` on `<directory>/tpm.sock` (control channel
`tpm.sock.ctrl`) with `--flags startup-clear`, so the TPM is started and ready; `stop()` ends it
and `start()` again is a TPM reset with the same NV state (persisted keys survive). `tcti` is the
TCTI string tss2, tpmd and tpm2-tools take; `tools()` runs a tpm2-tools command against it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
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


def tabrmd_available() -> bool:
    return all(shutil.which(tool) for tool in ("tpm2-abrmd", "dbus-daemon")) and any(
        Path(lib_dir, "libtss2-tcti-tabrmd.so.0").exists()
        for lib_dir in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")
    )


class Tabrmd:
    """A TPM resource manager (tpm2-abrmd) in front of a running `Swtpm`, as /dev/tpmrm0 is in
    front of a device TPM: each client connection gets its own transient objects, saved and
    reloaded as needed and flushed when the client goes, so the TPM's three object slots are
    not used up by what clients leave loaded. It talks D-Bus, so a private session bus
    (`dbus-daemon`) is started in `directory` too; `env` is what a client needs to reach it.
    """

    def __init__(self, tpm: Swtpm, directory: Path) -> None:
        self.tpm = tpm
        self.directory = directory
        self.bus = directory / "dbus.sock"
        # D-Bus name elements must not start with a digit; unique to this manager.
        self.name = f"com.intel.tss2.Tabrmd.t{secrets.token_hex(6)}"
        self.log = directory / "tabrmd.log"
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def tcti(self) -> str:
        return f"tabrmd:bus_name={self.name},bus_type=session"

    @property
    def env(self) -> dict[str, str]:
        return {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.bus}"}

    def start(self, timeout: float = 10.0) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bus.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.processes.append(
                subprocess.Popen(
                    ["dbus-daemon", "--session", "--nofork", f"--address=unix:path={self.bus}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            self._wait(timeout, self.bus.exists, "the D-Bus socket")
            self.processes.append(
                subprocess.Popen(
                    [
                        "tpm2-abrmd",
                        "--session",
                        f"--dbus-name={self.name}",
                        f"--tcti={self.tpm.tcti}",
                        "--allow-root",
                        "--flush-all",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, **self.env),
                )  # fmt: skip
            )
        self._wait(timeout, self._answers, "tpm2-abrmd")
        return self

    def _answers(self) -> bool:
        env = dict(os.environ, **self.env, TPM2TOOLS_TCTI=self.tcti)
        probe = subprocess.run(["tpm2_getrandom", "--hex", "1"], env=env, capture_output=True)
        return probe.returncode == 0

    def _wait(self, timeout: float, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{process.args[0]} exited: {self.logs()}")
            if ready():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{what} was not ready within {timeout} s: {self.logs()}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        self.processes.clear()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
