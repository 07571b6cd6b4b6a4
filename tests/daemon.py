"""Run a real `aziotd` for a test: its own configs, state and socket dir, a real process.

`Daemon` starts any set of services in one aziotd, each from a config snippet: its config.toml
and config.d are written under the root, `AZIOT_<NAME>_CONFIG` / `_CONFIG_DIR` point at them,
one `AZIOT_SOCKET_DIR` holds every socket, and `start()` returns once each socket answers.
A test that needs keyd and certd side by side (identityd's will) reads:

    daemon = Daemon(root, {
        "keyd": keyd_config,                                  # homedir under root/keyd/home
        "certd": lambda s: f'homedir_path = "{s.home}"\n[cert_issuance]\n...',
    }).start()
    daemon.request("certd", "GET", "/certificates/device-ca")
    daemon.services["keyd"].home / "keys"                     # keyd's key files

A snippet is the config text, or a function of the service's `ServiceDir` when it must name its
own paths. `Keyd` is the keyd-only convenience the keyd tests use, with its older layout
(config.toml, config.d and home directly under its root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import attrs

from tests import rawhttp
from tests.softhsm import SoftHsmToken

KEYD_VERSION = "2021-05-01"
# The api-version `request()` sends to each service: what the in-tree clients send it.
API_VERSIONS = {
    "keyd": KEYD_VERSION,
    "certd": "2020-09-01",
    "identityd": "2022-08-01",
    "tpmd": "2020-09-01",
}


@attrs.frozen
class ServiceDir:
    """Where one service's config, config.d and state live for a test."""

    name: str  # as the outside world sees it: "keyd", "certd", ...
    config: Path
    config_dir: Path
    home: Path
    socket: Path


Snippet = str | Callable[[ServiceDir], str]


def keyd_config(service: ServiceDir) -> str:
    """The least keyd runs with: keys in files under its home."""
    return f'[aziot_keys]\nhomedir_path = "{service.home}"\n'


# A config each service starts with, for tests that start every declared service at once.
# A new service adds its own here beside its line in supervisor/services' SERVICES.
# tpmd's points at a swtpm socket that does not exist: tpmd serves without its TPM (requests get
# 500 while it retries opening it), so the harness needs no TPM; tests/test_tpmd.py runs swtpm.
MINIMAL_CONFIGS: dict[str, Snippet] = {
    "keyd": keyd_config,
    "certd": lambda service: f'homedir_path = "{service.home}"\n',
    "identityd": lambda service: (
        f'hostname = "test-device"\nhomedir = "{service.home}"\n[provisioning]\nsource = "none"\n'
    ),
    "tpmd": lambda service: f'tcti = "swtpm:path={service.home}/no-swtpm.sock"\n',
}


class Daemon:
    """An aziotd process serving `services` from `root`; restartable with the same state."""

    def __init__(
        self,
        root: Path,
        services: Mapping[str, Snippet],
        env: dict[str, str] | None = None,
        config_d: Mapping[str, Mapping[str, str]] | None = None,
        command: list[str] | None = None,
    ):
        """`config_d` gives, per service, files of its config.d by name (`"10-p.toml": text`);
        `command` runs aziotd (default: this checkout's, with this interpreter)."""
        self.root = root
        self.socket_dir = root / "run"
        self.log = root / "aziotd.log"
        self.env = dict(env or {})
        self.command = command or [sys.executable, "-m", "aziot.supervisor.main"]
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.services: dict[str, ServiceDir] = {}
        self._write_configs(services, config_d or {})

    def _write_configs(
        self, services: Mapping[str, Snippet], config_d: Mapping[str, Mapping[str, str]]
    ) -> None:
        for name, snippet in services.items():
            service = self.layout(name)
            service.config.parent.mkdir(parents=True, exist_ok=True)
            service.config_dir.mkdir(parents=True, exist_ok=True)
            text = snippet if isinstance(snippet, str) else snippet(service)
            service.config.write_text(text)
            for file_name, content in config_d.get(name, {}).items():
                (service.config_dir / file_name).write_text(content)
            self.services[name] = service

    def layout(self, name: str) -> ServiceDir:
        """Each service in a folder of its own; the sockets together, as under /run/aziot."""
        folder = self.root / name
        return ServiceDir(
            name,
            config=folder / "config.toml",
            config_dir=folder / "config.d",
            home=folder / "home",
            socket=self.socket_dir / f"{name}.sock",
        )

    def environ(self) -> dict[str, str]:
        environ = dict(os.environ)
        # Only the services given: a developer's own AZIOT_CERTD_CONFIG, or an installed
        # /etc/aziot/certd/config.d, must not add one.
        for name in API_VERSIONS:
            environ[f"AZIOT_{name.upper()}_CONFIG"] = str(self.root / "absent" / name)
            environ[f"AZIOT_{name.upper()}_CONFIG_DIR"] = str(self.root / "absent" / name)
        for name, service in self.services.items():
            environ[f"AZIOT_{name.upper()}_CONFIG"] = str(service.config)
            environ[f"AZIOT_{name.upper()}_CONFIG_DIR"] = str(service.config_dir)
        environ.update(AZIOT_SOCKET_DIR=str(self.socket_dir), AZIOT_LOG_LEVEL="debug")
        environ.update(self.env)
        return environ

    def start(self, wait: bool = True) -> Self:
        assert self.process is None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.environ(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        if wait:
            self.wait_ready()
        return self

    def answers(self, socket: Path) -> bool:
        """Whether a service answers on `socket`: the 400 every service gives a request without
        an api-version (spec/api.md §1.3), checked before any route, so no state is touched."""
        try:
            return rawhttp.request(str(socket), "GET", "/nothing").status == 400
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = [service.socket for service in self.services.values()]
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"aziotd exited with {self.process.returncode}:\n{self.logs()}")
            waiting = [socket for socket in waiting if not self.answers(socket)]
            if not waiting:
                return
            time.sleep(0.02)
        names = ", ".join(str(socket) for socket in waiting)
        raise TimeoutError(f"aziotd did not answer on {names} within {timeout} s:\n{self.logs()}")

    def serving(self) -> dict[str, Path]:
        """The sockets in the socket dir that answer, by service name (`keyd.sock` is keyd)."""
        if not self.socket_dir.is_dir():
            return {}
        return {
            path.stem: path for path in sorted(self.socket_dir.glob("*.sock")) if self.answers(path)
        }

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

    def request(
        self, service: str, method: str, path: str, body: Any = None, **options: Any
    ) -> rawhttp.Reply:
        """One request to `service` with the api-version its clients send, unless `path` has one."""
        if "api-version=" not in path:
            sep = "&" if "?" in path else "?"
            path = f"{path}{sep}api-version={API_VERSIONS[service]}"
        return rawhttp.request(str(self.services[service].socket), method, path, body, **options)


