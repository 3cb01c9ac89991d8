"""The GPU part of the capability report (daemon.serving.capability.gpu_check): torch's build read
from package metadata in a site folder, the NVIDIA devices from a /dev folder, both real folders."""

from __future__ import annotations

from pathlib import Path

from daemon.serving.capability import CapabilityReport, gpu_check, torch_build

DROP_IN_HINT = ("under systemd, install the GPU drop-in (systemd/gpu.conf into "
                "/etc/systemd/system/fine-tuner.service.d/, then systemctl daemon-reload and restart the "
                "service: PrivateDevices=yes hides the GPU); otherwise check the NVIDIA driver with nvidia-smi")


def _dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """An installed distribution as pip leaves it: ``<name>-<version>.dist-info/METADATA``."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def _dev(tmp_path: Path, *names: str) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in names:
        (dev / name).touch()
    return dev


def _gpu(dev: Path, site: Path) -> tuple[str, bool, str, bool]:
    report = CapabilityReport(model="llama3.2:1b")
    gpu_check(report, dev_dir=dev, site_dirs=[str(site)])
    [check] = report.checks
    return check.name, check.ok, check.detail, check.required


def test_cuda_build_without_a_visible_gpu_names_the_drop_in(tmp_path):
    """A +cu torch with no /dev/nvidiactl or /dev/nvidia0 fails the optional gpu_device check with the
    GPU drop-in as the fix."""
    _dist(tmp_path / "site", "torch", "2.13.0+cu128")
    dev = _dev(tmp_path, "null", "zero")
    assert _gpu(dev, tmp_path / "site") == (
        "gpu_device", False,
        f"torch 2.13.0+cu128 is a CUDA build but no NVIDIA GPU is visible ({dev}/nvidiactl, {dev}/nvidia0 "
        f"missing), so fine-tunes will train on the CPU: {DROP_IN_HINT}", False)


def test_cuda_build_with_one_device_missing_names_it(tmp_path):
    """/dev/nvidiactl present but /dev/nvidia0 missing is still no GPU, and only the missing one is named."""
    _dist(tmp_path / "site", "torch", "2.13.0+cu128")
    dev = _dev(tmp_path, "nvidiactl")
    assert _gpu(dev, tmp_path / "site")[1:3] == (
        False, f"torch 2.13.0+cu128 is a CUDA build but no NVIDIA GPU is visible ({dev}/nvidia0 missing), so "
               f"fine-tunes will train on the CPU: {DROP_IN_HINT}")


def test_pypi_cuda_wheel_is_recognised_by_its_cuda_runtime(tmp_path):
    """A torch version without a local part whose nvidia-cuda-runtime requirement is installed (PyPI's
    Linux wheels) is a CUDA build; with the devices visible the check passes."""
    site = tmp_path / "site"
    _dist(site, "torch", "2.13.0", ('nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"',
                                    "filelock"))
    _dist(site, "nvidia-cuda-runtime-cu12", "12.8.90")
    dev = _dev(tmp_path, "nvidiactl", "nvidia0", "nvidia-uvm")
    assert _gpu(dev, site) == (
        "gpu_device", True, f"torch 2.13.0 is a CUDA build and the NVIDIA GPU is visible ({dev}/nvidiactl, "
                            f"{dev}/nvidia0): fine-tunes train on the GPU", False)


def test_a_cuda_runtime_requirement_that_is_not_installed_is_not_a_cuda_build(tmp_path):
    """A torch that names nvidia-cuda-runtime for another platform (not installed) is not a CUDA build."""
    site = tmp_path / "site"
    _dist(site, "torch", "2.13.0", ('nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"',))
    assert torch_build([str(site)]) == ("2.13.0", False)


def test_cpu_build_with_a_visible_gpu_says_to_install_a_cuda_build(tmp_path):
    """A +cpu torch on a machine whose GPU is visible fails the optional check: install a CUDA build."""
    _dist(tmp_path / "site", "torch", "2.13.0+cpu")
    dev = _dev(tmp_path, "nvidiactl", "nvidia0")
    assert _gpu(dev, tmp_path / "site")[1:3] == (
        False, f"an NVIDIA GPU is visible ({dev}/nvidiactl, {dev}/nvidia0) but torch 2.13.0+cpu is not a "
               "CUDA build, so fine-tunes will train on the CPU: install a CUDA build of torch")


def test_cpu_build_without_a_gpu_passes_and_says_cpu(tmp_path):
    """A +cpu torch with no GPU passes: training on the CPU is what this machine can do."""
    _dist(tmp_path / "site", "torch", "2.13.0+cpu")
    dev = _dev(tmp_path)
    assert _gpu(dev, tmp_path / "site")[1:3] == (
        True, "torch 2.13.0+cpu is not a CUDA build and no NVIDIA GPU is visible: fine-tunes train on the CPU")


def test_no_torch_adds_no_gpu_check(tmp_path):
    """Without torch there is nothing to say about the GPU (trainer_packages reports the missing package)."""
    (tmp_path / "site").mkdir()
    report = CapabilityReport(model="llama3.2:1b")
    gpu_check(report, dev_dir=_dev(tmp_path, "nvidiactl", "nvidia0"), site_dirs=[str(tmp_path / "site")])
    assert (report.checks, report.facts) == ([], {})
