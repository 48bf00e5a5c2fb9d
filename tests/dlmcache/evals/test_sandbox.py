"""The code sandbox holds against hostile programs, in both containment modes, as root and as an
unprivileged evaluator, and still passes correct programs (and only programs that ran to their end)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dlmcache.evals import sandbox
from dlmcache.evals.sandbox import Limits, SandboxResult, isolation, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

FAST = Limits(timeout=3.0, cpu_seconds=3)
NAMESPACES_MISSING = sandbox._namespaces_work() if sys.platform.startswith("linux") else "not Linux"
MODES = [
    pytest.param("namespaces", marks=pytest.mark.skipif(bool(NAMESPACES_MISSING), reason=f"{NAMESPACES_MISSING}")),
    "fallback",
]
SCOPED = sandbox.landlock_abi() >= 6


def _unprivileged_python() -> str | None:
    return sandbox._nobody_python() if os.geteuid() == 0 else sys.executable


EVALUATORS = [
    "self",
    pytest.param(
        "unprivileged",
        marks=pytest.mark.skipif(
            os.geteuid() != 0 or _unprivileged_python() is None,
            reason="the suite already runs unprivileged" if os.geteuid() != 0 else "no Python that nobody can run",
        ),
    ),
]


def run(source: str, limits: Limits = FAST, mode: str = "namespaces", evaluator: str = "self") -> SandboxResult:
    """`run_program` here, or from an evaluator process running as `nobody` (a copy of the
    standard-library-only sandbox module in a directory it can read)."""
    if evaluator == "self":
        return run_program(source, limits, containment=mode)
    home = Path(f"/tmp/dlmcache-sandbox-evaluator-{os.getpid()}")
    home.mkdir(mode=0o755, exist_ok=True)
    shutil.copy(sandbox.__file__, home / "sandbox.py")
    os.chmod(home / "sandbox.py", 0o644)
    code = (
        f"import json, sys; sys.path.insert(0, {str(home)!r}); import sandbox\n"
        f"r = sandbox.run_program(sys.stdin.read(), sandbox.Limits(**{limits.__dict__!r}), containment={mode!r})\n"
        "print(json.dumps(r.__dict__))\n"
    )
    try:
        out = subprocess.run(
            [_unprivileged_python(), "-I", "-c", code], input=source, capture_output=True, text=True, user=65534,
            group=65534, extra_groups=[], cwd="/", timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert out.returncode == 0, f"the unprivileged evaluator died: {out.returncode} {out.stderr}"
    return SandboxResult(**json.loads(out.stdout))


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


# ------------------------------------------------------------------------------ correct programs


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
def test_correct_program_passes_and_failing_assert_fails(mode, evaluator):
    ok = run(
        "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('done')\n", mode=mode, evaluator=evaluator
    )
    assert ok.status == "passed" and ok.returncode == 0 and ok.stdout.strip() == "done", ok
    bad = run("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", mode=mode, evaluator=evaluator)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


@pytest.mark.parametrize("mode", MODES)
def test_program_may_write_in_its_own_directory(mode):
    r = run("open('scratch.txt', 'w').write('x' * 100)\nassert open('scratch.txt').read() == 'x' * 100\n", mode=mode)
    assert r.passed, r.stderr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "early_exit",
    [
        "import sys; sys.exit(0)",
        "exit()",
        "quit()",
        "raise SystemExit",
        "import os; os._exit(0)",
        "import unittest\nclass T(unittest.TestCase):\n    def test_nothing(self):\n        pass\nunittest.main()",
    ],
)
def test_exiting_before_the_reference_asserts_is_not_a_pass(mode, early_exit):
    """A wrong solution that exits with status 0 before the asserts ran used to score 1.0."""
    r = run(f"def solve(x):\n    return x\n\n{early_exit}\n\nassert solve(2) == 3\n", mode=mode)
    assert r.status == "failed" and r.reason == "exited before the end of the program", r


# The forged pass of issue 24: find whatever token the runner holds in its frames, print it, exit 0.
FORGE = """
import gc, os, sys
seen = set()
frame = sys._getframe()
while frame is not None:
    for scope in (frame.f_locals, frame.f_globals):
        for value in list(scope.values()):
            if isinstance(value, str) and 16 <= len(value) <= 64:
                seen.add(value)
    for default in getattr(frame.f_code, "co_consts", ()):
        if isinstance(default, str) and 16 <= len(default) <= 64:
            seen.add(default)
    frame = frame.f_back
