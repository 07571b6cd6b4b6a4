"""Where the device's files live: the original's paths, optionally under another root.

`aziotctl --root DIR` works on a device tree under DIR: a test's temp dir, the demo's state.
Every path aziotctl reads or writes, and every path it writes into a service's config, comes
from here, so a config applied under a root points into that root and aziotd runs on it in
place (which is also why it is not a way to stage an image for another machine).
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from aziot.supervisor.runtime_files import PID_FILE

SERVICES = ("keyd", "certd", "identityd", "tpmd")

# The original's users, one per service; its sockets are owned by them (mode 0660), so a client
# is let in by being in the service's group.
SERVICE_USERS = {"keyd": "aziotks", "certd": "aziotcs", "identityd": "aziotid", "tpmd": "aziottpm"}


@attrs.frozen
class Layout:
    root: Path = Path("/")
    environ: dict[str, str] = attrs.field(factory=lambda: dict(os.environ), eq=False)

    def _under(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def rooted(self) -> bool:
        """True when the paths are not the system's own (systemd is then left alone)."""
        return self.root.resolve() != Path("/")

    @property
    def etc(self) -> Path:
        return self._under("/etc/aziot")

    @property
    def super_config(self) -> Path:
        return self.etc / "config.toml"

    def config_file(self, service: str) -> Path:
        return self.etc / service / "config.toml"

    def config_dir(self, service: str) -> Path:
        return self.etc / service / "config.d"

    def applied_config(self, service: str) -> Path:
        """The file `config apply` writes for `service`."""
        return self.config_dir(service) / "00-super.toml"

    def homedir(self, service: str) -> Path:
        return self._under(f"/var/lib/aziot/{service}")

    @property
    def keyd_secrets(self) -> Path:
        return self._under("/var/secrets/aziot/keyd")

    @property
    def socket_dir(self) -> Path:
        """$AZIOT_SOCKET_DIR as aziotd reads it, else /run/aziot under the root."""
        if "AZIOT_SOCKET_DIR" in self.environ:
            return Path(self.environ["AZIOT_SOCKET_DIR"])
        return self._under("/run/aziot")

    def socket(self, service: str) -> Path:
        return self.socket_dir / f"{service}.sock"

    @property
    def pid_file(self) -> Path:
        """Written by aziotd beside its sockets; how aziotctl finds it without systemd."""
        return self.socket_dir / PID_FILE

    @property
    def systemd_units(self) -> Path:
        return self._under("/etc/systemd/system")
