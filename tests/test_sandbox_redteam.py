"""Red team for lede.eval.sandbox: each attack of issue 39 must be contained, on every containment path
this machine offers (bwrap, landlock, seccomp; a path that is not available here, or that refuses to run
as root, is skipped with the reason), and honest programs must still pass.

Run it as root and as an unprivileged user (the README's closing note says how)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from lede.eval.sandbox import CONTAINMENTS, SandboxError, available_containment, check_humaneval, run_program

LIMITS = {"timeout_s": 8.0, "memory_mb": 256}


def _run(program: str, path: str, **kw):
    try:
        return run_program(textwrap.dedent(program), containment=path, **(LIMITS | kw))
    except SandboxError as err:
        pytest.skip(f"containment {path!r} not usable here: {err}")


@pytest.fixture(params=CONTAINMENTS)
def path(request):
    if CONTAINMENTS.index(request.param) < CONTAINMENTS.index(available_containment()):
        pytest.skip(f"{request.param} not available here (outermost: {available_containment()})")
    return request.param


def test_seccomp_alone_runs_only_with_another_uid():
    """A non-root evaluator's child would share its uid: seccomp alone cannot keep it from the evaluator."""
    if os.geteuid() == 0:
        pytest.skip("as root the child gets uid 65534")
    with pytest.raises(SandboxError, match="no boundary"):
        run_program("print(1)\n", containment="seccomp", **LIMITS)


def test_reports_the_containment_path(path):
    res = _run("import os\nprint(os.geteuid())\n", path)
    assert res.passed, res.stderr
    assert "seccomp" in res.containment and (path != "bwrap" or res.containment.startswith("bwrap("))
    assert (path != "landlock") or "landlock" in res.containment
    if os.geteuid() == 0:
        assert "uid=65534" in res.containment or "without capabilities" in res.containment
        assert int(res.stdout) != 0 or "without capabilities" in res.containment


def test_kill_of_an_outside_process_is_refused(path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        res = _run(f"import posix\nposix.kill({sleeper.pid}, 9)\n", path)
        res2 = _run(f"import os, signal\nos.kill({sleeper.pid}, signal.SIGTERM)\n", path)
        time.sleep(0.2)
        assert sleeper.poll() is None, "the sleeper was killed from inside the sandbox"
        assert not res.passed and not res2.passed
    finally:
        sleeper.kill()
        sleeper.wait()


def test_files_outside_its_directory_stay_intact(path, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.chmod(tmp_path, 0o777)  # even a world-writable directory
    os.chmod(victim, 0o666)    # and a world-writable file
    res = _run(f"""
        import posix
        try:
            open({str(victim)!r}, "w").write("pwned")
        except OSError as e:
            print("write refused", e)
        posix.unlink({str(victim)!r})
        """, path)
    assert victim.read_text() == "precious"
    assert not res.passed


def test_the_evaluators_environment_does_not_leak(path, monkeypatch):
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("LEDE_REDTEAM_SECRET", secret)
    os.environ["LEDE_REDTEAM_SECRET"] = secret  # the evaluator's own environ (what /proc shows)
    res = _run(f"""
        import os
        for pid in (os.getppid(), {os.getpid()}, 1):
            try:
                print(open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError as e:
                print("refused", pid, e)
        print(dict(os.environ))
        """, path)
    assert secret not in res.stdout and secret not in res.stderr


def test_no_network_connection_arrives(path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        res = _run(f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            s.sendall(b"hello")
            """, path)
        with pytest.raises(OSError):  # socket.timeout is an OSError
            srv.accept()
        assert not res.passed
    finally:
        srv.close()


def test_exec_of_a_shell_is_refused(path, tmp_path):
    marker = tmp_path / "shell_ran"
    os.chmod(tmp_path, 0o777)
    res = _run(f"import posix\nposix.execv('/bin/sh', ['sh', '-c', 'touch {marker}; echo SHELL_RAN'])\n", path)
    assert not res.passed and "SHELL_RAN" not in res.stdout and not marker.exists()


def test_writing_another_process_memory_is_refused(path):
    victim = subprocess.Popen([sys.executable, "-c", "import time\nx = b'intact'\ntime.sleep(60)"],
                              stdout=subprocess.PIPE)
    try:
        res = _run(f"""
            import posix, os
            fd = posix.open("/proc/{victim.pid}/mem", os.O_RDWR)
            print("opened", fd)
            """, path)
        assert not res.passed and "opened" not in res.stdout
        self_mem = _run("import posix, os\nfd = posix.open('/proc/self/mem', os.O_RDWR)\nprint('opened')\n", path)
        assert victim.poll() is None
        assert "opened" not in self_mem.stdout  # even its own (landlock's read-only root; seccomp: no writes)
    finally:
        victim.kill()
        victim.wait()


def test_writes_under_proc_are_refused(path):
    res = _run("open('/proc/self/comm', 'w').write('evil')\nprint('written')\n", path)
    assert not res.passed and "written" not in res.stdout


def test_disk_flood_beyond_the_quota_fails(path):
    res = _run("""
        for i in range(10):
            with open(f"f{i}", "wb") as fh:
                fh.write(b"x" * 15 * 2**20)
        print("flooded")
        """, path, disk_mb=20, max_output_mb=16)
    assert not res.passed and "flooded" not in res.stdout


def test_ptrace_and_process_vm_writev_are_refused(path):
    res = _run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        r = libc.ptrace(16, os.getppid(), 0, 0)  # PTRACE_ATTACH
        print("ptrace", r, ctypes.get_errno())
        assert r != 0
        """, path)
    assert "ptrace 0 " not in res.stdout


@pytest.mark.parametrize("ending", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit",
                                    "raise SystemExit(0)", "import atexit, os; atexit.register(os._exit, 0)\nraise SystemExit"])
def test_a_wrong_answer_that_exits_early_fails(ending):
    res = check_humaneval("def add(a, b):\n", f"    return a - b\n{ending}\n", "def check(f):\n    assert f(2,3)==5\n", "add",
                          **LIMITS)
    assert not res.passed and res.status == "failed" and not res.completed


def test_an_honest_answer_passes_and_its_output_is_kept(path):
    try:
        res = check_humaneval("def add(a, b):\n", "    print('thinking')\n    return a + b\n",
                              "def check(f):\n    assert f(2,3)==5\n", "add", containment=path, **LIMITS)
    except SandboxError as err:
        pytest.skip(str(err))
    assert res.passed and res.completed and res.stdout == "thinking\n", (res.stdout, res.stderr)
    scratch = "" if path == "seccomp" else "open('scratch.txt', 'w').write('x')\nassert os.path.exists('scratch.txt')\n"
    threads = _run("import threading, os\nt = threading.Thread(target=print); t.start(); t.join()\n" + scratch, path)
    assert threads.passed, threads.stderr
