"""Installed like a daemon: the wheel, ``mta --version``, the systemd unit.

The wheel is built offline (``python -m build --no-isolation``, from a copy of the
source so the checkout gets no build/ directory) and installed with ``--no-deps`` into
a fresh venv whose dependencies come from the test venv through a ``.pth`` line (a
plain path line: the test venv's editable finder for the checkout is not loaded, so
``mta`` is the wheel's). The unit is checked by ``systemd-analyze verify`` and
``systemd-analyze security --offline``, with its ExecStart pointed at that venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mta import __version__

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "contrib" / "systemd" / "mta.service"
INSTALLED_MTA = "/opt/mta/bin/mta"  # where the README's install section puts it


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns the venv's directory."""
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "mta", source / "mta", ignore=shutil.ignore_patterns("__pycache__"))
    dist = base / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("mta-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"mta-{__version__}.dist-info/entry_points.txt").decode()
    assert {"mta/relay.toml", "mta/py.typed", "mta/cli.py", "mta/__main__.py"} <= names
    assert "[console_scripts]\nmta = mta.cli:main" in entry_points
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)

    target = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [str(target / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def test_the_wheel_gives_a_working_mta_command(venv: Path, tmp_path: Path) -> None:
    mta = venv / "bin" / "mta"
    version = subprocess.run([str(mta), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"mta {__version__}"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mta; print(mta.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), where.stdout  # the wheel's, not the checkout's
    # The embedded default policy is in the wheel: `mta run` reads it, and (as root,
    # where the tests run, without [server] user) refuses with its one line.
    run = subprocess.run(
        [str(mta), "run"],
        capture_output=True,
        text=True,
        env={**os.environ, "MTA_HOME": str(tmp_path / "var")},
        cwd=tmp_path,
        timeout=60,
    )
    if os.geteuid() == 0:
        assert run.returncode == 2
        assert run.stderr.startswith("mta: (embedded relay.toml): server.user: refusing"), run
    shipped = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from mta import config; print(config.load_default())",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "port=2525" in shipped.stdout


def installed_unit(venv: Path, tmp_path: Path) -> Path:
    text = UNIT.read_text()
    assert text.count(INSTALLED_MTA) == 1
    unit = tmp_path / "mta.service"
    unit.write_text(text.replace(INSTALLED_MTA, str(venv / "bin" / "mta")))
    return unit


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_is_sandboxed_as_the_readme_says() -> None:
    """The keys the issue asks for, read from the file (systemd-analyze checks syntax)."""
    unit = unit_settings()
    assert unit["User"] == ["mta"]
    assert unit["ExecStart"] == [f"{INSTALLED_MTA} run --config /etc/mta/relay.toml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Environment"] == ["MTA_HOME=/var/lib/mta"]
    assert unit["StateDirectory"] == ["mta"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "RestrictSUIDSGID"):
        assert unit[key] == ["yes"], key
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in unit["SystemCallFilter"]


def test_systemd_analyze_verifies_the_unit(venv: Path, tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd"
    unit = installed_unit(venv, tmp_path)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are only warnings (exit 0): none may be printed.
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for mta\.service: ([0-9.]+)", security.stdout)
    assert found, security.stdout + security.stderr
    assert float(found.group(1)) <= 2.0  # 1.7 when written; systemd's "OK" is < 3.5