for obj in gc.get_objects():
    if callable(obj) and getattr(obj, "__defaults__", None):
        seen.update(v for v in obj.__defaults__ if isinstance(v, str))
for token in seen:
    print()
    print(token)
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_program_cannot_forge_a_pass_from_the_runners_frames(mode):
    r = run(f"def solve(x):\n    return x\n{FORGE}\nassert solve(2) == 3\n", mode=mode)
    assert r.status == "failed" and r.reason == "exited before the end of the program", r


def test_mbpp_metric_scores_an_early_exit_as_wrong():
    import evaluate

    metric = evaluate.load(str(Path(sandbox.__file__).parent / "metrics" / "code_pass"))
    programs = ["def f(x):\n    return x + 1\n", "def f(x):\n    return x\nimport sys\nsys.exit(0)\n"]
    tests = ["assert f(1) == 2\n"] * 2
    out = metric.compute(predictions=programs, references=tests)
    assert out["correct"] == [True, False]


# Issue 37, case 9: write the runner's "end" itself, then exit 0 before the failing asserts: from the
# program's process, or from a child it forks (the parent exits 0 once the child wrote it).
FORGED_END = [
    "import os\nos.write(3, b'end')\nos._exit(0)\n",
    "import os\nif os.fork() == 0:\n    os.write(3, b'end')\n    os._exit(0)\nos.wait()\nos._exit(0)\n",
]
WRONG = "def add(a, b):\n    return a - b\n"
ADD_TESTS = "import math\nassert add(2, 3) == 5\nassert math.isclose(add(0.1, 0.2), 0.3)\n"


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("forge", FORGED_END, ids=["own process", "child"])
def test_a_forged_end_before_the_asserts_is_judged_outside_and_fails(mode, evaluator, forge):
    """Before: reported passed, as root and not, in both modes. The asserts' verdict is computed in
    the evaluator from the values the program's process returns; the forgery returns none."""
    from dlmcache.evals import verdicts

    plan = verdicts.plan(ADD_TESTS, WRONG)
    in_process = run(f"{WRONG}{forge}\n{ADD_TESTS}", mode=mode, evaluator=evaluator)
    assert in_process.passed  # what a verdict from inside the program's process would say
    r = run(f"{WRONG}{forge}\n{verdicts.runner(plan)}", mode=mode, evaluator=evaluator)
    assert verdicts.judge(plan, r.stdout) == (False, "the program ended before its values were computed")
    right = run(f"def add(a, b):\n    return a + b\n\n{verdicts.runner(plan)}", mode=mode, evaluator=evaluator)
    assert verdicts.judge(plan, right.stdout) == (True, "")


def test_the_metric_judges_outside_and_marks_other_tests_unverified():
    import evaluate

    metric = evaluate.load(str(Path(sandbox.__file__).parent / "metrics" / "code_pass"))
    yes = "class Yes:\n    def __eq__(self, other):\n        return True\n"
    programs = [
        f"{WRONG}{FORGED_END[0]}",  # the forged end
        f"{yes}def add(a, b):\n    return Yes()\n",  # a value that equals anything, in its own process
        "def add(a, b):\n    return a + b\n",
        "def add(a, b):\n    return a + b\n",  # a test that is not asserts alone: unverified
    ]
    tests = [ADD_TESTS, ADD_TESTS, ADD_TESTS, "for x in range(3):\n    assert add(x, 1) == x + 1\n"]
    out = metric.compute(predictions=programs, references=tests)
    assert out["status"] == ["failed", "failed", "passed", "unverified"]
    assert out["correct"] == [False, False, True, False] and out["unverified"] == 1


