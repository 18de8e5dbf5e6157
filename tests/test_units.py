"""The systemd unit files: systemd's own verifier, its security rating, required keys."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import DaemonConfig
from daemon.supervisor import CHILD_KILL_GRACE_SECONDS

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ["ckpt-exporter.service", "ckpt-exporter@.service"]
INSTALLED_BINARY = "/opt/ckpt-exporter/venv/bin/ckpt-exporter"
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package 'systemd'; .ci/run installs it)",
)


def _keys(unit: str) -> dict[str, list[str]]:
    """Key -> values of the [Service] section (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (SYSTEMD / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_is_clean(unit: str, tmp_path: Path) -> None:
    # verify checks that ExecStart= is executable; on a test machine the
    # package lives in this venv rather than under /opt, so point it there.
    # Nothing else in the file is changed.
    binary = Path(sys.executable).parent / "ckpt-exporter"
    assert binary.exists(), "install the package first (make install)"
    text = (SYSTEMD / unit).read_text()
    assert INSTALLED_BINARY in text
    name = unit.replace("@.", "@demo.")  # verify needs an instance of a template
    (tmp_path / name).write_text(text.replace(INSTALLED_BINARY, str(binary)))
    r = subprocess.run(
        ["systemd-analyze", "verify", f"./{name}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_at_most_2(unit: str) -> None:
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(SYSTEMD / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", r.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_what_the_service_contract_needs(unit: str) -> None:
    k = _keys(unit)

    def one(key: str) -> str:
        assert key in k, f"{unit}: {key}= missing"
        return k[key][-1]

    assert one("Type") == "notify"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "78"
    assert one("KillMode") == "mixed"
    assert int(one("WatchdogSec")) > 0
    # Longer than the daemon's own shutdown: grace, then the time to kill a child.
    own = DaemonConfig.shutdown_grace_seconds + CHILD_KILL_GRACE_SECONDS
    assert int(one("TimeoutStopSec")) > own
    assert one("User") == "ckpt-exporter"
    assert one("ProtectSystem") == "strict"
    assert one("ReadWritePaths") and one("ReadOnlyPaths")
    assert one("NoNewPrivileges") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("ProtectHome") == "yes"
    assert one("CapabilityBoundingSet") == ""
    assert one("UMask") == "0022"
    config = "/etc/ckpt-exporter/%i.toml" if "@" in unit else "/etc/ckpt-exporter/config.toml"
    assert one("ExecStart").startswith(f"{INSTALLED_BINARY} run --config {config}")
