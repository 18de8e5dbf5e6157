"""The systemd unit files: systemd's own verifier, its security rating, the service contract."""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from daemon.cli import build_parser, cmd_run
from daemon.config.loading import DaemonConfig
from daemon.supervisor.loop import CHILD_KILL_GRACE_SECONDS

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
UNITS = ["ckpt-exporter.service", "ckpt-exporter@.service"]
INSTALLED_BINARY = "/opt/ckpt-exporter/venv/bin/ckpt-exporter"
# Where systemd-analyze finds its own units (sysinit.target, multi-user.target ...).
SYSTEM_UNITS = Path("/usr/lib/systemd/system")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package 'systemd'; .ci/run installs it)",
)

Sections = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Sections:
    """[Section] -> key -> every value assigned, in order (systemd allows repeated keys)."""
    sections: Sections = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):  # systemd's line continuation
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(unit: str) -> dict[str, list[str]]:
    return parse_unit((SYSTEMD / unit).read_text())["Service"]


def test_parse_unit_keeps_repeated_keys_and_continuations() -> None:
    s = parse_unit("# c\n[Service]\nA=1\n; c\nA=\nB=x\\\n  y\n[Install]\nC=z\n")
    assert s == {"Service": {"A": ["1", ""], "B": ["x y"]}, "Install": {"C": ["z"]}}


def _executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A file system tree for `systemd-analyze verify --root=`.

    verify insists that ExecStart= and ExecReload= are executable, and the
    daemon is not installed under /opt on a test machine. Rather than edit the
    units, install them byte for byte into a tree that has stand-ins at those
    paths plus systemd's own units, which they depend on.
    """
    r = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, r / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    _executable(r / INSTALLED_BINARY.lstrip("/"))
    _executable(r / "bin/kill")
    etc = r / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS:
        shutil.copyfile(SYSTEMD / unit, etc / unit)
    return r


def _verify(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", name],
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_analyze
@pytest.mark.parametrize(
    "name",
    # The template is verified through an instance, as systemd would load it.
    ["ckpt-exporter.service", "ckpt-exporter@resnet.service"],
)
def test_systemd_analyze_verify_is_clean(root: Path, name: str) -> None:
    r = _verify(root, name)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", (
        f"rc={r.returncode}\n{r.stdout}{r.stderr}"
    )


@needs_analyze
def test_verify_harness_reports_problems(root: Path) -> None:
    # The clean result above means something only if this harness does see
    # problems: an unknown key, and an ExecStart= that is not there.
    etc = root / "etc/systemd/system"
    text = (SYSTEMD / "ckpt-exporter.service").read_text()
    (etc / "typo.service").write_text(text.replace("[Service]\n", "[Service]\nKilMode=mixed\n"))
    r = _verify(root, "typo.service")
    assert "KilMode" in r.stderr, r.stderr
    (root / INSTALLED_BINARY.lstrip("/")).unlink()
    r = _verify(root, "ckpt-exporter.service")
    assert r.returncode != 0 and INSTALLED_BINARY in r.stderr, r.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_is_at_most_2(unit: str) -> None:
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(SYSTEMD / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_what_the_service_contract_needs(unit: str) -> None:
    k = service(unit)

    def one(key: str) -> str:
        assert key in k, f"{unit}: {key}= missing"
        return k[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "78"
    assert one("KillMode") == "mixed"
    assert 0 < int(one("WatchdogSec")) <= 120
    # Longer than the daemon's own shutdown: the grace period for a running
    # export, then the time it gives a child to die after SIGKILL.
    own = DaemonConfig.shutdown_grace_seconds + CHILD_KILL_GRACE_SECONDS
    assert own >= 65
    assert int(one("TimeoutStopSec")) > own
    assert one("User") == "ckpt-exporter"
    assert one("Group") == "ckpt-exporter"
    assert one("UMask") == "0022"
    assert one("ProtectSystem") == "strict"
    assert "/srv/tf-serving" in " ".join(k["ReadWritePaths"])
    assert one("ReadOnlyPaths")
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "RemoveIPC",
    ):
        assert one(key) == "yes", key
    assert one("CapabilityBoundingSet") == ""
    assert one("AmbientCapabilities") == ""
    assert one("DevicePolicy") == "closed"
    assert one("ProtectProc") == "invisible"
    assert one("SystemCallArchitectures") == "native"
    assert k["SystemCallFilter"][0] == "@system-service"
    assert any(v.startswith("~") and "@privileged" in v[1:].split() for v in k["SystemCallFilter"])
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one("IPAddressDeny") == "any"
    assert one("IPAddressAllow") == "localhost"
    install = parse_unit((SYSTEMD / unit).read_text())["Install"]
    assert install["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("unit", UNITS)
def test_hardening_left_out_on_purpose_is_explained(unit: str) -> None:
    text = (SYSTEMD / unit).read_text()
    k = service(unit)
    # TensorFlow needs W+X memory (XLA, libffi) and non-process /proc files.
    assert "MemoryDenyWriteExecute" not in k and "ProcSubset" not in k
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for why in ("Not MemoryDenyWriteExecute", "Not ProcSubset", "Not ~@resources"):
        assert why in comments, f"{unit}: no comment {why!r}"
    assert "shutdown_grace_seconds" in comments and "allow_gpu" in comments


@pytest.mark.parametrize("unit", UNITS)
def test_exec_start_is_the_installed_run_command(unit: str) -> None:
    argv = shlex.split(service(unit)["ExecStart"][-1])
    config = "/etc/ckpt-exporter/%i.toml" if "@" in unit else "/etc/ckpt-exporter/config.toml"
    assert argv[0] == INSTALLED_BINARY
    assert argv[1:] == ["run", "--config", config, "--log-format", "json"]
    # The binary is the project's console script, and the CLI takes these flags.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[Path(argv[0]).name] == "daemon.cli:main"
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_run and args.config == config and args.log_format == "json"


def test_template_is_the_plain_unit_with_an_instance_config() -> None:
    # The two files must not drift apart: past their header comment they
    # differ only in the instance name.
    def body(unit: str) -> str:
        text = (SYSTEMD / unit).read_text()
        return text[text.index("[Unit]") :]

    plain = body("ckpt-exporter.service")
    template = body("ckpt-exporter@.service")
    assert template.count("%i") == 2
    assert (
        template.replace("/etc/ckpt-exporter/%i.toml", "/etc/ckpt-exporter/config.toml").replace(
            "ckpt-exporter %i:", "ckpt-exporter:"
        )
        == plain
    )
