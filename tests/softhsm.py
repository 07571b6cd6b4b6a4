"""A throw-away SoftHSM2 token for tests.

SoftHSM reads ``SOFTHSM2_CONF`` once, in ``C_Initialize``. python-pkcs11 keeps one initialized
module object per library path for the whole process, so :func:`make_softhsm_token` finalizes
that object: the next ``pkcs11.lib(path)`` initializes it again and sees the new token directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import attrs
import pkcs11

SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"


def softhsm_available() -> bool:
    return os.path.exists(SOFTHSM_LIB) and shutil.which("softhsm2-util") is not None


@attrs.frozen
class SoftHsmToken:
    lib_path: str
    label: str
    pin: str
    so_pin: str
    slot_id: int
    conf_path: Path
    token_dir: Path
    env: dict[str, str]  # os.environ plus SOFTHSM2_CONF, for subprocesses such as pkcs11-tool

    def uri(self, *, object_label: str | None = None, with_pin: bool = True) -> str:
        """``pkcs11:token=<label>[;object=<label>]?pin-value=<pin>``."""
        text = f"pkcs11:token={quote(self.label, safe='')}"
        if object_label is not None:
            text += f";object={quote(object_label, safe='')}"
        if with_pin:
            text += f"?pin-value={quote(self.pin, safe='')}"
        return text

    def pkcs11_tool(self, *args: str, login: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``pkcs11-tool`` against this token (raises if it fails)."""
        command = ["pkcs11-tool", "--module", self.lib_path, "--token-label", self.label]
        if login:
            command += ["--login", "--pin", self.pin]
        return subprocess.run(
            [*command, *args], env=self.env, capture_output=True, text=True, check=True, timeout=60
        )


def make_softhsm_token(
    directory: Path,
    *,
    label: str = "keyd-test",
    pin: str = "1234",
    so_pin: str = "5678",
    mechanisms: str = "ALL",
    lib_path: str = SOFTHSM_LIB,
) -> SoftHsmToken:
    """Create ``directory``/softhsm2.conf and a fresh token; point ``SOFTHSM2_CONF`` at it.

    ``mechanisms`` is SoftHSM's ``slots.mechanisms`` value, to pretend to be a token lacking
    something. A deny list is written ``"-,CKM_A,CKM_B"``: SoftHSM 2.6.1 ignores the name glued
    to the ``-`` (``"-CKM_A"`` denies nothing).
    """
    token_dir = directory / "tokens"
    token_dir.mkdir(parents=True, exist_ok=True)
    conf_path = directory / "softhsm2.conf"
    conf_path.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        f"slots.mechanisms = {mechanisms}\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf_path)
    env = dict(os.environ)

    result = subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            so_pin,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    match = re.search(r"reassigned to slot (\d+)", result.stdout)
    if match is None:
        raise RuntimeError(f"unexpected softhsm2-util output: {result.stdout!r}")

    # Whatever this process initialized before still looks at the previous token directory.
    pkcs11.lib(lib_path).finalize()

    return SoftHsmToken(
        lib_path=lib_path,
        label=label,
        pin=pin,
        so_pin=so_pin,
        slot_id=int(match.group(1)),
        conf_path=conf_path,
        token_dir=token_dir,
        env=env,
    )
