"""Run untrusted Python (a model's completion plus its tests) in a contained child process.

Each program runs in a fresh temporary directory with a wall-clock timeout and CPU, address
space, file-size and open-file rlimits. Process creation is the dangerous part when the
evaluator runs as root, because RLIMIT_NPROC does not bind root. So processes are contained by
one of (tried in this order):

  "cgroup"  a child of a writable pids cgroup (v2 with the pids controller, or the v1 pids
            hierarchy) with `pids.max`: the kernel refuses forks beyond it, whatever the uid;
  "setuid"  the child drops to the unprivileged `nobody` user, where RLIMIT_NPROC binds.

If neither is possible (root without a writable pids cgroup and unable to switch users), the
sandbox refuses to run (`SandboxUnavailable`): running a fork bomb as root is not an option.
With a cgroup, the child still drops to `nobody` when an interpreter that user may run exists,
so the program cannot write outside its directory either. When the evaluator is not root,
RLIMIT_NPROC binds already. With `nobody` but no cgroup, cleaning up kills every process of
`nobody` on the machine: give the sandbox a pids cgroup where that matters.

The child is started through a tiny bootstrap (`python -I -c ...`) that joins the cgroup, sets
the rlimits and drops privileges before exec'ing the program: doing this in `preexec_fn` is
unsafe in a threaded parent (JAX runs threads). Output goes to files, not pipes, so stray
grandchildren holding a pipe cannot hang the parent. On timeout, and after every run, every
process the program left behind is killed (the whole cgroup, or every process of `nobody`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvalError

SANDBOX_USER = "nobody"
_CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids")
_POLL_S = 0.02


class SandboxUnavailable(EvalError):
    """No way to contain process creation here; code execution is refused."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, enforced by the parent
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file the program may write
    open_files: int = 64
    max_procs: int = 16  # processes (and threads) the program may have at once


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    output: str  # the tail of stdout + stderr
    peak_procs: int  # most processes seen in the sandbox at once (including the program)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --- choosing the containment -----------------------------------------------------------------
def _pids_cgroup_root() -> Path | None:
    """A writable cgroup directory where a child can get a `pids.max`, or None."""
    for root in map(Path, _CGROUP_ROOTS):
        if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
            continue
        if root.name == "pids" and not (root / "cgroup.controllers").exists():  # the v1 pids hierarchy
            return root
        controllers = root / "cgroup.controllers"  # v2: the controller must be enabled for children
        subtree = root / "cgroup.subtree_control"
        if controllers.exists() and "pids" in controllers.read_text().split():
            if "pids" in subtree.read_text().split():
                return root
            try:
                subtree.write_text("+pids")
                return root
            except OSError:
                continue
    return None


