"""The shipped systemd unit passes `systemd-analyze verify` and scores <= 1.0 on security."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import REPO

UNIT = REPO / "systemd" / "fine-tuner.service"
INSTALLED_EXEC = "/opt/fine-tuner/.venv/bin/fine-tuner"


def _local_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's fine-tuner (verify checks it exists)."""
    exe = Path(sys.executable).parent / "fine-tuner"
    assert exe.exists(), f"{exe} missing: install the package (make test does)"
    text = UNIT.read_text()
    assert INSTALLED_EXEC in text
    copy = tmp_path / "fine-tuner.service"
    copy.write_text(text.replace(INSTALLED_EXEC, str(exe)))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` reports nothing for the unit."""
    proc = subprocess.run(["systemd-analyze", "verify", str(_local_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr.strip()) == (0, "")


def test_unit_security_exposure_at_most_1_0(tmp_path):
    """`systemd-analyze security --offline=true` gives an overall exposure of 1.0 or less."""
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(_local_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match is not None, proc.stdout[-500:] + proc.stderr[-500:]
    assert float(match.group(1)) <= 1.0


def test_unit_has_the_required_settings():
    """Type=notify, no restart loop on exit 78, state/logs directories and umask are set."""
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, value)
    expected = {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure",
                "RestartPreventExitStatus": "78", "StateDirectory": "fine-tuner",
                "LogsDirectory": "fine-tuner", "UMask": "0077", "ReadWritePaths": "/srv/fine-tuner",
                "EnvironmentFile": "-/etc/fine-tuner/fine-tuner.env", "WatchdogSec": "60"}
    assert {k: settings.get(k) for k in expected} == expected


def _with_drop_in(tmp_path: Path, name: str) -> Path:
    """The local copy of the unit with ``systemd/<name>`` in its ``fine-tuner.service.d/`` folder,
    where systemd (and systemd-analyze) reads drop-ins from."""
    unit = _local_copy(tmp_path)
    drop_ins = tmp_path / "fine-tuner.service.d"
    drop_ins.mkdir()
    (drop_ins / name).write_text((REPO / "systemd" / name).read_text())
    return unit


def _security(unit: Path) -> tuple[dict[str, str], str]:
    """`systemd-analyze security --offline=true`: the overall exposure and each setting's ✓/✗ mark,
    and the whole report."""
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert exposure is not None, proc.stdout[-500:] + proc.stderr[-500:]
    marks = {setting: mark for mark, setting in re.findall(r"^([✓✗]) (\S+=)", proc.stdout, re.M)}
    return {"exposure": exposure.group(1), **marks}, proc.stdout


def test_unit_with_the_gpu_drop_in_passes_verify_and_shows_the_devices(tmp_path):
    """With systemd/gpu.conf as a drop-in the unit passes `systemd-analyze verify`, and the drop-in is
    applied: PrivateDevices= is off and DeviceAllow= lists the NVIDIA device groups (exposure 1.1)."""
    unit = _with_drop_in(tmp_path, "gpu.conf")
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr.strip()) == (0, "")
    security, report = _security(unit)
    assert {k: security[k] for k in ("exposure", "PrivateDevices=", "DeviceAllow=", "PrivateUsers=")} == {
        "exposure": "1.1", "PrivateDevices=": "✗", "DeviceAllow=": "✗", "PrivateUsers=": "✓"}
    [allowed] = [line for line in report.splitlines() if line.startswith("✗ DeviceAllow=")]
    assert re.findall(r"char-[\w-]+:rw", allowed) == [
        "char-nvidia-caps:rw", "char-nvidia-uvm:rw", "char-nvidia:rw", "char-nvidia-frontend:rw"]


def test_unit_with_the_shared_group_drop_in_passes_verify(tmp_path):
    """With systemd/shared-group.conf as a drop-in the unit passes `systemd-analyze verify`, and the
    drop-in is applied: UMask 0007 and PrivateUsers= off (exposure 1.1)."""
    unit = _with_drop_in(tmp_path, "shared-group.conf")
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr.strip()) == (0, "")
    security, _ = _security(unit)
    assert {k: security[k] for k in ("exposure", "PrivateUsers=", "UMask=", "PrivateDevices=")} == {
        "exposure": "1.1", "PrivateUsers=": "✗", "UMask=": "✗", "PrivateDevices=": "✓"}
