"""Run ``python bench/run.py ARGS`` for many argument lists, each in its own process, paying the imports once.

    python tests/cli_fork.py CASES.json OUT.json

CASES.json holds a list of argument lists. This process imports what bench/run.py imports (torch, Hydra, the
harness: ~3 s), then for each case forks a child that runs bench/run.py as ``__main__`` with that ``sys.argv``,
its stdout and stderr sent to files; the child's exit status is what the entry exits with (``SystemExit``'s
code; 1 and the traceback on stderr for an uncaught exception, as the interpreter does). OUT.json gets
``[{"returncode", "stdout", "stderr"}, ...]`` in order. Used by tests/test_exit_codes.py, where ~55 separate
interpreters each importing torch cost ~90 s of CI on 2 cores; a fork of a warmed process is still a separate
process with its own exit code and output streams.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = str(ROOT / "bench" / "run.py")


def _child(argv: list[str], out: Path, err: Path) -> None:
    """In the forked child: streams to files, run the entry, exit with its code (never returns)."""
    code = 1
    try:
        for fd, path in ((1, out), (2, err)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = [ENTRY, *argv]
        try:
            runpy.run_path(ENTRY, run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:  # sys.exit("message"): printed to stderr, status 1
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(cases_file: str, out_file: str) -> None:
    sys.path.insert(0, str(ROOT))
    import bench.run  # noqa: F401  -- the imports every child shares (the entry re-runs as __main__ in each)

    cases = json.loads(Path(cases_file).read_text())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, argv in enumerate(cases):
            out, err = Path(tmp) / f"{i}.out", Path(tmp) / f"{i}.err"
            pid = os.fork()
            if pid == 0:
                _child(argv, out, err)
            _, status = os.waitpid(pid, 0)
            results.append({"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read_text(),
                            "stderr": err.read_text()})
    Path(out_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