def _world_executable(path: str) -> bool:
    """Can a user who owns nothing here run `path` (every directory on the way searchable)?"""
    real = Path(os.path.realpath(path))
    try:
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def _unprivileged_python() -> str | None:
    """An interpreter the sandbox user may execute: ours may live under root's home (0700)."""
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate and _world_executable(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class Containment:
    """How programs are contained here: a pids cgroup, an unprivileged user, or both."""

    cgroup_root: Path | None
    uid: int | None
    gid: int | None
    python: str

    def describe(self) -> str:
        parts = [f"pids cgroup under {self.cgroup_root}"] if self.cgroup_root else []
        if self.uid is not None:
            parts.append(f"user {SANDBOX_USER} (uid {self.uid}) with RLIMIT_NPROC")
        return " + ".join(parts) or "RLIMIT_NPROC (not root)"


def containment() -> Containment:
    """Root: a pids cgroup if one is writable, and dropping to `nobody` when an interpreter it
    may run exists (defence in depth; it alone also contains forks). Not root: RLIMIT_NPROC
    binds already. Raises SandboxUnavailable when root has neither."""
    if os.geteuid() != 0:
        return Containment(None, None, None, sys.executable)
    root = _pids_cgroup_root()
    python = _unprivileged_python()
    try:
        user = pwd.getpwnam(SANDBOX_USER) if python else None
    except KeyError:
        user = None
    if user is not None:
        return Containment(root, user.pw_uid, user.pw_gid, python)
    if root is not None:
        return Containment(root, None, None, sys.executable)
    raise SandboxUnavailable("cannot contain process creation: running as root with no writable pids cgroup "
                             f"and no {SANDBOX_USER!r} user with a runnable python; refusing to execute "
                             "generated code")


# --- the child -------------------------------------------------------------------------------
# Runs in the child before the program: join the cgroup, lower the limits, drop privileges.
_BOOTSTRAP = """
import json, os, resource, sys
c = json.loads(sys.argv[1])
if c["cgroup"]:
    with open(c["cgroup"] + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
for name, value in c["rlimits"]:
    resource.setrlimit(getattr(resource, name), (value, value))
if c["uid"] is not None:
    os.setgroups([])
    os.setgid(c["gid"])
    os.setuid(c["uid"])
os.execv(c["python"], [c["python"], "-I", "-B", c["program"]])
"""


class _Cgroup:
    def __init__(self, root: Path, max_procs: int):
        self.path = root / f"llama4_jax_sandbox_{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(max_procs))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill_all(self) -> None:
        kill = self.path / "cgroup.kill"  # v2: atomic
        if kill.exists():
            kill.write_text("1")
        # v1 has no cgroup.kill: kill until empty; pids.max bounds how many can appear meanwhile.
        deadline = time.monotonic() + 10
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(_POLL_S)

    def remove(self) -> None:
        for _ in range(100):  # rmdir fails while the killed processes are still being reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(_POLL_S)


def _uid_pids(uid: int) -> list[int]:
    """Live (not zombie) processes of `uid`: a killed orphan stays a zombie until init reaps it."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    with open(f"/proc/{entry}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            out.append(int(entry))
            except (OSError, IndexError):
                pass
    return out


def _kill_user(uid: int, gid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) from a process running as that user reaches
    exactly those (setsid cannot escape it, unlike a process-group kill)."""
    code = f"import os, signal; os.setgroups([]); os.setgid({gid}); os.setuid({uid}); os.kill(-1, signal.SIGKILL)"
    for _ in range(20):
        subprocess.run([sys.executable, "-I", "-c", code], check=False, stdin=subprocess.DEVNULL)
        if not _uid_pids(uid):
            return
        time.sleep(_POLL_S)


def _rlimits(lim: Limits, plan: Containment) -> list[tuple[str, int]]:
    out = [("RLIMIT_CPU", lim.cpu_s), ("RLIMIT_AS", lim.memory_bytes), ("RLIMIT_FSIZE", lim.file_bytes),
           ("RLIMIT_NOFILE", lim.open_files), ("RLIMIT_CORE", 0)]
    if plan.cgroup_root is None:  # binds for a non-root user; the cgroup does it otherwise
        out.append(("RLIMIT_NPROC", lim.max_procs))
    return out


def run_program(source: str, limits: Limits = Limits(), plan: Containment | None = None) -> Outcome:
    """Runs `source` as a Python program in the sandbox; "passed" iff it exits 0 in time.
    `plan` defaults to `containment()` (tests pass one to exercise a particular path)."""
    plan = plan or containment()
    with tempfile.TemporaryDirectory(prefix="llama4_jax_sandbox_") as tmp:
        work = Path(tmp)
        program = work / "program.py"
        program.write_text(source)
        if plan.uid is not None:
            os.chown(work, plan.uid, plan.gid)
            os.chown(program, plan.uid, plan.gid)
        cgroup = _Cgroup(plan.cgroup_root, limits.max_procs) if plan.cgroup_root else None
        try:
            return _supervise(work, program, limits, plan, cgroup)
        finally:
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
            elif plan.uid is not None:
                _kill_user(plan.uid, plan.gid)


def _supervise(work: Path, program: Path, limits: Limits, plan: Containment, cgroup: _Cgroup | None) -> Outcome:
    conf = {"cgroup": str(cgroup.path) if cgroup else None, "rlimits": _rlimits(limits, plan),
            "uid": plan.uid, "gid": plan.gid, "python": plan.python, "program": str(program)}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    if cgroup is not None:
        count = cgroup.pids
    elif plan.uid is not None:
        count = lambda: _uid_pids(plan.uid)
    else:
        count = lambda: [proc.pid]
    with open(work / "output.txt", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(conf)], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, killed as one
        peak, deadline, status = 1, time.monotonic() + limits.timeout_s, None
        while proc.poll() is None:
            peak = max(peak, len(count()))
            if time.monotonic() > deadline:
                status = "timeout"
                break
            time.sleep(_POLL_S)
        if status == "timeout":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    if cgroup is not None and (cgroup.path / "pids.peak").exists():
        peak = max(peak, int((cgroup.path / "pids.peak").read_text()))
    text = (work / "output.txt").read_bytes()[-4000:].decode("utf-8", errors="replace")
    if status is None:
        status = "passed" if proc.returncode == 0 else "failed"
    return Outcome(status, proc.returncode, text, peak)


def check_completion(prompt: str, completion: str, test: str, entry_point: str, limits: Limits = Limits(),
                     plan: Containment | None = None) -> Outcome:
    """HumanEval's protocol: the prompt, the completion, the test code defining `check`, then
    `check(entry_point)`; it passes iff that program exits 0 within the limits."""
    source = f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
    return run_program(source, limits, plan)
