"""The typed run record and the house's walls: one schema (reports/record.py) that the writer builds and every
reader takes its columns from; committed tables read the same with the new code as with the code before it;
imports flow one way."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from reports import load
from reports.record import COLUMNS, META, REQUIRED_COLUMNS, SETUP_KEYS, RunRecord, implausible, variant_label
from tests.helpers import ROOT

pytestmark = pytest.mark.unit

RULES = {"max", "min", "sum", "mean", "union", "rank0", "per_rank", "derived"}
# The last revision before the record existed (its reports/load.py read bench/results.py's column list).
OLD_REV = "f79f9f59d74affc8f5714c215bca882e4c8a0ebd"


def test_every_column_is_documented_and_every_metric_has_a_cross_rank_rule():
    for f in fields(RunRecord):
        m = f.metadata
        assert m["kind"] in {"identity", "setup", "metric", "telemetry", "prediction", "outcome", "provenance",
                             "config"}, f.name
        if m["kind"] in ("metric", "telemetry", "prediction"):
            assert m["rule"] in RULES and m["unit"] is not None and m["doc"], f.name
        else:
            assert m["rule"] is None, f.name
    assert set(REQUIRED_COLUMNS) <= set(COLUMNS) and set(SETUP_KEYS) <= set(COLUMNS)
    assert META["peak_mem_bytes"]["rule"] == "max" and META["peak_mem_bytes"]["unit"] == "bytes"


def test_a_record_refuses_an_unknown_column():
    with pytest.raises(TypeError, match="tokens_per_second"):
        RunRecord(run_id="r", tokens_per_second=1.0)
    row = RunRecord(run_id="r", mfu=0.5).to_row()
    assert list(row) == COLUMNS and row["mfu"] == 0.5 and row["loss"] is None


def test_implausible_and_variant_label():
    assert implausible({"mfu": 0.4, "hfu": 0.6}) is None
    assert "hfu=1.200 > 1 cannot be true" in implausible({"mfu": 0.9, "hfu": 1.2, "peak_flops": 1e9})
    assert implausible({"mfu": float("nan"), "hfu": None}) is None
    assert variant_label("single", "fp32") == "single" and variant_label("fsdp+bf16", "bf16") == "fsdp+bf16"
    assert variant_label("single", "tf32") == "single (tf32)"
    assert variant_label("fsdp+ac(full)+bf16", "bf16", "hf") == "fsdp+ac(full)+bf16 [HF]"
    assert variant_label("single", "tf32", "hf") == "single (tf32) [HF]"
    assert variant_label("single", "fp32", "native") == "single"


def _tables() -> list[Path]:
    """The folders of the committed result tables (a developer's own runs in results/ are not committed)."""
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "results"], capture_output=True, text=True,
                             check=True).stdout.split()
    return sorted({(ROOT / f).parent for f in tracked if f.endswith(".jsonl") and Path(f).parent.name != "steps"})


