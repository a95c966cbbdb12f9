"""One command-line style: every ``python -m`` entry point takes key=value overrides (models/cli.py over its
dataclass), answers --help with its keys, and refuses an unknown key or a bad value in one line, exit 2."""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.e2e

ENTRY_POINTS = {  # module -> a key it documents
    "bench.plan": "world_size", "bench.gate": "ab", "bench.gate.study": "gates", "bench.gate.noise": "rounds",
    "bench.gate.ci_suite": "repeats", "bench.launch.gpu_suite": "only", "bench.launch.slurm": "nodes",
    "bench.launch.overhead": "micro_batch", "reports": "baseline", "models": "format", "bench.tune.parts": "tp",
}


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def run_in_process(module: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """The module run as ``python -m module argv`` in this process (no interpreter start-up per case)."""
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy of an imported module
@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_help_lists_the_keys_and_an_unknown_key_is_one_line(module, capsys, monkeypatch):
    code, out, err = run_in_process(module, ["--help"], capsys, monkeypatch)
    assert code == 0 and f"  {ENTRY_POINTS[module]}=<" in out, err[-2000:]
    code, out, err = run_in_process(module, ["no_such_key=1"], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"python -m {module}: error: unknown key 'no_such_key'; valid keys: "
                                        + err.split("valid keys: ")[1].strip()]
    assert ENTRY_POINTS[module] in err
    code, _, err = run_in_process(module, ["--out", "x"], capsys, monkeypatch)
    assert code == 2 and "expected key=value, got '--out'" in err


def test_a_real_command_line(tmp_path):
    res = run("-m", "bench.plan", "model=tiny", "world_size=2", "format=json")
    assert res.returncode == 0 and '"strategy": "fsdp"' in res.stdout
    bad = run("-m", "bench.plan", "model=tiny", "world_size=two")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "world_size" in bad.stderr


def test_values_are_typed_and_lists_take_commas_or_brackets():
    from dataclasses import dataclass

    from models.cli import opt, parse

    @dataclass
    class Args:
        n: int = opt(1, "a number")
        names: list[str] = opt([], "some names")
        rest: list[str] = opt([], "after --", passthrough=True)

    a = parse(Args, ["n=3", "names=a,b"])
    assert (a.n, a.names, a.rest) == (3, ["a", "b"], [])
    assert parse(Args, ["names=[x,y]", "--", "model=tiny", "steps=2"]).rest == ["model=tiny", "steps=2"]
    with pytest.raises(SystemExit) as e:
        parse(Args, ["n=three"], prog="t")
    assert e.value.code == 2


def test_the_run_entry_and_the_sweep_answer_help_too():
    assert run("bench/run.py", "--help").returncode == 0
    assert "sweep" in run("bench/launch/sweep.py", "--help").stdout


def test_run_help_lists_exactly_the_strategy_presets():
    """bench/run.py --help offers the preset files and nothing else (no schema entry posing as a preset)."""
    r = run("bench/run.py", "--help")
    line = next(x for x in r.stdout.splitlines() if x.startswith("strategy: "))
    presets = sorted(p.stem for p in (ROOT / "bench" / "conf" / "strategy").glob("*.yaml"))
    assert line.removeprefix("strategy: ").split(", ") == presets
