"""Run untrusted generated code in a contained process tree.

`run_program(source, limits)` starts this file as a launcher (`python -I -S sandbox.py`, standard
library only) that confines the program in one of two ways, chosen once per machine by
`isolation()`:

"namespaces" (the default wherever the kernel allows it, as root or not):
- new PID, mount, network, IPC and UTS namespaces (a user namespace too when not root). The launcher
  forks an init (PID 1 of the new PID namespace) that runs the program as PID 2; when the program
  exits, or when the evaluator kills the launcher (the init dies with it: parent-death signal), the
  kernel kills every process left in the namespace, whatever they did (setsid, double fork, empty
  environment). Nothing outside the namespace can be signalled, and `kill(-1)` reaches only the run.
- its own root filesystem: a size-limited tmpfs (`Limits.disk_mb`) holding /work (the working
  directory, HOME and TMPDIR) and /tmp, with read-only bind mounts of /usr, /etc, the interpreter's
  prefix and five /dev nodes, and a fresh /proc that shows only the run's processes. Host sockets,
  other runs' files and the host's /proc are not in its view; the old root is detached.
- as root, the program runs as a user id of its own, picked per run (no other process on the machine
  has it, so its process count and its user keyring are the run's alone); otherwise as an
  unprivileged user of its user namespace (the evaluator's own user outside), without capabilities.

"fallback" (kernels without user or PID namespaces, e.g. containers whose seccomp forbids
`unshare`): the launcher is a child subreaper, so every descendant that outlives its parent is
re-parented to it, and it kills them all when the program ends or the evaluator stops it; the
program runs in a fresh directory on the host filesystem. What the fallback cannot give: a private
/proc, and a bound on disk use beyond `file_size_mb` per file.

Both add, where the kernel has them: a cgroup per run (v2, or v1's memory and pids controllers,
where writable: as root) whose memory limit (`Limits.memory_mb`, swap 0) counts every page the run
touches, memfd and tmpfs included, and whose pids limit counts its processes; without a memory
cgroup, tasks x address space within `memory_mb` (`_memory_bounds`); resource limits (address
space per process, CPU seconds, file size, open files, processes, no POSIX message queues); a fresh
session keyring and a seccomp filter that refuses `memfd_create`, SysV shared memory, message
queues and semaphores, the keyring calls (`keyctl`, `add_key`, `request_key`) and, in the
fallback, AF_UNIX sockets, so memory outside the accounting, the evaluator's keys and its sockets
are out of reach even without cgroups; when the evaluator dies, the launcher (its parent-death
signal) kills the run and removes its directory and cgroups; Landlock (writes only under the
working directory; no TCP from ABI 4; no signals to, nor abstract Unix sockets of, processes outside
the run from ABI 6), `no_new_privs`, and a network namespace.

Output is read as it arrives and capped (`Limits.output_mb`, the last 4000 characters are kept), so
the evaluator's memory stays flat. `run_program` returns within `timeout` plus about a second in
every case. A program "passes" only if it exits with status 0 *after* its last line ran: the
launcher runs it through a small runner whose last act, once the program has returned, is to write
"end" to a pipe whose other end the run's init (the fallback's launcher) holds; that process, not the
program's, reports to the evaluator whether it came. No secret lives in the program's process, so
`sys.exit(0)`, `exit()`, `os._exit(0)` or `unittest.main()` before the reference asserts is a
failure, and so is a program that searches the runner's frames for a token to print. (Code written
against this sandbox can still write "end" to that pipe itself: nothing in the program's own process
can tell the runner's instructions after the program from the program's own. `verdicts` closes that
for assert-style tests by judging them outside.)
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache

_NOBODY = 65534
_INNER_UID = 1000  # the program's user inside its user namespace (non-root evaluators)
_STATUS_FD_ENV = "DLMCACHE_SANDBOX_STATUS_FD"
_TAIL = 4000
_GRACE = 0.5  # seconds between asking the launcher to stop and killing it

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME, _MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SYS_LANDLOCK = {"create_ruleset": 444, "add_rule": 445, "restrict_self": 446}  # x86_64 and aarch64
_LANDLOCK_RULE_PATH_BENEATH = 1
# Landlock filesystem rights (linux/landlock.h): EXECUTE 0, WRITE_FILE 1, READ_FILE 2, READ_DIR 3,
# REMOVE_DIR..MAKE_SYM 4-12, REFER 13 (ABI 2), TRUNCATE 14 (ABI 3). Handled rights are denied unless a
# rule allows them beneath a path.
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR, _FS_TRUNCATE = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 14
_FS_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FS_WRITE_RIGHTS = {
    1: _FS_WRITE_FILE | sum(1 << bit for bit in range(4, 13)),
    2: _FS_WRITE_FILE | sum(1 << bit for bit in range(4, 14)),
    3: _FS_WRITE_FILE | sum(1 << bit for bit in range(4, 15)),
}
_LANDLOCK_NET_BIND_TCP, _LANDLOCK_NET_CONNECT_TCP = 1, 2
_LANDLOCK_SCOPE_ABSTRACT_UNIX, _LANDLOCK_SCOPE_SIGNAL = 1, 2
_DEV_NODES = ("null", "zero", "full", "random", "urandom")
_CGROUP_ROOT = "/sys/fs/cgroup"
_RUN_UIDS = (0x60000000, 0x70000000)  # as root, each run gets a user id of its own from this range
_KEYCTL_JOIN_SESSION_KEYRING = 1
# seccomp: syscalls refused with EPERM (x86_64, aarch64): memory outside the run's accounting
# (memfd_create, SysV shared memory, message queues and semaphores) and the kernel keyrings (keyctl,
# add_key, request_key)
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
_SECCOMP_DENY = {
    "x86_64": {"memfd_create": 319, "shmget": 29, "msgget": 68, "semget": 64, "keyctl": 250, "add_key": 248,
               "request_key": 249},
    "aarch64": {"memfd_create": 279, "shmget": 194, "msgget": 186, "semget": 190, "keyctl": 219, "add_key": 217,
                "request_key": 218},
}  # fmt: skip
# the fallback also refuses socket(AF_UNIX, ...): without a mount namespace, the host's pathname
# sockets (the evaluator's among them) are in its view
_SYS_SOCKET = {"x86_64": 41, "aarch64": 198}
_AF_UNIX = 1
#: Without a memory cgroup, the run's memory is bounded by tasks x address space (RLIMIT_NPROC counts
#: threads too): each task gets at least this much address space (a Python with 8 threads of 8 MB
#: stacks needs ~84 MB), and the run as many tasks as `memory_mb` holds of them (at most `max_processes`).
_MIN_PROCESS_MB = 96
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
# The program runs through this: program.py as __main__, then, only if it returned, "end" on fd 3 (a
# pipe read by the run's init or the fallback's launcher, never by the program's process).
_END_FD = 3
_RUNNER = (
    "import os, runpy, sys\n"
    "sys.argv = ['program.py']\n"
    "runpy.run_path('program.py', run_name='__main__')\n"
    "sys.stdout.flush(); sys.stderr.flush()\n"
    "os.write(3, b'end')\n"
)


@dataclass
class SandboxResult:
    """How one program ended. status: "passed" (ran to its end and exited 0), "failed" (non-zero
    exit, killed, exited before its end, or wrote more than `Limits.output_mb`), "timeout" (wall
    clock or CPU time ran out) or "error" (the sandbox could not start it); reason says which."""

    status: str
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits."""

    timeout: float = 10.0  # wall clock, seconds
    memory_mb: int = 1024  # the run's memory (a memory cgroup), else each process's address space
    cpu_seconds: int = 10
    file_size_mb: int = 16
    disk_mb: int = 64  # the private filesystem (namespaces mode)
    output_mb: float = 8.0  # stdout + stderr read before the program is stopped
    max_processes: int = 32
    max_open_files: int = 64

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Limits.{name} must be a number > 0, got {value!r}")


