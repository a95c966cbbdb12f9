"""The exit-code contract of every tool beside bench/run.py (whose cases are in tests/test_exit_codes.py): bad
input is one line naming the value and what is allowed, exit code 2, no traceback, and it is found before any
process, probe or file is started. Each tool's ``main`` runs in this process (its ``python -m`` wiring is
``sys.exit(main())``, exercised by the tools' own tests); a table of cases per tool."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.unit

PLAN, TUNE, REPORTS = "bench.plan.__main__", "bench.tune.__main__", "reports.__main__"
CONVERT, GATE = "models.convert", "bench.gate.cli"


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``module.main(argv)``: its return value or its SystemExit code."""
    main = importlib.import_module(module).main
    try:
        code = main(argv) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01 not a checkpoint")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2", ')
    (tmp_path / "res").mkdir()
    return tmp_path


def cases(t):
    """(module, argv, the one line's expected text)."""
    return [
        # the planner
        (PLAN, ["world_size=100000000000000000000"],
         "world_size=100000000000000000000 is invalid; must be within 1 .. 1,048,576"),
        (PLAN, ["micro_batch=-1"], "micro_batch=-1 is invalid; must be within 0 .. 1,048,576"),  # 0: searched
        (PLAN, ["global_batch=8", "global_batch_tokens=2048"], "give global_batch= (sequences) or "
                                                              "global_batch_tokens=, not both"),
        (PLAN, ["global_batch_tokens=1000", "model=tiny"], "global_batch_tokens=1000 is not a multiple of seq_len=256"),
        (PLAN, ["pad_vocab_to=-2"], "pad_vocab_to=-2 is invalid; must be >= 0"),
        (PLAN, ["model=gpt9"], "model='gpt9' is not a preset; valid: tiny"),
        (PLAN, ["format=sh"], "format='sh'; valid: table, json, commands"),
        (PLAN, ["gpus_per_node=0"], "gpus_per_node=0 is invalid; must be >= 1"),
        (PLAN, ["world_size=12", "gpus_per_node=8"], "world_size=12 is not a whole number of nodes of gpus_per_node=8"),
        (PLAN, ["top=-1"], "top=-1 is invalid; must be >= 0"),
        # the tuner: every check before its probes (the runs' own check, bench/harness/precheck.py)
        (TUNE, ["seq_len=-1"], "seq_len=-1 is invalid; must be >= 0"),
        (TUNE, ["model=tiny", "warmup=-1"], "warmup=-1 is invalid: must be >= 0"),
        (TUNE, ["model=tiny", f"results_dir={t}/afile"], "afile' is invalid: it exists and is not a folder"),
        (TUNE, ["model=tiny", "steps=99999999999999999999"], "steps=99999999999999999999 is invalid"),
        (TUNE, ["model=tiny", "model_overrides=[model.n_head=5]"],  # the form its --help shows
         "n_embd=128 is invalid: must be divisible by n_head=5"),
        (TUNE, ["model=tiny", "model.n_head=5"], "n_embd=128 is invalid: must be divisible by n_head=5"),
        (TUNE, ["model=tiny", "top=0"], "top=0 is invalid; must be >= 1"),
        # reports
        (REPORTS, [f"results={t}/res", f"out={t}/afile"], f"out='{t}/afile' exists and is not a folder"),
        (REPORTS, [f"results={t}/none", f"out={t}/o"], "none: no such file, folder or glob match"),
        (REPORTS, [f"results={t}/res", "out=/proc/n00bgpt/report"], "cannot write the report there"),
        # the converter
        (CONVERT, ["to=hf", f"src={t}/junk.pt", f"dst={t}/o"], "junk.pt: not a family checkpoint"),
        (CONVERT, ["to=hf", f"src={t}/none.pt", f"dst={t}/o"], "none.pt': no such file"),
        (CONVERT, ["to=native", f"src={t}/afile", f"dst={t}/o.pt"], "afile': no such folder"),
        (CONVERT, ["to=native", f"src={t}/hf", f"dst={t}/o.pt"], "hf/config.json: not a readable JSON file"),
        (CONVERT, ["to=native", f"src={t}/hf", f"dst={t}/res"], "res' is a folder"),
        (CONVERT, ["to=fp8", f"src={t}/hf", f"dst={t}/o"], "to='fp8'; valid: hf, native"),
        # the launchers
        ("bench.launch.slurm", ["out_dir=/proc/n00bgpt/jobs"], "cannot write the script (/proc/n00bgpt"),
        ("bench.launch.slurm", ["nodes=0"], "nodes=0 is invalid; must be >= 1"),
        ("bench.launch.gpu_suite", [f"out={t}/afile"], "afile' exists and is not a folder"),
        ("bench.launch.gpu_suite", ["only=[nope]", f"out={t}/gpu"], "only=['nope']: not entries of the suite; valid:"),
        ("bench.gate.ci_suite", ["repeats=0", f"out={t}/ci"], "repeats=0, budget=900: both must be >= 1"),
        ("bench.launch.ab", ["rounds=0"], "rounds=0, steps=10: both must be >= 1"),
        ("bench.launch.overhead", ["steps=-1"], "rounds and steps must be >= 1"),
        # the A/B gate
        (GATE, ["ab=true", "rev=no-such-revision"], "revision 'no-such-revision' is not a commit"),
        (GATE, ["ab=true", "rounds=-1", f"out={t}/ab"], "rounds=-1 must be >= 1"),
    ]


def test_every_tool_refuses_bad_input_with_one_line_and_exit_2(files, capsys):
    problems = []
    for module, argv, expect in cases(files):
        code, out, err = run_main(module, argv, capsys)
        lines = [ln for ln in (out + err).splitlines() if ln.strip()]
        why = (f"exit {code}" if code != 2 else f"{len(lines)} lines" if len(lines) != 1
               else f"lacks {expect!r}" if expect not in lines[0] else None)
        if why:
            problems.append(f"{module} {argv}: {why}: {(out + err)[-500:]}")
    assert not problems, "\n".join(problems)
    # nothing was started or written: no report, no checkpoint, no tuner results, no gate output
    assert sorted(p.name for p in files.iterdir()) == ["afile", "hf", "junk.pt", "res"]
    assert list((files / "res").iterdir()) == []