# ------------------------------------------------------------------------------ time


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "source",
    [
        "while True:\n    pass\n",
        "import time\ntime.sleep(60)\n",
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n",
    ],
)
def test_run_returns_at_the_timeout(mode, source):
    t0 = time.perf_counter()
    r = run(source, Limits(timeout=2.0, cpu_seconds=10), mode=mode)
    assert r.status == "timeout" and r.reason == "wall-clock timeout"
    assert time.perf_counter() - t0 < 2.0 + 1.5


@pytest.mark.parametrize("mode", MODES)
def test_cpu_time_limit_is_a_timeout(mode):
    t0 = time.perf_counter()
    r = run("while True:\n    pass\n", Limits(timeout=30.0, cpu_seconds=1), mode=mode)
    assert r.status == "timeout" and r.reason == "CPU time limit" and time.perf_counter() - t0 < 10


# ------------------------------------------------------------------------------ processes

DETACHED = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:  # no marker, no environment, stdout still open\n"
    "        os.execve('/bin/sleep', ['sleep', '{marker}'], {{}})\n"
    "    os._exit(0)\n"
    "print('parent done')\n"
    "{then}\n"
)


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("then", ["", "time.sleep(60)"])
def test_a_detached_descendant_dies_with_the_run(mode, evaluator, then):
    """fork + setsid + execve with an empty environment, keeping stdout open: the run still returns
    on time and the descendant does not outlive it."""
    marker = f"4{os.getpid() % 10}.{time.time_ns() % 10**6}"
    t0 = time.perf_counter()
    r = run(DETACHED.format(marker=marker, then=then), Limits(timeout=2.0), mode=mode, evaluator=evaluator)
    assert time.perf_counter() - t0 < 2.0 + 2.5
    assert r.status == ("timeout" if then else "passed"), r
    time.sleep(0.2)
    assert _processes_with(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_contained_and_leaves_nothing_behind(mode):
    marker = f"bomb-{time.time_ns()}"
    bomb = f"# {marker}\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.perf_counter()
    r = run(bomb, mode=mode)
    assert not r.passed and time.perf_counter() - t0 < FAST.timeout + 2.5
    time.sleep(0.5)
    assert _processes_with(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_killing_everything_reaches_no_other_run(mode):
    """A program that signals every process it can (kill(-1) in a loop) does not reach a program
    running beside it, nor the ones after it."""
    if mode == "fallback" and not SCOPED:
        pytest.skip("the fallback scopes signals with Landlock ABI >= 6, which this kernel lacks")
    killer = (
        "import os, signal, time\nend = time.time() + 2\n"
        "while time.time() < end:\n    try:\n        os.kill(-1, signal.SIGKILL)\n    except OSError:\n        pass\n"
    )
    bystander = "import time\ntime.sleep(1.5)\nprint('alive')\n"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(run, killer, Limits(timeout=5.0), mode)
        time.sleep(0.3)
        second = pool.submit(run, bystander, Limits(timeout=5.0), mode)
        assert second.result().passed, second.result()
        first.result()
    assert run("print('next')\n", mode=mode).passed


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
def test_a_program_cannot_kill_the_evaluator(mode, evaluator):
    if mode == "fallback" and not SCOPED and (evaluator == "unprivileged" or os.geteuid() != 0):
        pytest.skip("an unprivileged fallback scopes signals with Landlock ABI >= 6, which this kernel lacks")
    hostile = (
        "import os, signal\n"
        "for pid in (os.getppid(), 1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n        pass\n"
        "print('still here')\n"
    )
    r = run(hostile, mode=mode, evaluator=evaluator)
    assert r.status in ("passed", "failed"), r
    assert run("print('next')\n", mode=mode, evaluator=evaluator).passed


# ------------------------------------------------------------------------------ what a run can see


@pytest.mark.parametrize("mode", MODES)
def test_runs_side_by_side_cannot_see_each_other(mode):
    writer = "import os, time\nopen('secret.txt', 'w').write('42')\nprint(os.getcwd())\ntime.sleep(2)\n"
    looker = (
        "import glob, os\n"
        "found = glob.glob('/tmp/*/secret.txt') + glob.glob('/work/secret.txt') + glob.glob('/tmp/secret.txt')\n"
        "try:\n    pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "except OSError:\n    pids = []\n"
        "print(found, len(pids))\n"
    )
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(run, writer, Limits(timeout=5.0), mode)
        time.sleep(0.8)
        seen = pool.submit(run, looker, Limits(timeout=5.0), mode).result()
        assert first.result().passed
    assert seen.passed, seen
    found, visible = seen.stdout.rsplit(" ", 1)
    assert found == "[]" and int(visible) <= 2, seen.stdout


@pytest.mark.parametrize("mode", MODES)
def test_cannot_read_other_processes_command_lines(mode):
    marker = f"cmdline-{time.time_ns()}"
    host = subprocess.Popen(["sleep", "30", marker])
    try:
        probe = (
            "import os\nfound = []\n"
            "try:\n    pids = [p for p in os.listdir('/proc') if p.isdigit()]\nexcept OSError:\n    pids = []\n"
            "for p in pids:\n    try:\n        found += [open(f'/proc/{p}/cmdline', 'rb').read()]\n"
            "    except OSError:\n        pass\n"
            f"print(any(b'{marker}' in c for c in found))\n"
        )
        r = run(probe, mode=mode)
        assert r.passed and r.stdout.strip() == "False", r
    finally:
        host.kill()
        host.wait()


@pytest.mark.parametrize("mode", MODES)
def test_cannot_connect_to_a_host_unix_socket(mode, tmp_path):
    """Issue 37, case 8: the fallback (no mount namespace) could connect to the evaluator's sockets;
    its filter now refuses AF_UNIX sockets."""
    os.chmod(tmp_path, 0o777)
    path = tmp_path / "host.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    os.chmod(path, 0o777)
    server.listen(1)
    try:
        connect = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\nprint('connected')\n"
        r = run(connect, mode=mode)
        assert r.status == "failed" and "connected" not in r.stdout, r
    finally:
        server.close()


@pytest.mark.parametrize("mode", MODES)
def test_cannot_write_outside_its_directory(mode, tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable directory stays closed
    for target in (tmp_path / "evil.txt", Path(f"/tmp/dlmcache-sandbox-evil-{os.getpid()}.txt")):
        r = run(f"open({str(target)!r}, 'w').write('pwned')\n", mode=mode)
        assert not target.exists(), r
        if mode == "fallback" or target.parent == tmp_path:  # in its own namespace, /tmp is private
            assert r.status == "failed" and "Error" in r.stderr, r


@pytest.mark.parametrize("mode", MODES)
def test_cannot_fill_the_disk(mode):
    if mode == "fallback":
        pytest.skip("the fallback bounds each file (file_size_mb), not the total written")
    writer = (
        "total = 0\ntry:\n    for i in range(2000):\n        with open(f'f{i}', 'wb') as f:\n"
        "            f.write(b'x' * 2**20)\n        total += 1\nexcept OSError as e:\n    print(type(e).__name__)\n"
        "print(total)\n"
    )
    r = run(writer, Limits(timeout=10.0, disk_mb=32), mode=mode)
    assert r.passed, r
    assert int(r.stdout.split()[-1]) <= 32 and "OSError" in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_cannot_open_a_network_connection(mode):
    if mode == "fallback" and not isolation()["tcp_blocked_by_landlock"]:
        pytest.skip("the fallback blocks TCP with Landlock ABI >= 4, which this kernel lacks")
    r = run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n", mode=mode)
    assert r.status == "failed" and "Error" in r.stderr, r.stderr


# ------------------------------------------------------------------------------ resources


@pytest.mark.parametrize("mode", MODES)
def test_huge_allocation_fails_fast(mode):
    t0 = time.perf_counter()
    r = run("x = bytearray(10 * 1024**3)\n", mode=mode)
    assert r.status == "failed" and "MemoryError" in r.stderr
    assert time.perf_counter() - t0 < 2.5


FLOOD = "import sys\nchunk = 'x' * 2**20\nwhile True:\n    sys.stdout.write(chunk)\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("output_mb", [8.0, 100000.0])
def test_output_flood_keeps_the_evaluator_small(mode, output_mb):
    """A program writing at full speed is stopped at the output cap (or the timeout), and the
    evaluator's memory stays flat either way."""
    code = (
        "import json, sys\nfrom dlmcache.evals.sandbox import Limits, run_program\n"
        f"r = run_program(sys.stdin.read(), Limits(timeout=3.0, output_mb={output_mb}), containment={mode!r})\n"
        # VmHWM: this process's peak since exec (ru_maxrss would count the forked parent's image)
        "peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps([r.status, r.reason, r.seconds, len(r.stdout), int(peak)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=FLOOD, capture_output=True, text=True, timeout=60)
    status, reason, seconds, kept, rss_kb = json.loads(out.stdout)
    assert status in ("failed", "timeout") and len(str(kept)) and kept <= 4000
    assert reason == ("more than 8.0 MB of output" if output_mb == 8.0 else "wall-clock timeout")
    assert seconds < 3.0 + 1.5
    assert rss_kb < 100 * 1024, f"evaluator peak RSS {rss_kb / 1024:.0f} MiB"


# ------------------------------------------------------------------------------ the API


def test_limits_and_arguments_are_validated():
    with pytest.raises(ValueError, match="timeout"):
        Limits(timeout=0)
    with pytest.raises(ValueError, match="disk_mb"):
        Limits(disk_mb=True)
    with pytest.raises(TypeError, match="str"):
        run_program(b"print(1)")
    with pytest.raises(TypeError, match="Limits"):
        run_program("print(1)", limits={"timeout": 1})
    with pytest.raises(ValueError, match="containment='docker'"):
        run_program("print(1)", containment="docker")


def test_without_namespaces_the_fallback_is_used(monkeypatch):
    monkeypatch.setattr(sandbox, "_namespaces_work", lambda: "pretend the kernel forbids unshare")
    info = isolation()
    assert info["mode"] == "fallback" and info["process_tree"] == "child subreaper"
    r = run_program("import os\nprint(os.getcwd())\n", FAST)
    assert r.passed and r.stdout.startswith("/tmp/dlmcache-sandbox-")  # a host directory, not the private /work


def test_isolation_reports_the_namespaces_mode():
    if NAMESPACES_MISSING:
        pytest.skip(NAMESPACES_MISSING)
    info = isolation()
    assert info["mode"] == "namespaces" and info["private_filesystem"] and info["process_tree"] == "PID namespace"


# ------------------------------------------------------------------------------ issue 24: memory, processes, keyrings


MEMFD = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
number = {"x86_64": 319, "aarch64": 279}[os.uname().machine]
fd = libc.syscall(number, b"hog", 0)
assert fd < 0 and ctypes.get_errno() == 1, f"memfd_create gave {fd}"
"""


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
def test_memfd_create_is_refused(mode, evaluator):
    r = run(MEMFD, mode=mode, evaluator=evaluator)
    assert r.passed, r.stderr


@pytest.mark.skipif(not isolation()["memory_cap"] == "memory cgroup", reason="no writable memory cgroup here")
@pytest.mark.parametrize("mode", MODES)
def test_memory_is_bounded_per_run_not_per_process(mode):
    """Four processes of 120 MB each under memory_mb=200: each fits its own address-space limit, the
    run does not fit its cgroup: the run is killed instead of taking 480 MB."""
    hog = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(120 * 2**20)\n"
        "        for i in range(0, len(block), 4096): block[i] = 1\n"
        "        time.sleep(3)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "codes = [os.waitpid(p, 0)[1] for p in kids]\n"
        "assert all(c == 0 for c in codes), codes\n"
    )
    limits = Limits(timeout=20.0, cpu_seconds=10, memory_mb=200)
    r = run(hog, limits=limits, mode=mode)
    assert not r.passed, r


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
def test_a_fork_bomb_beside_does_not_starve_a_threaded_program(mode, evaluator):
    """Two runs at once (as code_pass's workers run them): one exhausts its process limit, the other
    starts 8 threads; the process count is per run, so the threaded one passes."""
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.05)\n"
    threads = (
        "import threading, time\n"
        "time.sleep(1.0)\n"
        "ts = [threading.Thread(target=time.sleep, args=(0.05,)) for _ in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print('ok')\n"
    )
    limits = Limits(timeout=6.0, cpu_seconds=5, max_processes=32)
    with ThreadPoolExecutor(2) as pool:
        bombed = pool.submit(run, bomb, limits, mode, evaluator)
        time.sleep(0.3)
        threaded = pool.submit(run, threads, limits, mode, evaluator)
        assert threaded.result().passed, threaded.result()
        assert not bombed.result().passed


# The evaluator (root, or the unprivileged one): a session keyring of its own holding a 'user' key, as
# an SSH / PAM login or a systemd service has, then the probe in the sandbox (told the key's serial).
KEYRING_EVALUATOR = """
import ctypes, json, os, sys
sys.path.insert(0, HOME)
import sandbox
libc = ctypes.CDLL(None, use_errno=True)
keyctl, add_key = {"x86_64": (250, 248), "aarch64": (219, 217)}[os.uname().machine]
libc.syscall(keyctl, 1, None)  # KEYCTL_JOIN_SESSION_KEYRING
secret = b"keyring-secret-4242"
serial = libc.syscall(add_key, b"user", b"dlmcache-sandbox-test", secret, len(secret), -3)
if serial < 0:
    print(json.dumps({"skip": "no kernel keyrings here"}))
    sys.exit(0)
source = f"SERIAL = {serial}\\n" + sys.stdin.read()
r = sandbox.run_program(source, sandbox.Limits(timeout=5.0, cpu_seconds=3), containment=MODE)
print(json.dumps(r.__dict__))
"""
KEYRING_PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
keyctl = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
buf = ctypes.create_string_buffer(256)
n = libc.syscall(keyctl, 11, SERIAL, buf, 256)  # KEYCTL_READ of the evaluator's key
assert n < 0, buf.raw[:n]
assert libc.syscall(keyctl, 0, -3, 0) < 0  # KEYCTL_GET_KEYRING_ID of the session keyring
try:
    keys = open("/proc/keys").read()
except OSError:
    keys = ""
assert "dlmcache-sandbox-test" not in keys, keys
"""


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="keyctl numbers for x86_64 / aarch64")
@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
def test_the_evaluators_keyring_is_out_of_reach(mode, evaluator):
    """The evaluator holds a key in its session keyring; the program can neither read it, nor reach
    the keyring, nor see it in /proc/keys."""
    home = Path(f"/tmp/dlmcache-keyring-evaluator-{os.getpid()}")
    home.mkdir(mode=0o755, exist_ok=True)
    shutil.copy(sandbox.__file__, home / "sandbox.py")
    os.chmod(home / "sandbox.py", 0o644)
    code = f"HOME, MODE = {str(home)!r}, {mode!r}\n" + KEYRING_EVALUATOR
    user = {} if evaluator == "self" else dict(user=65534, group=65534, extra_groups=[])
    python = sys.executable if evaluator == "self" else _unprivileged_python()
    try:
        out = subprocess.run([python, "-I", "-c", code], input=KEYRING_PROBE, capture_output=True, text=True,
                             cwd="/", timeout=120, **user)  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    r = SandboxResult(**result)
    assert r.passed, r.stderr
    assert "keyring-secret-4242" not in r.stdout + r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="as root, each run gets a user id of its own")
@pytest.mark.parametrize("mode", MODES)
def test_each_run_has_a_user_id_of_its_own(mode):
    if mode == "fallback" and sandbox._nobody_python() is None:
        pytest.skip("no Python another user can run")
    uids = {run("print(__import__('os').getuid())", mode=mode).stdout.strip() for _ in range(3)}
    assert len(uids) == 3 and "0" not in uids and "65534" not in uids, uids


# ------------------------------------------------------------------------------ issue 37: bounds without
# a writable cgroup, and an evaluator that dies

HOGS = (
    "import os, time\nkids = []\n"
    "for _ in range(20):\n"
    "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
    "    if pid == 0:\n"
    "        try:\n            block = bytearray(120 * 2**20)\n        except MemoryError:\n            os._exit(1)\n"
    "        for i in range(0, len(block), 4096): block[i] = 1\n"
    "        time.sleep(1)\n        os._exit(0)\n"
    "    kids.append(pid)\n"
    "held = sum(os.waitpid(p, 0)[1] == 0 for p in kids)\n"
    "print('held', held)\n"
)


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
def test_the_runs_memory_is_bounded_without_a_memory_cgroup(mode, evaluator):
    """Issue 37, case 7: as a non-root evaluator (no writable cgroup), memory_mb=200 let 20 processes
    hold 120 MB each (2.6 GB of the host's memory). Processes x address space is now within
    memory_mb: at most one of them holds its 120 MB."""
    r = run(HOGS, Limits(timeout=20.0, cpu_seconds=10, memory_mb=200), mode=mode, evaluator=evaluator)
    held = int(r.stdout.split()[-1]) if "held" in r.stdout else 0
    assert held * 120 <= 200, r


SYSV = (
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "print([libc.msgget(0, 0o1600), libc.semget(0, 1, 0o1600), libc.shmget(0, 2**20, 0o1600)])\n"
)


@pytest.mark.parametrize("evaluator", EVALUATORS)
@pytest.mark.parametrize("mode", MODES)
def test_sysv_message_queues_semaphores_and_shared_memory_are_refused(mode, evaluator):
    """Issue 37, case 7: SysV message queues held 488 MB under memory_mb=128 (kernel memory no limit
    counted). msgget, semget and shmget are refused by the filter."""
    r = run(SYSV, mode=mode, evaluator=evaluator)
    assert r.passed and r.stdout.strip() == "[-1, -1, -1]", r


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_evaluator_leaves_no_process_directory_or_cgroup(mode, tmp_path):
    """Issue 37, case 8: after a SIGKILL of the evaluator, a setsid descendant of the fallback's
    program kept running and its directory stayed; empty cgroups stayed in both modes."""
    marker = f"5{os.getpid() % 10}.{time.time_ns() % 10**6}"
    program = DETACHED.format(marker=marker, then="time.sleep(60)")
    code = (
        "import sys, time\nfrom dlmcache.evals.sandbox import Limits, run_program\n"
        f"run_program(sys.stdin.read(), Limits(timeout=60), containment={mode!r})\n"
    )
    before = set(Path(tempfile_dir()).glob("dlmcache-sandbox-*"))
    evaluator = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    evaluator.stdin.write(program)
    evaluator.stdin.close()
    deadline = time.time() + 20
    while not _processes_with(marker) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker), "the program did not start"
    evaluator.kill()
    evaluator.wait()
    deadline = time.time() + 5
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []
    assert set(Path(tempfile_dir()).glob("dlmcache-sandbox-*")) <= before  # its directory is gone
    for base in set(sandbox._cgroup_controllers().values()):
        stale = [n for n in os.listdir(base) if n.startswith("dlmcache-sandbox-")
                 and not os.path.exists(f"/proc/{n.rsplit('-', 1)[1]}")]  # fmt: skip
        assert stale == [], (base, stale)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()
