"""The code sandbox contains hostile programs and still passes correct ones."""

import os
import sys
import time

import pytest

from dlmcache.evals.sandbox import Limits, isolation, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

FAST = Limits(timeout=3.0, cpu_seconds=3)


def _nobody_processes() -> int:
    """Live (not zombie) processes of the sandbox user."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            count += os.stat(f"/proc/{pid}").st_uid == 65534 and state != "Z"
        except (OSError, IndexError):
            pass
    return count


def test_correct_program_passes_and_failing_assert_fails():
    ok = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('done')\n", FAST)
    assert ok.status == "passed" and ok.returncode == 0 and ok.stdout.strip() == "done"
    bad = run_program("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_program_may_write_in_its_own_directory():
    r = run_program("open('scratch.txt', 'w').write('x' * 100)\nassert open('scratch.txt').read() == 'x' * 100\n", FAST)
    assert r.passed, r.stderr


@pytest.mark.parametrize("source", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_infinite_loop_is_killed_at_the_timeout(source):
    t0 = time.perf_counter()
    r = run_program(source, FAST)
    assert r.status == "timeout"
    assert time.perf_counter() - t0 < FAST.timeout + 5


def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    if not isolation()["process_cap_enforced"]:
        pytest.skip("no process cap: running as root without an interpreter the nobody user can run")
    before = _nobody_processes()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_program(bomb, FAST)
    assert not r.passed
    time.sleep(0.5)
    assert _nobody_processes() <= before


def test_child_that_leaves_the_process_group_is_killed_too():
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nelse:\n    time.sleep(120)\n"
    t0 = time.perf_counter()
    r = run_program(escape, FAST)
    assert r.status == "timeout" and time.perf_counter() - t0 < FAST.timeout + 5


def test_huge_allocation_fails_fast():
    t0 = time.perf_counter()
    r = run_program("x = bytearray(10 * 1024**3)\n", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr
    assert time.perf_counter() - t0 < 2.5


def test_cannot_write_outside_its_directory(tmp_path):
    if not isolation()["filesystem_writes_confined"] and os.geteuid() != 0:
        pytest.skip("no Landlock and not root: writes are confined only by file permissions")
    os.chmod(tmp_path, 0o777)  # even a world-writable directory stays closed
    for target in (tmp_path / "evil.txt", "/tmp/dlmcache-sandbox-evil.txt"):
        r = run_program(f"open({str(target)!r}, 'w').write('pwned')\n", FAST)
        assert r.status == "failed" and "PermissionError" in r.stderr, r.stderr
        assert not os.path.exists(target)


def test_cannot_open_a_network_connection():
    info = isolation()
    if not (info["network_namespace"] or info["tcp_blocked_by_landlock"]):
        pytest.skip("neither a network namespace nor Landlock TCP rules on this kernel")
    r = run_program("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n", FAST)
    assert r.status == "failed" and ("Error" in r.stderr), r.stderr


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=0)
    with pytest.raises(TypeError, match="str"):
        run_program(b"print(1)")


def test_cpu_time_limit_is_a_timeout():
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", Limits(timeout=30.0, cpu_seconds=1))
    assert r.status == "timeout" and time.perf_counter() - t0 < 10
