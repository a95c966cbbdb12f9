"""Setup never installs a CUDA build of torch on a CPU-only machine (bench/launch/install_torch.py, run by
``make setup``): in a fresh virtual environment, a CPU build offered by pip's sources is installed; a
source that offers only the CUDA build (fake wheels the test writes, and the real public index under
``env -i``) gets one message and no torch at all."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.launch.install_torch import VERSION, has_nvidia_gpu
from tests.helpers import ROOT

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(has_nvidia_gpu(), reason="the CPU-only path needs a machine without an NVIDIA driver")]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment (with pip, without torch) from the interpreter behind this one."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(path)], check=True)
    return path


def fake_torch_wheel(folder: Path, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal wheel named torch with this version and these requirements (what pip reads to decide)."""
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def install(venv: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "bench.launch.install_torch", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def torch_in(venv: Path) -> str | None:
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                       capture_output=True, text=True, cwd="/")
    return r.stdout.strip() if r.returncode == 0 else None


def offline_env(links: Path) -> dict:
    """No pip configuration, no index: only the wheels in ``links``."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(links), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(links)}


def test_only_a_cuda_build_offered_installs_nothing_and_says_so(venv, tmp_path):
    fake_torch_wheel(tmp_path, VERSION, ("nvidia-cublas-cu13==13.0.0; platform_system == 'Linux'",))
    r = install(venv, offline_env(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "only the CUDA build" in r.stdout and "nothing was installed" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert torch_in(venv) is None


def test_public_index_only_under_env_i_installs_no_cuda_build(venv):
    """The issue's case: ``env -i`` and no pip configuration, so only PyPI (whose Linux torch is the CUDA
    build) and PyTorch's CPU index (not reachable from this kind of machine) remain."""
    cert = [f"PIP_CERT={c}" for c in ["/etc/ssl/certs/ca-certificates.crt"] if os.path.exists(c)]  # TLS as usual
    r = subprocess.run(["env", "-i", f"PIP_CONFIG_FILE={os.devnull}", *cert, str(venv / "bin" / "python"), "-m",
                        "bench.launch.install_torch"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    version = torch_in(venv)
    if r.returncode == 0:  # PyTorch's CPU index was reachable: its CPU build, nothing else
        assert version and version.endswith("+cpu")
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torch"], check=True)
    else:
        assert version is None and "nothing was installed" in r.stderr
        assert "only the CUDA build" in r.stdout  # PyPI was asked and its build refused


def test_a_cpu_build_is_installed_and_a_present_torch_kept(venv, tmp_path):
    fake_torch_wheel(tmp_path, f"{VERSION}+cpu")
    r = install(venv, offline_env(tmp_path), "dry_run=true")
    assert r.returncode == 0 and "CPU build" in r.stdout and "would run" in r.stdout
    assert torch_in(venv) is None
    r = install(venv, offline_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert torch_in(venv) == f"{VERSION}+cpu"
    r = install(venv, offline_env(tmp_path))  # a second setup keeps it (as it keeps a GPU user's CUDA build)
    assert r.returncode == 0 and "already installed: kept" in r.stdout


def test_bad_argument_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "bench.launch.install_torch", "dryrun=true"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "install_torch: bad argument 'dryrun=true'; valid: dry_run=true|false"
