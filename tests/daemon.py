"""Run a real `aziotd` for a test: its own config, state and socket dirs, a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests import rawhttp
from tests.softhsm import SoftHsmToken

KEYD_VERSION = "2021-05-01"


class Keyd:
    """An aziotd process serving keyd from `root`; restartable with the same state."""

    def __init__(
        self,
        root: Path,
        extra_config: str = "",
        env: dict[str, str] | None = None,
        top_config: str = "",
        token: SoftHsmToken | None = None,
    ):
        self.root = root
        self.token = token
        self.home = root / "home"
        self.keys_dir = self.home / "keys"
        self.config_dir = root / "config.d"
        self.socket_dir = root / "run"
        self.socket = str(self.socket_dir / "keyd.sock")
        self.config = root / "config.toml"
        self.log = root / "aziotd.log"
        self.env = dict(env or {})
        if token is not None:
            # keyd keeps keys on this token first (base slot), then in files.
            self.env["SOFTHSM2_CONF"] = str(token.conf_path)
            extra_config = (
                f'pkcs11_lib_path = "{token.lib_path}"\n'
                f'pkcs11_base_slot = "{token.uri()}"\n{extra_config}'
            )
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(exist_ok=True)
        self.config.write_text(
            f'{top_config}[aziot_keys]\nhomedir_path = "{self.home}"\n{extra_config}'
        )

    def environ(self) -> dict[str, str]:
        environ = dict(os.environ)
        environ.update(
            AZIOT_KEYD_CONFIG=str(self.config),
            AZIOT_KEYD_CONFIG_DIR=str(self.config_dir),
            AZIOT_SOCKET_DIR=str(self.socket_dir),
            AZIOT_LOG_LEVEL="debug",
        )
        environ.update(self.env)
        return environ

    def start(self, wait: bool = True) -> Keyd:
        assert self.process is None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aziot.supervisor.main"],
                env=self.environ(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"aziotd exited with {self.process.returncode}:\n{self.logs()}")
            try:
                reply = rawhttp.request(self.socket, "GET", "/nothing")
                if reply.status == 400:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"aziotd did not answer within {timeout} s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def call(self, method: str, path: str, body: Any = None, **options: Any) -> rawhttp.Reply:
        sep = "&" if "?" in path else "?"
        target = f"{path}{sep}api-version={KEYD_VERSION}"
        return rawhttp.request(self.socket, method, target, body, **options)

    def snapshot(self) -> dict[str, Any]:
        """Every file under the key store with its bytes, and the token's objects if any."""
        files = {}
        if self.keys_dir.exists():
            files = {p.name: p.read_bytes() for p in sorted(self.keys_dir.iterdir())}
        if self.token is None:
            return files
        return {"files": files, "token": self.token_objects()}

    def token_objects(self) -> list[dict[str, str]]:
        """The token's objects as `pkcs11-tool --list-objects` reports them (an independent view)."""
        assert self.token is not None
        listing = self.token.pkcs11_tool("--list-objects").stdout
        objects: list[dict[str, str]] = []
        for line in listing.splitlines():
            if line and not line.startswith(" "):
                objects.append({"type": line.strip()})
            elif ":" in line and objects:
                name, _, value = line.partition(":")
                objects[-1][name.strip()] = value.strip()
        return sorted(objects, key=lambda o: (o.get("label", ""), o["type"]))

    def has_key(self, key_id: str, file_name: str) -> bool:
        """Whether `key_id` is stored: on the token (by label) or as `file_name` in keys/."""
        if self.token is not None and any(
            o.get("label") == key_id for o in self.token_objects()
        ):
            return True
        return (self.keys_dir / file_name).exists()
