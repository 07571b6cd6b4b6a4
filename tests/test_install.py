"""The distribution installs as one namespace, `aziot.*`, beside Supervisord's `supervisor`."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_plain_install_sits_beside_supervisord(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        + [str(ROOT), "supervisor==4.3.0"],
        check=True,
        capture_output=True,
    )
    tops = {
        path.name
        for path in target.iterdir()
        if not path.name.endswith((".dist-info", ".egg-info")) and path.name not in ("bin",)
    }
    assert tops == {"aziot", "supervisor"}, tops
    # No site processing: the repository's editable install and folders stay out of the way,
    # the venv's site-packages only lends the dependencies.
    environ = dict(os.environ, PYTHONPATH=f"{target}{os.pathsep}{sysconfig.get_path('purelib')}")
    probe = (
        "import sys, supervisor.supervisord, aziot.supervisor.main as daemon, aziot.cli.main as cli;"
        "assert supervisor.supervisord.__file__.startswith(sys.argv[1]);"
        "assert daemon.__file__.startswith(sys.argv[1]), daemon.__file__;"
        "daemon.main(['--version'])"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(target)],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "aziotd 0.1.0"


def test_aziotctl_version_does_not_import_the_daemon() -> None:
    probe = (
        "import sys; from aziot.cli.main import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "loaded = [m for m in sys.modules if m.startswith(('aziot.api', 'aziot.actors', 'trio'))]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("aziotctl ")


def test_config_does_not_import_actors() -> None:
    probe = (
        "import sys, aziot.config.keyd\n"
        "loaded = [m for m in sys.modules if m.startswith(('aziot.actors', 'aziot.api'))]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
