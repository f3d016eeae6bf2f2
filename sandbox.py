"""
Running code a model wrote (HumanEval's completions): each program in its own process with resource limits, a
throwaway directory, no inherited environment, and the dangerous parts of os, shutil and subprocess replaced before
the program starts; the whole process group is killed afterwards.

    ok, status = run_program("print('hi')")   # (True, "passed"); a crash, a timeout or a limit: (False, why)
"""
import os
import resource
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

_GUARD = r'''
import builtins, os, shutil, subprocess, sys
def _blocked(*a, **k):
    raise PermissionError("blocked in nanosmol's sandbox")
for _n in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid", "setuid", "setgid",
           "putenv", "unsetenv", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
           "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chdir", "fchdir", "chroot", "link", "symlink",
           "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
           "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp",
           "plock"):
    if hasattr(os, _n):
        setattr(os, _n, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = _blocked
for _m in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "resource", "pty"):
    sys.modules[_m] = None
del _n, _m, builtins, os, shutil, subprocess, sys
'''


def _limits(memory_bytes, cpu_seconds):
    # runs in the child between fork and exec
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))  # 16 MB per written file
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.getuid() != 0:  # the kernel does not enforce RLIMIT_NPROC on root
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return apply


def run_program(code, timeout=10.0, memory_mb=1024):
    # -> (passed, what happened). Passed = exit status 0 within the timeout. The whole process group is killed
    # afterwards, so a child left behind does not outlive the check.
    with tempfile.TemporaryDirectory(prefix="nanosmol_exec_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD + "\n" + code)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-S", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(memory_mb << 20, int(timeout) + 1))
        try:
            _, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else \
                (err.decode(errors="replace").strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200]
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:g} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    return status == "passed", status


def execute_all(programs, timeout=10.0, workers=None):
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # each program is its own process: threads only wait on them
        return list(pool.map(lambda p: run_program(p, timeout), programs))
