"""Install PyTorch for this machine before the project (run by ``make setup``; standard library only).

    python -m bench.launch.install_torch               # what make setup runs
    python -m bench.launch.install_torch dry_run=true  # say what it would do, install nothing

A torch that already imports is kept (a GPU user's own CUDA build, or an earlier setup). On a machine
with an NVIDIA driver, ``torch==VERSION`` comes from the default index (a CUDA build). On a CPU-only
machine only a CPU build is installed, from the first of these sources that offers one:

1. the package sources pip is configured with (a local wheel through ``find-links``, a mirror);
2. PyTorch's CPU wheel index, https://download.pytorch.org/whl/cpu.

A "CPU build" is a torch whose metadata requires no ``nvidia-*`` package (PyPI's Linux wheels require
several GB of them; the CPU index's carry ``+cpu`` and none). If neither source offers one, it stops
before installing anything, with one message saying how to go on, instead of letting pip fetch the CUDA
build. pip is asked with ``--dry-run --report`` (metadata only, a few seconds) before anything is installed.
It runs before anything else is installed, so it parses its one ``key=value`` option itself (the other tools
use models/cli.py, which needs OmegaConf).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is present (``nvidia-smi`` on PATH or the kernel module's proc entry)."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")


def torch_present() -> str | None:
    """The version of a torch that imports in this interpreter, or None."""
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def resolve(index_args: list[str]) -> dict | None:
    """What ``pip install torch==VERSION`` would take from these sources: {"version", "url", "cuda"}, or
    None when the sources offer no such wheel (or cannot be reached)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet",
                            "--report", report, "--timeout", "15", "--retries", "1", *index_args,
                            f"torch=={VERSION}"], capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(report):
            return None
        with open(report) as f:
            items = [i for i in json.load(f).get("install", []) if i["metadata"]["name"].lower() == "torch"]
    if not items:
        return None
    meta = items[0]["metadata"]
    cuda = any(req.lower().startswith("nvidia-") for req in meta.get("requires_dist") or []) \
        or "+cu" in meta["version"]
    return {"version": meta["version"], "url": items[0]["download_info"]["url"], "cuda": cuda}


def pip_install(index_args: list[str], version: str, dry_run: bool) -> int:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *index_args, f"torch=={version}"]
    if dry_run:
        say("would run: " + " ".join(cmd))
        return 0
    say("running: " + " ".join(cmd))
    return subprocess.run(cmd).returncode


def parse(argv: list[str]) -> bool | None:
    """``dry_run=true|false`` -> its value; ``-h``/``--help`` -> None (help printed). Anything else: one line
    naming the bad argument and the valid ones, exit 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nkeys:\n  dry_run=<bool>  (default False)  say what would be installed, "
              "install nothing")
        return None
    dry_run = False
    for a in argv:
        key, _, value = a.partition("=")
        if key != "dry_run" or value.lower() not in ("true", "false"):
            print(f"install_torch: bad argument {a!r}; valid: dry_run=true|false", file=sys.stderr)
            sys.exit(2)
        dry_run = value.lower() == "true"
    return dry_run


def main(argv: list[str] | None = None) -> int:
    dry_run = parse(sys.argv[1:] if argv is None else argv)
    if dry_run is None:
        return 0
    have = torch_present()
    if have:
        say(f"torch {have} already installed: kept")
        return 0
    if has_nvidia_gpu():
        say(f"NVIDIA driver found: torch=={VERSION} from the default index (a CUDA build)")
        return pip_install([], VERSION, dry_run)
    say(f"no NVIDIA driver: looking for a CPU build of torch=={VERSION} (pip --dry-run, metadata only)")
    for index_args, where in (([], "pip's configured sources"), (["--index-url", CPU_INDEX], CPU_INDEX)):
        found = resolve(index_args)
        if found is None:
            say(f"  {where}: no torch=={VERSION} reachable")
        elif found["cuda"]:
            say(f"  {where}: only the CUDA build {found['version']} (needs nvidia-* packages, several GB): skipped")
        else:
            say(f"  {where}: CPU build {found['version']} ({found['url']})")
            return pip_install(index_args, found["version"], dry_run)
    print(f"setup: no CPU build of torch=={VERSION} is reachable (pip's configured sources and {CPU_INDEX} "
          "offer none) and the default index's would pull the CUDA build (several GB); nothing was installed. "
          f"Install a CPU build first (pip install /path/to/torch-{VERSION}+cpu-...whl, or set PIP_FIND_LINKS to "
          "a folder holding one), or install the torch you want yourself, then run make again.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
