"""Run untrusted generated code in a contained subprocess.

Each program runs in its own process with:

- a fresh temporary working directory (also its HOME and TMPDIR), removed afterwards;
- resource limits: address space (memory), CPU seconds, file size, open files, no core dumps, and a
  cap on processes (when the evaluator runs as root the child first drops to `nobody`, since the
  kernel does not apply the process cap to root);
- no network: a new network namespace (only a loopback that is down) where the kernel allows it,
  and Landlock TCP rules (Linux >= 6.7) on top;
- no writes outside its directory: a Landlock ruleset (Linux >= 5.13) that allows file writes only
  under the temporary directory and /dev (for /dev/null);
- a wall-clock timeout, after which the whole process group is killed; every process that still
  carries the run's marker in its environment is killed too, so a child that left the group by
  `setsid` does not survive.

`isolation()` says which of these layers the running kernel provides; the tests check that hostile
programs (infinite loop, fork bomb, a 10 GB allocation, writing outside the directory, opening a
socket) are contained and that correct programs still pass.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import cache

_MARKER = "DLMCACHE_SANDBOX_RUN"
_NOBODY = 65534
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38
_SYS_LANDLOCK = {"create_ruleset": 444, "add_rule": 445, "restrict_self": 446}  # x86_64 and aarch64
_LANDLOCK_RULE_PATH_BENEATH = 1
# Landlock filesystem rights: write-type ones are handled (denied unless a rule allows them), reads
# and execution stay allowed. Bits from linux/landlock.h: WRITE_FILE 1, REMOVE_DIR..MAKE_SYM 4-12,
# REFER 13 (ABI 2), TRUNCATE 14 (ABI 3).
_FS_WRITE_FILE, _FS_TRUNCATE = 1 << 1, 1 << 14
_FS_WRITE_RIGHTS = {
    1: _FS_WRITE_FILE | sum(1 << bit for bit in range(4, 13)),
    2: _FS_WRITE_FILE | sum(1 << bit for bit in range(4, 14)),
    3: _FS_WRITE_FILE | sum(1 << bit for bit in range(4, 15)),
}
_LANDLOCK_NET_BIND_TCP, _LANDLOCK_NET_CONNECT_TCP = 1, 2


@dataclass
class SandboxResult:
    """How one program ended: status is "passed" (exit 0), "failed" (non-zero exit, e.g. a failed
    assert), "timeout" (wall clock or CPU time ran out) or "error" (the sandbox could not start it)."""

    status: str
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits."""

    timeout: float = 10.0  # wall clock, seconds
    memory_mb: int = 1024  # address space
    cpu_seconds: int = 10
    file_size_mb: int = 16
    max_processes: int = 32
    max_open_files: int = 64

    def __post_init__(self):
        for name in ("timeout", "memory_mb", "cpu_seconds", "file_size_mb", "max_processes", "max_open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)!r}")


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64)]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


@cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc().syscall(_SYS_LANDLOCK["create_ruleset"], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


@cache
def _can_unshare_network() -> bool:
    """Whether a child may enter a new network namespace (probed in a throwaway process)."""
    if not sys.platform.startswith("linux"):
        return False
    pid = os.fork()
    if pid == 0:  # the probe child: exit status says whether unshare worked
        os._exit(0 if _unshare_network() else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@cache
def _interpreter() -> tuple[str, bool]:
    """(python, drop_to_nobody): as root, the first Python that `nobody` can run (a virtualenv under
    /root usually is not readable by it); otherwise this interpreter."""
    if os.geteuid() != 0:
        return sys.executable, False
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(python):
            continue

        try:
            probe = subprocess.run(
                [python, "-I", "-c", "pass"], preexec_fn=_become_nobody, capture_output=True, timeout=30
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return python, True
    return sys.executable, False


def isolation() -> dict:
    """Which containment layers this machine provides."""
    abi = landlock_abi()
    python, drop = _interpreter()
    return {
        "python": python,
        "network_namespace": _can_unshare_network(),
        "landlock_abi": abi,
        "filesystem_writes_confined": abi >= 1,
        "tcp_blocked_by_landlock": abi >= 4,
        "runs_as_nobody": drop,
        "process_cap_enforced": drop or os.geteuid() != 0,
    }


def _unshare_network() -> bool:
    """Move this process into a new, empty network namespace (as root directly, otherwise inside a
    new user namespace)."""
    libc = _libc()
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWNET | _CLONE_NEWUSER
    return libc.unshare(ctypes.c_int(flags)) == 0


def _landlock_confine(workdir: str, abi: int) -> None:
    """Allow file writes only beneath `workdir` and to /dev/null, and (ABI >= 4) no TCP connect /
    bind at all."""
    libc = _libc()
    fs_rights = _FS_WRITE_RIGHTS[min(abi, 3)]
    net_rights = _LANDLOCK_NET_BIND_TCP | _LANDLOCK_NET_CONNECT_TCP if abi >= 4 else 0
    attr = _LandlockRulesetAttr(fs_rights, net_rights)
    size = ctypes.sizeof(attr) if abi >= 4 else 8
    ruleset = libc.syscall(_SYS_LANDLOCK["create_ruleset"], ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    file_rights = fs_rights & (_FS_WRITE_FILE | _FS_TRUNCATE)  # the only write rights a file rule may hold
    for path, rights in ((workdir, fs_rights), ("/dev/null", file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _LandlockPathBeneathAttr(rights, fd)
        if libc.syscall(_SYS_LANDLOCK["add_rule"], ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
        os.close(fd)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS) failed")
    if libc.syscall(_SYS_LANDLOCK["restrict_self"], ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)


def _become_nobody() -> None:
    """Drop root for the unprivileged `nobody` user (in a forked child, before exec)."""
    os.setgroups([])
    os.setgid(_NOBODY)
    os.setuid(_NOBODY)


def _processes_of(uid: int) -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += os.stat(f"/proc/{pid}").st_uid == uid
        except OSError:
            pass
    return count


def _child_setup(workdir: str, limits: Limits, network: bool, abi: int, drop: bool):
    """The preexec function: runs in the forked child before exec."""
    proc_cap = limits.max_processes + _processes_of(_NOBODY if drop else os.geteuid())

    def setup():
        if network:
            _unshare_network()
        mb = 1024 * 1024
        for res, value in (
            (resource.RLIMIT_AS, limits.memory_mb * mb),
            (resource.RLIMIT_FSIZE, limits.file_size_mb * mb),
            (resource.RLIMIT_NOFILE, limits.max_open_files),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, proc_cap),
        ):
            resource.setrlimit(res, (value, value))
        # SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        if drop:
            _become_nobody()
        if abi >= 1:
            _landlock_confine(workdir, abi)

    return setup


def _kill_marked(token: str, rounds: int = 50) -> None:
    """SIGKILL every process whose environment carries this run's marker (children left behind),
    repeating until none is found: a fork bomb may fork again between one listing and the kills."""
    needle = f"{_MARKER}={token}".encode()
    for _ in range(rounds):
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        os.kill(int(pid), signal.SIGKILL)
                        found = True
            except OSError:
                pass
        if not found:
            return
        time.sleep(0.01)


def run_program(source: str, limits: Limits | None = None, python: str | None = None) -> SandboxResult:
    """Run the Python program `source` in the sandbox; passed means it exited with status 0.
    `python` defaults to an interpreter the sandbox user can run (see `isolation()`)."""
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    limits = limits or Limits()
    token = uuid.uuid4().hex
    workdir = tempfile.mkdtemp(prefix="dlmcache-sandbox-")
    interpreter, drop = _interpreter()
    if drop:
        os.chown(workdir, _NOBODY, _NOBODY)
    with open(os.path.join(workdir, "program.py"), "w") as f:
        f.write(source)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        _MARKER: token,
    }
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [python or interpreter, "-I", "program.py"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_child_setup(workdir, limits, _can_unshare_network(), landlock_abi(), drop),
        )
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(workdir, ignore_errors=True)
        return SandboxResult("error", None, time.perf_counter() - t0, stderr=f"sandbox failed to start: {e}")
    try:
        out, err = proc.communicate(timeout=limits.timeout)
        # out of CPU time is a timeout too (the CPU limit can strike before the wall clock)
        status = "passed" if proc.returncode == 0 else "timeout" if proc.returncode == -signal.SIGXCPU else "failed"
    except subprocess.TimeoutExpired:
        status = "timeout"
        _kill_group(proc.pid)
        _kill_marked(token)  # before reading to EOF: an escaped child may still hold the pipes
        out, err = proc.communicate()
    finally:
        _kill_group(proc.pid)
        _kill_marked(token)
        shutil.rmtree(workdir, ignore_errors=True)
    tail = 4000
    return SandboxResult(
        status,
        proc.returncode,
        time.perf_counter() - t0,
        out.decode(errors="replace")[-tail:],
        err.decode(errors="replace")[-tail:],
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