# ---------------------------------------------------------------- kernel interfaces (ctypes)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


@cache
def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc().syscall(_SYS_LANDLOCK["create_ruleset"], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_confine(writable: list[str], readable: list[str] | None, abi: int) -> None:
    """Allow file writes only beneath `writable` (and to /dev/null); with `readable`, reads and
    execution only beneath those paths and `writable` (None: reads stay open). From ABI 4 no TCP
    bind / connect; from ABI 6 no signals to, nor abstract Unix sockets of, processes outside this
    domain."""
    libc = _libc()
    write_rights = _FS_WRITE_RIGHTS[min(abi, 3)]
    fs_rights = write_rights | (_FS_READ if readable is not None else 0)
    net_rights = _LANDLOCK_NET_BIND_TCP | _LANDLOCK_NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _LANDLOCK_SCOPE_ABSTRACT_UNIX | _LANDLOCK_SCOPE_SIGNAL if abi >= 6 else 0
    attr = _LandlockRulesetAttr(fs_rights, net_rights, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _check(
        libc.syscall(_SYS_LANDLOCK["create_ruleset"], ctypes.byref(attr), ctypes.c_size_t(size), 0),
        "landlock_create_ruleset",
    )
    file_rights = fs_rights & (_FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE)  # what a file rule may hold
    rules = [(p, fs_rights) for p in writable] + [("/dev/null", file_rights)]
    rules += [(p, _FS_READ) for p in readable or () if os.path.exists(p)]
    for path, rights in rules:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = _LandlockPathBeneathAttr(rights if os.path.isdir(path) else rights & file_rights, fd)
        _check(
            libc.syscall(_SYS_LANDLOCK["add_rule"], ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
            f"landlock_add_rule({path})",
        )
        os.close(fd)
    _check(libc.syscall(_SYS_LANDLOCK["restrict_self"], ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)


def _prctl(option: int, value: int) -> None:
    _check(_libc().prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc().mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _bind_readonly(source: str, target: str) -> None:
    """Bind `source` read-only at `target`, keeping the flags the kernel locks in a user namespace."""
    _mount(source, target, None, _MS_BIND | _MS_REC)
    st = os.statvfs(source).f_flag
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    flags |= _MS_NOEXEC if st & os.ST_NOEXEC else 0
    if st & os.ST_NOATIME:
        flags |= _MS_NOATIME
    elif st & os.ST_RELATIME:
        flags |= _MS_RELATIME
    else:
        flags |= _MS_STRICTATIME
    flags |= _MS_NODIRATIME if st & os.ST_NODIRATIME else 0
    _mount(None, target, None, flags)


# ---------------------------------------------------------------- what this machine provides


def _namespace_flags(as_root: bool) -> int:
    flags = _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS  # the init makes its own mount namespace
    return flags if as_root else flags | _CLONE_NEWUSER


@cache
def _nobody_python() -> str | None:
    """As root in fallback mode, a Python the `nobody` user can run (a virtualenv under /root usually
    is not readable by it); None when there is none."""
    for python in (os.path.realpath(sys._base_executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(python):
            continue
        try:
            probe = subprocess.run(
                [python, "-I", "-S", "-c", "pass"], user=_NOBODY, group=_NOBODY, extra_groups=[],
                capture_output=True, timeout=30,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return python
    return None


@cache
def _namespaces_work() -> str:
    """ "" when a trivial program runs in the namespaces mode here, else why it does not."""
    if not sys.platform.startswith("linux") or platform.machine() not in _SYS_PIVOT_ROOT:
        return f"needs Linux on {sorted(_SYS_PIVOT_ROOT)}"
    probe = _run(source="print('ok')", limits=Limits(timeout=30), python=None, mode="namespaces")
    if probe.status == "passed" and probe.stdout.strip() == "ok":
        return ""
    return probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.reason


def isolation() -> dict:
    """Which containment this machine gives programs (the mode `run_program` uses by default)."""
    why = _namespaces_work()
    abi = landlock_abi()
    root = os.geteuid() == 0
    mode = "namespaces" if not why else "fallback"
    return {
        "mode": mode,
        "namespaces_unavailable_because": why or None,
        "process_tree": "PID namespace" if mode == "namespaces" else "child subreaper",
        "private_filesystem": mode == "namespaces",
        "private_proc": mode == "namespaces",
        "network_namespace": mode == "namespaces",
        "runs_as": ("a user id of its own" if root else "an unprivileged user of its own user namespace")
        if mode == "namespaces"
        else ("a user id of its own" if root and _nobody_python() else "the evaluator's user"),
        "process_cap": "pids cgroup" if "pids" in _cgroup_controllers() else "RLIMIT_NPROC",
        "memory_cap": "memory cgroup" if "memory" in _cgroup_controllers() else "RLIMIT_AS per process",
        "seccomp": platform.machine() in _SECCOMP_DENY,
        "landlock_abi": abi,
        "writes_confined": mode == "namespaces" or abi >= 1,
        "tcp_blocked_by_landlock": abi >= 4,
        "signals_scoped_by_landlock": abi >= 6,
    }


# ---------------------------------------------------------------- the evaluator side


def run_program(
    source: str, limits: Limits | None = None, python: str | None = None, containment: str = "auto"
) -> SandboxResult:
    """Run the Python program `source` in the sandbox and say how it ended (see the module doc).

    python: the interpreter for the program (default: this one's base interpreter; in the fallback
    as root, one the `nobody` user can run). containment: "auto" (what `isolation()` chose),
    "namespaces" or "fallback".
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    if limits is not None and not isinstance(limits, Limits):
        raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
    if containment not in ("auto", "namespaces", "fallback"):
        raise ValueError(f"containment={containment!r}: expected 'auto', 'namespaces' or 'fallback'")
    if containment == "auto":
        containment = "fallback" if _namespaces_work() else "namespaces"
    return _run(source, limits or Limits(), python, containment)


class _Tail:
    """The last `_TAIL` bytes of a stream."""

    def __init__(self):
        self.data = b""

    def feed(self, chunk: bytes) -> None:
        self.data = (self.data + chunk)[-2 * _TAIL :]

    def text(self) -> str:
        return self.data[-_TAIL:].decode(errors="replace")


def _run(source: str, limits: Limits, python: str | None, mode: str) -> SandboxResult:
    drop = False
    if mode == "fallback" and python is None:
        python = _nobody_python() if os.geteuid() == 0 else None
        drop = python is not None
    workdir = tempfile.mkdtemp(prefix="dlmcache-sandbox-") if mode == "fallback" else None
    config = {
        "source": source,
        "workdir": workdir,
        "limits": limits.__dict__,
        "python": python,
        "drop": drop,
        "uid": _RUN_UIDS[0] + secrets.randbelow(_RUN_UIDS[1] - _RUN_UIDS[0]) if os.geteuid() == 0 else None,
        "mode": mode,
    }
    _sweep_stale_cgroups()
    status_r, status_w = os.pipe()
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            env={_STATUS_FD_ENV: str(status_w), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            start_new_session=True,
        )
    except OSError as e:
        os.close(status_r)
        _remove_workdir(workdir)
        return SandboxResult("error", None, time.monotonic() - t0, stderr=f"sandbox failed to start: {e}")
    finally:
        os.close(status_w)
    try:
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out, err, status = _Tail(), _Tail(), _Tail()
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
    deadline = t0 + limits.timeout
    budget = int(limits.output_mb * 1024 * 1024)
    stopped = ""
    while streams:
        wait = deadline - time.monotonic()
        if wait <= 0:
            stopped = "wall-clock timeout"
            break
        ready, _, _ = select.select(list(streams), [], [], wait)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                del streams[fd]
                continue
            streams[fd].feed(chunk)
            if fd != status_r:
                budget -= len(chunk)
        if budget < 0:
            stopped = f"more than {limits.output_mb} MB of output"
            break
    if stopped:
        _stop(proc, streams)
    proc.wait()
    for path in _run_cgroups(proc.pid):
        _empty_cgroup(path)
    _remove_workdir(workdir)
    os.close(status_r)
    proc.stdout.close()
    proc.stderr.close()
    seconds = time.monotonic() - t0
    report = _last_json(status.text())
    returncode = report.get("returncode")
    stdout = out.text()
    if "setup_error" in report:
        return SandboxResult("error", None, seconds, stdout, f"sandbox setup failed: {report['setup_error']}", "setup")
    if stopped == "wall-clock timeout":
        return SandboxResult("timeout", returncode, seconds, stdout, err.text(), stopped)
    if stopped:
        return SandboxResult("failed", returncode, seconds, stdout, err.text(), stopped)
    if returncode is None:
        return SandboxResult("error", None, seconds, stdout, err.text(), "the launcher ended without a report")
    if returncode == -signal.SIGXCPU:
        return SandboxResult("timeout", returncode, seconds, stdout, err.text(), "CPU time limit")
    if returncode != 0:
        why = f"killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
        return SandboxResult("failed", returncode, seconds, stdout, err.text(), why)
    if not report.get("finished"):
        return SandboxResult("failed", 0, seconds, stdout, err.text(), "exited before the end of the program")
    return SandboxResult("passed", 0, seconds, stdout, err.text(), "ran to its end")


def _stop(proc: subprocess.Popen, streams: dict) -> None:
    """Ask the launcher to end the run (it kills the program's tree), then kill its process group;
    drain the pipes for at most `_GRACE` seconds more."""
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + _GRACE
    while streams and time.monotonic() < end:
        ready, _, _ = select.select(list(streams), [], [], max(0.0, end - time.monotonic()))
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                del streams[fd]
            elif len(streams[fd].data) < _TAIL:  # keep reading the status; drop runaway output
                streams[fd].feed(chunk)
    try:  # the fallback's launcher may need a moment to kill a large tree
        proc.wait(timeout=2 * _GRACE)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_workdir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _empty_cgroup(path: str) -> None:
    """Kill whatever is left in a run's cgroup (nothing can leave it), then remove it."""
    if not os.path.isdir(path):
        return
    for _ in range(200):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
            if not pids:
                os.rmdir(path)
                return
        except OSError:
            pass
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.01)


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


# ---------------------------------------------------------------- the launcher side


def _report(**fields) -> None:
    os.write(int(os.environ[_STATUS_FD_ENV]), (json.dumps(fields) + "\n").encode())


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _count_processes(uid: int) -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += os.stat(f"/proc/{pid}").st_uid == uid
        except OSError:
            pass
    return count


def _exec_program(
    cfg: dict,
    workdir: str,
    python: str,
    end_fd: int,
    uid: int | None,
    nproc: int,
    writable: list[str],
    readable: list[str] | None = None,
) -> None:
    """In the forked program process: its own process group, limits, a fresh session keyring, its
    user (`uid`; None: stay), Landlock, seccomp, then exec the runner. Never returns."""
    try:
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        if end_fd != _END_FD:
            os.dup2(end_fd, _END_FD)
        os.set_inheritable(_END_FD, True)
        os.closerange(_END_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # the status pipe above all
        lim = cfg["limits"]
        mb = 1024 * 1024
        address_space, nproc = _memory_bounds(lim, "memory" in cfg.get("cgroups", ()), nproc)
        for res, value in (
            (resource.RLIMIT_AS, address_space),
            (resource.RLIMIT_FSIZE, int(lim["file_size_mb"] * mb)),
            (resource.RLIMIT_NOFILE, int(lim["max_open_files"])),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, nproc),
            (resource.RLIMIT_MSGQUEUE, 0),  # (POSIX message queues: kernel memory outside the run's)
        ):
            resource.setrlimit(res, (value, value))
        # SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later
        cpu = int(lim["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        _join_fresh_session_keyring()
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        abi = landlock_abi()
        if abi >= 1:
            _landlock_confine(writable, readable, abi)
        _seccomp_deny(unix_sockets=cfg["mode"] == "namespaces")
        os.chdir(workdir)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        os.execve(python, [python, "-I", "-c", _RUNNER], env)
    except BaseException as e:  # noqa: BLE001 - report anything, then die without running the evaluator's code
        os.write(2, f"sandbox: could not start the program: {e}\n".encode())
    os._exit(127)


def _memory_bounds(limits: dict, memory_cgroup: bool, nproc: int) -> tuple[int, int]:
    """(address space per process in bytes, RLIMIT_NPROC) for a run allowed `nproc` processes (its
    `max_processes` plus those of its user outside the run). With a memory cgroup the run's memory is
    bounded there; each process keeps an address space of 4x the run's memory, so one allocation
    far past the budget is a MemoryError at once while threads still fit (glibc reserves 64 MB of
    address space per thread arena). Without one, tasks x address space is at most `memory_mb`: as
    many tasks (processes and threads) of at least `_MIN_PROCESS_MB` each as the budget holds."""
    mb, memory = 1024 * 1024, int(limits["memory_mb"])
    if memory_cgroup:
        return 4 * memory * mb, nproc
    others = nproc - int(limits["max_processes"])
    processes = max(1, min(int(limits["max_processes"]), memory // _MIN_PROCESS_MB))
    return memory * mb // processes, processes + others


def _ran_to_the_end(end_r: int) -> bool:
    """Whether the runner wrote "end" (read once the program has exited)."""
    os.set_blocking(end_r, False)
    try:
        data = os.read(end_r, 16)
    except BlockingIOError:
        data = b""
    os.close(end_r)
    return data == b"end"


def _launch_namespaces(cfg: dict) -> None:
    root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    python = os.path.realpath(cfg["python"] or sys._base_executable)
    prefix = os.path.dirname(os.path.dirname(python))
    # RLIMIT_NPROC counts the user's processes: as root, the run's own user id has no others; otherwise
    # the launcher, the init and the run in the new user namespace.
    nproc = int(cfg["limits"]["max_processes"]) + (0 if root else 2)
    _join_cgroups(cfg)
    _check(_libc().unshare(ctypes.c_int(_namespace_flags(root))), "unshare")
    if not root:  # map the evaluator's user to an unprivileged user inside
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{_INNER_UID} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{_INNER_UID} {gid} 1")
    alive_r, alive_w = os.pipe()  # open while the launcher lives (getppid() is 0 across the namespace)
    init = os.fork()
    if init == 0:
        os.close(alive_w)
        _init(cfg, alive_r, python, prefix, root, nproc)
    os.close(alive_r)

    def stop(*_) -> None:  # the evaluator stops the run, or died (our parent-death signal)
        try:
            os.kill(init, signal.SIGKILL)  # (the kernel then kills the whole PID namespace)
            os.waitpid(init, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        _leave_cgroups(cfg)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    os.close(1)
    os.close(2)
    os.waitpid(init, 0)
    _leave_cgroups(cfg)


def _cgroup_controllers() -> dict[str, str]:
    """controller -> the directory under which a run's cgroup is made ("memory", "pids"; only those
    this process may write): cgroup v2's unified hierarchy when it offers them, else v1's, under this
    process's own cgroup so the machine's limits still apply above the run's."""
    found = {}
    unified = os.path.join(_CGROUP_ROOT, "cgroup.controllers")
    own = _own_cgroups()
    if os.path.isfile(unified):
        with open(unified) as f:
            available = f.read().split()
        base = os.path.join(_CGROUP_ROOT, own.get("", "/").lstrip("/"))
        if os.access(base, os.W_OK):
            found.update({c: base for c in ("memory", "pids") if c in available})
        return found
    for controller in ("memory", "pids"):
        base = os.path.join(_CGROUP_ROOT, controller, own.get(controller, "/").lstrip("/"))
        if os.path.isdir(base) and os.access(base, os.W_OK):
            found[controller] = base
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller ("" for v2's unified hierarchy)."""
    paths = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    paths[c] = path
    except OSError:
        pass
    return paths


def _run_cgroups(launcher: int) -> list[str]:
    """The cgroup directories of the run whose launcher is `launcher` (one per hierarchy)."""
    return sorted({os.path.join(base, f"dlmcache-sandbox-{launcher}") for base in _cgroup_controllers().values()})


def _join_cgroups(cfg: dict) -> None:
    """A cgroup of this run (per hierarchy) named after the launcher, which the launcher joins, so
    everything forked later is counted and can be killed by the evaluator whatever it does: memory
    at most `memory_mb` (swap 0; every page the run touches counts, memfd and tmpfs pages
    included) and processes at most `max_processes` (plus the launcher and an init). The joined
    controllers go in `cfg["cgroups"]`."""
    limits = cfg["limits"]
    memory = str(int(limits["memory_mb"] * 1024 * 1024))
    pids = str(int(limits["max_processes"]) + 2)
    settings = {
        "memory": [("memory.max", memory), ("memory.swap.max", "0"), ("memory.limit_in_bytes", memory),
                   ("memory.memsw.limit_in_bytes", memory), ("memory.swappiness", "0")],
        "pids": [("pids.max", pids)],
    }  # fmt: skip
    joined, paths = [], []
    for controller, base in _cgroup_controllers().items():
        path = os.path.join(base, f"dlmcache-sandbox-{os.getpid()}")
        try:
            os.makedirs(path, exist_ok=True)
            for name, value in settings[controller]:
                if os.path.exists(os.path.join(path, name)):
                    with open(os.path.join(path, name), "w") as f:
                        f.write(value)
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            joined.append(controller)
            paths.append(path)
        except OSError:
            pass
    cfg["cgroups"], cfg["cgroup_paths"] = joined, sorted(set(paths))


def _leave_cgroups(cfg: dict) -> None:
    """Move the launcher back to the cgroups it came from and remove the run's (killing whatever is
    left in them), so that no directory outlives the run, even when the evaluator was killed."""
    for path in cfg.get("cgroup_paths", ()):
        try:
            with open(os.path.join(os.path.dirname(path), "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            continue
        _empty_cgroup(path)


def _sweep_stale_cgroups() -> None:
    """Remove the cgroups of runs whose launcher is gone (it was killed before it could)."""
    for base in set(_cgroup_controllers().values()):
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            pid = name.removeprefix("dlmcache-sandbox-")
            if pid != name and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                _empty_cgroup(os.path.join(base, name))


def _join_fresh_session_keyring() -> None:
    """Replace the inherited session keyring (an SSH / PAM login's or a service's, holding the
    evaluator's keys) by a new anonymous one."""
    number = _SYS_KEYCTL.get(platform.machine())
    if number is not None:
        _libc().syscall(ctypes.c_long(number), ctypes.c_long(_KEYCTL_JOIN_SESSION_KEYRING), ctypes.c_void_p(None))


def _seccomp_deny(unix_sockets: bool = True) -> None:
    """A seccomp filter (after no_new_privs) that answers EPERM to the calls in `_SECCOMP_DENY` (and,
    unless `unix_sockets`, to `socket(AF_UNIX, ...)`), and kills a process that calls through another
    architecture's table (x32, 32-bit compat) to get around it."""
    arch = platform.machine()
    if arch not in _SECCOMP_DENY:
        return
    ld_w_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, kill, eperm = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EPERM
    # (code, jump if true, jump if false, k), jumps to labels; resolved below to the offsets BPF counts
    # from the next instruction
    code: list[tuple] = [
        (ld_w_abs, None, None, 4),  # seccomp_data.arch
        (jeq, "next", "kill", _AUDIT_ARCH[arch]),
        (ld_w_abs, None, None, 0),  # seccomp_data.nr
    ]
    if arch == "x86_64":  # the x32 table: syscall numbers from 0x40000000
        code.append((jge, "kill", "next", 0x40000000))
    code += [(jeq, "eperm", "next", number) for number in _SECCOMP_DENY[arch].values()]
    if not unix_sockets:
        code += [(jeq, "next", "allow", _SYS_SOCKET[arch]), (ld_w_abs, None, None, 16),  # args[0]: the domain
                 (jeq, "eperm", "allow", _AF_UNIX)]  # fmt: skip
    labels = {"allow": len(code), "kill": len(code) + 1, "eperm": len(code) + 2}
    program = []
    for pc, (op, true, false, k) in enumerate(code):

        def offset(label, pc=pc):
            return 0 if label in (None, "next") else labels[label] - pc - 1

        program.append((op, offset(true), offset(false), k))
    program += [(ret, 0, 0, allow), (ret, 0, 0, kill), (ret, 0, 0, eperm)]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(program))(*[SockFilter(*op) for op in program])
    prog = SockFprog(len(program), filters)
    _check(_libc().prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def _init(cfg: dict, launcher_alive: int, python: str, prefix: str, root: bool, nproc: int) -> None:
    """PID 1 of the run: build the filesystem view, run the program as PID 2, and when it exits kill
    whatever is left and report its status. Never returns."""
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        os.set_blocking(launcher_alive, False)
        try:
            if os.read(launcher_alive, 1) == b"":  # EOF: the launcher died before the signal was armed
                os._exit(1)
        except BlockingIOError:
            pass
        os.close(launcher_alive)
        _prctl(_PR_SET_DUMPABLE, 0)
        # A mount namespace of the init's own: pivot_root moves the root of every process in it.
        _check(_libc().unshare(ctypes.c_int(_CLONE_NEWNS)), "unshare(CLONE_NEWNS)")
        new_root = _build_root(cfg, python, prefix, root)
        os.makedirs(os.path.join(new_root, ".old"))
        _check(_libc().syscall(_SYS_PIVOT_ROOT[platform.machine()], new_root.encode(), b"/tmp/.old"), "pivot_root")
        os.chdir("/")
        _check(_libc().umount2(b"/.old", _MNT_DETACH), "umount old root")
        os.rmdir("/.old")
    except BaseException as e:  # noqa: BLE001
        _report(setup_error=str(e))
        os._exit(1)
    end_r, end_w = os.pipe()
    program = os.fork()
    if program == 0:
        os.close(end_r)
        _exec_program(cfg, "/work", python, end_w, cfg["uid"], nproc, writable=["/work", "/tmp"])
    os.close(end_w)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            break
    finished = _ran_to_the_end(end_r)
    try:
        os.kill(-1, signal.SIGKILL)  # everything else in this PID namespace
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    _report(returncode=_returncode(status), finished=finished)
    os._exit(0)


def _build_root(cfg: dict, python: str, prefix: str, root: bool) -> str:
    """A tmpfs at /tmp (in this mount namespace only) laid out as the program's root filesystem."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    disk = int(cfg["limits"]["disk_mb"])
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={disk}m,mode=755")
    new_root = "/tmp"
    binds = ["/usr", "/etc"] + [p for p in (prefix,) if p != "/usr" and not p.startswith("/usr/")]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"):
        if os.path.islink(top):
            os.symlink(os.readlink(top), new_root + top)
        elif os.path.isdir(top):
            binds.append(top)
    for path in binds:
        os.makedirs(new_root + path, mode=0o755, exist_ok=True)
        _bind_readonly(path, new_root + path)
    os.makedirs(new_root + "/dev/shm", mode=0o755)
    os.chmod(new_root + "/dev/shm", 0o1777)
    for name in _DEV_NODES:
        target = f"{new_root}/dev/{name}"
        open(target, "w").close()
        _mount(f"/dev/{name}", target, None, _MS_BIND)
    os.makedirs(new_root + "/proc")
    try:
        _mount("proc", new_root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:
        pass  # e.g. a container that masks parts of its /proc: the program then has no /proc at all
    for masked in ("keys", "key-users"):  # keys of the evaluator's uid are listed there (as Docker does)
        target = f"{new_root}/proc/{masked}"
        if os.path.exists(target):
            _mount(f"{new_root}/dev/null", target, None, _MS_BIND)
    os.makedirs(new_root + "/tmp", mode=0o1777)
    os.chmod(new_root + "/tmp", 0o1777)
    work = new_root + "/work"
    os.makedirs(work, mode=0o700)
    with open(os.path.join(work, "program.py"), "w") as f:
        f.write(cfg["source"])
    owner = cfg["uid"] if root else _INNER_UID
    for path in (work, os.path.join(work, "program.py")):
        os.chown(path, owner, owner)
    return new_root


def _launch_fallback(cfg: dict) -> None:
    uid = cfg["uid"] if cfg["drop"] else None
    python = cfg["python"] or os.path.realpath(sys._base_executable)
    nproc = int(cfg["limits"]["max_processes"]) + (0 if uid is not None else _count_processes(os.geteuid()))
    _join_cgroups(cfg)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    workdir = cfg["workdir"]
    with open(os.path.join(workdir, "program.py"), "w") as f:
        f.write(cfg["source"])
    if uid is not None:
        for path in (workdir, os.path.join(workdir, "program.py")):
            os.chown(path, uid, uid)

    def end(status: int | None) -> None:
        finished = status is not None and _ran_to_the_end(end_r)
        _kill_descendants(program)
        if status is not None:
            _report(returncode=_returncode(status), finished=finished)
        shutil.rmtree(workdir, ignore_errors=True)
        _leave_cgroups(cfg)
        os._exit(0)

    program = 0
    signal.signal(signal.SIGTERM, lambda *_: end(None))  # the evaluator stops the run, or died
    end_r, end_w = os.pipe()
    program = os.fork()
    if program == 0:
        # Without a filesystem of its own, Landlock limits what it may read: the system's programs and
        # libraries, /etc, /dev, the interpreter and its directory (not /proc, /tmp, /home, ...).
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
        readable = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/dev", prefix]
        os.close(end_r)
        _exec_program(cfg, workdir, python, end_w, uid, nproc, writable=[workdir], readable=readable)
    os.close(end_w)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == program:
            end(status)


def _children_of(parent: int) -> list[int]:
    kids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                kids.append(int(pid))
        except (OSError, IndexError, ValueError):
            pass
    return kids


def _kill_descendants(program: int) -> None:
    """Kill every descendant of this subreaper: the program's process group at once, then the direct
    children and the orphans that the kernel re-parents to it as their parents die, until none is
    left."""
    if program:
        try:
            os.killpg(program, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    me = os.getpid()
    while True:
        kids = _children_of(me)
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _launcher_main() -> None:
    # The evaluator died: we end the run (each mode's SIGTERM handler kills it and removes its
    # workdir and cgroups), then ourselves. (Before the handler is set, SIGTERM's default kills us.)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    cfg = json.loads(sys.stdin.buffer.read())
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    try:
        if cfg["mode"] == "namespaces":
            _launch_namespaces(cfg)
        else:
            _launch_fallback(cfg)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.EACCES, errno.ENOSPC, errno.EUSERS):
            _report(setup_error=str(e))
        else:
            raise
    os._exit(0)


if __name__ == "__main__":
    _launcher_main()
