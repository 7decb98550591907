"""Many ``python -m runners.run ...`` commands for the price of one interpreter start (tests only).

``python -m tests.cli_batch <cases.json> <results.json>`` (from the repository root): imports the runner once, then runs every case
(``{"args": [...]}``) in a forked child that starts as a fresh ``python -m runners.run <args>`` would after its imports
(its own ``sys.argv``, stdout and stderr captured to files, its exit code). The parent never runs a model, a Hydra
app or a thread pool, so each child starts from the same state. Writes ``[{"returncode", "stdout", "stderr"}, ...]``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback


def run_one(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, "stdout"), os.path.join(folder, "stderr")]
        pid = os.fork()
        if pid == 0:  # the child: a command line of its own
            code = 1
            try:
                for fd, path in zip((1, 2), paths, strict=True):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.argv = ["-m", *args]  # (runpy sets argv[0] to the module's file, as ``python -m``)
                runpy.run_module("runners.run", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            except BaseException:  # noqa: BLE001 (a traceback, as the interpreter would print it)
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out, err = (open(path, encoding="utf-8", errors="replace").read() for path in paths)
    return {"returncode": os.waitstatus_to_exitcode(status), "stdout": out, "stderr": err}


def main() -> None:
    # what runners.run imports (torch, transformers, Hydra, the library), once, before the forks; not runners.run
    # itself, which each child runs as __main__ (Hydra finds conf/ from the main module's file, as `python -m`)
    import evaluators.suite  # noqa: F401
    import runners.pruning  # noqa: F401
    import runners.record  # noqa: F401
    import runners.tracking  # noqa: F401
    import runners.validate  # noqa: F401

    cases = json.loads(open(sys.argv[1], encoding="utf-8").read())
    results = [run_one(case["args"]) for case in cases]
    with open(sys.argv[2], "w", encoding="utf-8") as out:
        json.dump(results, out)


if __name__ == "__main__":
    main()
