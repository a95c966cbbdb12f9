"""The GPU validation suite: one declarative run matrix, one process (group) per entry.

    bash bench/launch/gpu_suite.sh OUT_DIR             # on a GPU machine (installs carried wheels if needed)
    python bench/launch/gpu_suite.py --out OUT_DIR     # the same, without the wheel step
    python bench/launch/gpu_suite.py --cpu --out DIR   # dry run on CPU: same matrix, model tiny, fp32-sized steps
    python bench/launch/gpu_suite.py --list            # print the commands only

Each entry runs ``bench/run.py`` (under ``torchrun --standalone --nproc_per_node=1`` when the strategy
is distributed), bounded by a per-entry timeout, so one failure never stops the suite; its row
lands in ``OUT_DIR/results/`` either way. At the end: a markdown summary table, the report
(``OUT_DIR/report/index.html``, python -m reports) and one configuration's torch.profiler trace
(``profile_dir``) in OUT_DIR.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.launch import suite  # noqa: E402

ROOT = suite.ROOT

# gpt2 models pad the vocabulary to 50304 (a multiple of 64) as nanoGPT/llm.c do for speed.
COMMON = ["seq_len=1024", "model.pad_vocab_to=64", "steps=20", "warmup=5", "log_every=10"]

# (label, model, strategy preset, extra overrides, distributed?)
MATRIX = [
    ("small-bf16-compile", "gpt2-small", "bf16_compile", ["micro_batch=16"], False),
    ("small-tf32", "gpt2-small", "single", ["micro_batch=16"], False),
    ("small-bf16", "gpt2-small", "bf16", ["micro_batch=16"], False),
    ("small-fsdp-bf16-compile", "gpt2-small", "fsdp_bf16_compile", ["micro_batch=16"], True),
    ("small-ddp-bf16-compile", "gpt2-small", "ddp_bf16_compile", ["micro_batch=16"], True),
    ("small-fsdp-ac-bf16", "gpt2-small", "fsdp_ac_bf16", ["micro_batch=16"], True),
    ("small-fsdp-bf16", "gpt2-small", "fsdp_bf16", ["micro_batch=16"], True),  # the pair without AC
    ("small-bf16-compile-model", "gpt2-small", "bf16_compile", ["micro_batch=16", "strategy.compile_mode=model"],
     False),
    ("small-bf16-compile-model-mb32", "gpt2-small", "bf16_compile",
     ["micro_batch=32", "strategy.compile_mode=model"], False),
    ("medium-fsdp-bf16-compile", "gpt2-medium", "fsdp_bf16_compile", ["micro_batch=8"], True),
    ("large-fsdp-ac-bf16", "gpt2-large", "fsdp_ac_bf16", ["micro_batch=8"], True),
]
PROFILE = ("small-bf16-compile-profiled", "gpt2-small", "bf16_compile", ["micro_batch=16", "steps=6", "warmup=3"],
           False)

# CPU dry run: same entries, sized for a laptop core (fp32 stands in for bf16, which CPUs here lack).
CPU_OVERRIDES = ["model=tiny", "model.n_layer=2", "seq_len=32", "micro_batch=1", "steps=2", "warmup=1",
                 "strategy.amp=fp32", "device=cpu"]


def command(entry, results: Path, cpu: bool, profile_dir: Path | None = None) -> list[str]:
    label, model, strategy, extra, distributed = entry
    common = COMMON + list(extra)
    if cpu:
        common = [a for a in common if not a.startswith(("micro_batch=", "steps=", "warmup="))] + CPU_OVERRIDES
    more = [f"profile_dir={profile_dir}"] if profile_dir is not None else []
    return suite.command((label, model, strategy, [], 1 if distributed else 0), results, common, "gpu_suite", more)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_suite_out", help="output folder (results/, summary.md, trace)")
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU with a tiny model")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per entry")
    ap.add_argument("--budget", type=int, default=450, help="total seconds; later entries are skipped past it")
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    results = out / "results"
    entries = [e for e in MATRIX if not args.only or e[0] in args.only.split(",")]
    plan = [(e, command(e, results, args.cpu)) for e in entries]
    if not args.only or PROFILE[0] in args.only.split(","):
        # after the single-GPU strategies, before the larger models: the trace is a deliverable
        plan.insert(min(6, len(plan)), (PROFILE, command(PROFILE, out / "profile", args.cpu, profile_dir=out)))
    if args.list:
        for _, cmd in plan:
            print(shlex.join(cmd))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    failures = suite.run_plan([(e[0], cmd) for e, cmd in plan], args.timeout, args.budget)
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