class Keyd(Daemon):
    """An aziotd process serving keyd alone from `root`; restartable with the same state."""

    def __init__(
        self,
        root: Path,
        extra_config: str = "",
        env: dict[str, str] | None = None,
        top_config: str = "",
        token: SoftHsmToken | None = None,
    ):
        self.token = token
        env = dict(env or {})
        if token is not None:
            # keyd keeps keys on this token first (base slot), then in files.
            env["SOFTHSM2_CONF"] = str(token.conf_path)
            extra_config = (
                f'pkcs11_lib_path = "{token.lib_path}"\n'
                f'pkcs11_base_slot = "{token.uri()}"\n{extra_config}'
            )

        def config(service: ServiceDir) -> str:
            return f"{top_config}{keyd_config(service)}{extra_config}"

        super().__init__(root, {"keyd": config}, env)
        keyd = self.services["keyd"]
        self.home = keyd.home
        self.keys_dir = keyd.home / "keys"
        self.config = keyd.config
        self.config_dir = keyd.config_dir
        self.socket = str(keyd.socket)

    def layout(self, name: str) -> ServiceDir:
        # The layout the keyd tests were written against: everything directly under the root.
        return ServiceDir(
            name,
            config=self.root / "config.toml",
            config_dir=self.root / "config.d",
            home=self.root / "home",
            socket=self.socket_dir / f"{name}.sock",
        )

    def call(self, method: str, path: str, body: Any = None, **options: Any) -> rawhttp.Reply:
        return self.request("keyd", method, path, body, **options)

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
        if self.token is not None and any(o.get("label") == key_id for o in self.token_objects()):
            return True
        return (self.keys_dir / file_name).exists()


class AppliedDaemon(Daemon):
    """aziotd on configs that are already in place under an aziotctl `Layout` (as `aziotctl
    config apply` writes them, into config.d): nothing is written, every path is the layout's.
    `command` may be an installed aziotd, or be prefixed (`setpriv ...`) to run as another uid."""

    def __init__(
        self,
        layout: Any,  # aziot.cli.layout.Layout
        services: tuple[str, ...],
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.applied = layout
        super().__init__(layout.root, dict.fromkeys(services, ""), env=env, command=command)
        self.socket_dir = layout.socket_dir

    def _write_configs(
        self, services: Mapping[str, Snippet], config_d: Mapping[str, Mapping[str, str]]
    ) -> None:
        self.services = {name: self.layout(name) for name in services}

    def layout(self, name: str) -> ServiceDir:
        return ServiceDir(
            name,
            config=self.applied.config_file(name),
            config_dir=self.applied.config_dir(name),
            home=self.applied.homedir(name),
            socket=self.applied.socket(name),
        )

    def start(self, wait: bool = True) -> Self:
        super().start(wait)
        if wait:  # ready means the sockets answer; the pid file follows a moment later
            deadline = time.monotonic() + 5
            while not self.applied.pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return self