def test_committed_results_load_the_same_as_with_the_code_before_the_record(tmp_path):
    """Every committed table, read by this code and by OLD_REV's reader (exported with git archive): the same
    columns in the same order and the same values."""
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD_REV}^{{commit}}"]).returncode:
        pytest.skip(f"{OLD_REV[:12]} is not in this checkout (a shallow clone)")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_REV, "reports", "bench"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    tables = _tables()
    assert len(tables) >= 4  # the CI baseline, the GPU suite, the noise study ...
    script = ("import json, sys, warnings; sys.path.insert(0, sys.argv[1]); warnings.simplefilter('ignore');"
              "from reports.load import load;"
              "print(json.dumps({p: [list(d.columns), d.to_json()] for p in sys.argv[2:] for d in [load(p)]}))")
    res = subprocess.run([sys.executable, "-c", script, str(old), *map(str, tables)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    before = json.loads(res.stdout)
    # columns the reader has added since, with the value every committed (older) row must get
    added = {"model_source": "native"}
    for path in tables:
        df = load(path)
        for column, value in added.items():
            if column not in before[str(path)][0]:  # a table written before the column: filled by the reader
                assert (df.pop(column) == value).all(), (path, column)
        assert list(df.columns) == before[str(path)][0], path
        assert json.loads(df.to_json()) == json.loads(before[str(path)][1]), path


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


WALLS = {  # room -> the project packages it must not import
    "reports": ("bench", "strategies", "models"),
    "models": ("bench", "strategies", "reports"),
    "strategies": ("bench", "reports"),
    "bench/measure": ("bench.harness", "bench.gate", "bench.launch", "bench.plan", "bench.run", "strategies"),
    "bench/plan": ("bench.harness", "bench.gate", "bench.launch", "bench.measure", "bench.run"),
    "bench/gate": ("bench.harness.loop", "bench.measure", "bench.plan", "strategies", "models"),
    # the run only measures: prediction annotates the row from bench/run.py (bench/plan/annotate.py)
    "bench/harness": ("bench.plan", "bench.gate", "bench.launch", "bench.tune", "bench.run"),
}


PACKAGES = ("bench", "models", "strategies", "reports")


def _module_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, wherever the import statement sits (a
    function-level import counts as much as one at the top): ``from a import b`` is an edge to ``a.b`` when that
    is a module, else to ``a``."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files]
                out.update(subs or ([node.module] if node.module in files else []))
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in files)
        graph[mod] = out - {mod}
    return graph


def test_no_module_imports_itself_back():
    """No import cycle among the project's modules (Tarjan's strongly connected components), including those a
    function-level import would close."""
    graph = _module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check itself: a function-level import that closes a loop is found."""
    for name, text in {"a.py": "import reports.b\n", "b.py": "def f():\n    from reports import a\n"}.items():
        (tmp_path / "reports" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "reports" / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError):
        test_no_module_imports_itself_back()


def test_the_hardware_table_is_a_leaf():
    """bench/hardware.py (the datasheet table that measurement and planner both read) imports nothing."""
    assert _imports(ROOT / "bench" / "hardware.py") <= {"__future__"}


@pytest.mark.parametrize("room", list(WALLS))
def test_imports_flow_one_way(room):
    bad = []
    for path in sorted((ROOT / room).rglob("*.py")):
        for mod in _imports(path):
            if mod == "models.cli":
                continue  # the one CLI style: a leaf (OmegaConf only) that every command line uses
            if any(mod == w or mod.startswith(w + ".") for w in WALLS[room]):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad
    assert _imports(ROOT / "models" / "cli.py") <= {"__future__", "dataclasses", "sys", "typing", "omegaconf",
                                                    "omegaconf.errors"}
    if room == "reports":  # the record is a leaf: standard library only
        assert {m.split(".")[0] for m in _imports(ROOT / "reports" / "record.py")} <= {"__future__", "dataclasses"}


def test_git_sha_is_a_commit_or_nothing(tmp_path, monkeypatch):
    """A tree copied without history (a repository with no commits, where ``git rev-parse HEAD`` prints the
    literal 'HEAD') records no SHA rather than 'HEAD'; N00BGPT_GIT_SHA names it for such a copy."""
    import re
    import subprocess

    from bench.harness import env

    monkeypatch.delenv("N00BGPT_GIT_SHA", raising=False)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env.git_sha())  # this checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.setattr(env, "REPO", tmp_path)
    assert env.git_sha() is None
    monkeypatch.setattr(env, "REPO", tmp_path / "not-a-repo")
    (tmp_path / "not-a-repo").mkdir()
    assert env.git_sha() is None
    monkeypatch.setenv("N00BGPT_GIT_SHA", "0123abcd" * 5)
    assert env.git_sha() == "0123abcd" * 5


def test_allocator_names_the_malloc_mapped_into_the_process_and_its_settings():
    """``allocator``: a malloc loaded into the process (its library in /proc/self/maps, as LD_PRELOAD puts it)
    wins; else glibc with the tunables set in the environment; a GPU run names the caching allocator and its
    configuration. A real child process started with a fixed mmap threshold reports it."""
    import os

    import torch

    from bench.harness.env import allocator

    cpu = torch.device("cpu")
    libc = "7f0000000000-7f0000001000 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    jemalloc = "7f0000002000-7f0000003000 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert allocator(cpu, libc + jemalloc, {"MALLOC_MMAP_THRESHOLD_": "65536"}) == "jemalloc"
    assert allocator(cpu, libc, {}) == "glibc"
    assert allocator(cpu, libc + "7f0000004000-7f0000005000 rw-p 00000000 00:00 0 [heap]\n",
                     {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2", "OTHER": "1"}) == \
        "glibc (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_ARENA_MAX=2)"
    assert allocator(torch.device("cuda"), "", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}) == \
        "cuda caching (expandable_segments:True)"
    assert allocator(torch.device("cuda"), "", {}) == "cuda caching"
    out = subprocess.run([sys.executable, "-c", "import torch; from bench.harness.env import allocator; "
                          "print(allocator(torch.device('cpu')))"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=120)
    assert out.stdout.strip() == "glibc (MALLOC_MMAP_THRESHOLD_=65536)", out.stderr[-500:]
