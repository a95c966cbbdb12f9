"""The GPU validation suite: one declarative run matrix, one process (group) per entry.

    bash bench/launch/gpu_suite.sh OUT_DIR             # on a GPU machine (installs carried wheels if needed)
    python -m bench.launch.gpu_suite out=OUT_DIR          # the same, without the wheel step
    python -m bench.launch.gpu_suite cpu=true out=DIR     # dry run on CPU: same matrix, model tiny, fp32-sized steps
    python -m bench.launch.gpu_suite dry_run=true         # print the commands only

Each entry runs ``bench/run.py`` (under ``torchrun --standalone --nproc_per_node=1`` when the strategy
is distributed), bounded by a per-entry timeout, so one failure never stops the suite; its row
lands in ``OUT_DIR/results/`` either way. At the end: a markdown summary table, the report
(``OUT_DIR/report/index.html``, python -m reports) and one configuration's torch.profiler trace
(``profile_dir``) in OUT_DIR.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.launch import suite  # noqa: E402
from bench.launch.suite import Entry  # noqa: E402
from models.cli import fail, opt, parse  # noqa: E402

ROOT = suite.ROOT

# gpt2 models pad the vocabulary to 50304 (a multiple of 64) as nanoGPT/llm.c do for speed.
COMMON = ["seq_len=1024", "model.pad_vocab_to=64", "steps=20", "warmup=5", "log_every=10"]

# suite.Entry(label, model, strategy preset, extra overrides, nproc)
MATRIX = [
    Entry("small-bf16-compile", "gpt2-small", "bf16_compile", ["micro_batch=16"], 0),
    Entry("small-tf32", "gpt2-small", "single", ["micro_batch=16"], 0),
    Entry("small-bf16", "gpt2-small", "bf16", ["micro_batch=16"], 0),
    Entry("small-fsdp-bf16-compile", "gpt2-small", "fsdp_bf16_compile", ["micro_batch=16"], 1),
    Entry("small-ddp-bf16-compile", "gpt2-small", "ddp_bf16_compile", ["micro_batch=16"], 1),
    Entry("small-fsdp-ac-bf16", "gpt2-small", "fsdp_ac_bf16", ["micro_batch=16"], 1),
    Entry("small-fsdp-bf16", "gpt2-small", "fsdp_bf16", ["micro_batch=16"], 1),  # the pair without AC
    Entry("small-bf16-compile-model", "gpt2-small", "bf16_compile",
          ["micro_batch=16", "strategy.compile_mode=model"], 0),
    Entry("small-bf16-compile-model-mb32", "gpt2-small", "bf16_compile",
          ["micro_batch=32", "strategy.compile_mode=model"], 0),
    Entry("medium-fsdp-bf16-compile", "gpt2-medium", "fsdp_bf16_compile", ["micro_batch=8"], 1),
    Entry("large-fsdp-ac-bf16", "gpt2-large", "fsdp_ac_bf16", ["micro_batch=8"], 1),
]
PROFILE = Entry("small-bf16-compile-profiled", "gpt2-small", "bf16_compile",
                ["micro_batch=16", "steps=6", "warmup=3"], 0)

# CPU dry run: same entries, sized for a laptop core (fp32 stands in for bf16, which CPUs here lack).
CPU_OVERRIDES = ["model=tiny", "model.n_layer=2", "seq_len=32", "micro_batch=1", "steps=2", "warmup=1",
                 "strategy.amp=fp32", "device=cpu"]


def command(entry, results: Path, cpu: bool, profile_dir: Path | None = None) -> list[str]:
    common = COMMON + list(entry.overrides)
    if cpu:
        common = [a for a in common if not a.startswith(("micro_batch=", "steps=", "warmup="))] + CPU_OVERRIDES
    more = [f"profile_dir={profile_dir}"] if profile_dir is not None else []
    return suite.command(entry._replace(overrides=[]), results, common, "gpu_suite", more)


def summary_table(results: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from reports import load
    from reports.aggregate import format_value
    from reports.build import markdown_table

    rows = [[r["device_name"], r["model"], r["strategy"], str(r["tag"]).removeprefix("gpu_suite:"), r["micro_batch"],
             format_value("tokens_per_sec", r["tokens_per_sec"]), format_value("mfu", r["mfu"]),
             format_value("peak_mem_gib", None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30),
             r["status"]] for _, r in load(results).iterrows()]
    return markdown_table(["device", "model", "strategy", "entry", "micro_batch", "tokens/s", "MFU",
                           "peak mem (GiB)", "status"], rows) + "\n"


@dataclass
class GpuSuiteArgs:
    out: str = opt("gpu_suite_out", "output folder (results/, summary.md, report/, trace)")
    cpu: bool = opt(False, "dry run on CPU with a tiny model")
    dry_run: bool = opt(False, "print the commands and exit")
    timeout: int = opt(120, "seconds per entry")
    budget: int = opt(450, "total seconds; later entries are skipped past it")
    only: list[str] = opt([], "labels to run (default: all)")

def main(argv=None) -> int:
    prog = "python -m bench.launch.gpu_suite"
    args = parse(GpuSuiteArgs, argv, prog, __doc__)
    out = Path(args.out).resolve()
    labels = [e.label for e in [*MATRIX, PROFILE]]
    unknown = [x for x in args.only if x not in labels]
    if unknown:
        fail(prog, f"only={unknown}: not entries of the suite; valid: {', '.join(labels)}")
    if out.exists() and not out.is_dir():
        fail(prog, f"out={args.out!r} exists and is not a folder")
    results = out / "results"
    entries = [e for e in MATRIX if not args.only or e.label in args.only]
    plan = [(e, command(e, results, args.cpu)) for e in entries]
    if not args.only or PROFILE.label in args.only:
        # after the single-GPU strategies, before the larger models: the trace is a deliverable
        plan.insert(min(6, len(plan)), (PROFILE, command(PROFILE, out / "profile", args.cpu, profile_dir=out)))
    if args.dry_run:
        for _, cmd in plan:
            print(shlex.join(cmd))
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(prog, f"out={args.out!r}: cannot make the folder: {exc.strerror or exc}")
    failures = suite.run_plan([(e.label, cmd) for e, cmd in plan], args.timeout, args.budget)
    if (results / "runs.jsonl").exists():
        table = summary_table(results)
        (out / "summary.md").write_text(table)
        print(table)
        from reports import build, load

        index = build.write(build.build(load(results)), out / "report")
        print(f"[suite] report: {index}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
