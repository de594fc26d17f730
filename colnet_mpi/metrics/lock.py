"""One run per results file: an exclusive, stale-aware lock file ``<output>.lock``.

The writer rank takes the lock before it decides whether to create, overwrite or resume the
results file, and drops it when the run ends (finished, failed, preempted, refused). The lock is
a small JSON file created atomically (``O_CREAT | O_EXCL``) that names its holder: SLURM job id
and restart count, host, pid, start time. A lock left behind by a killed run is *stale* and taken
over (with a log line) when

- its host is this host and its pid is not alive, or
- it names this SLURM job with another restart count (an earlier incarnation of a requeued job),
- it is unreadable and older than a few seconds (a holder killed while writing it),
- it is from another host and names a SLURM job that ``squeue`` no longer lists.

Any other lock is live, in particular one from another host outside SLURM: the run is refused with a message
naming the holder and how to remove the lock once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

__all__ = [
    "Holder",
    "LockHeld",
    "OutputLock",
    "abandon_for_job",
    "acquire",
    "lock_path",
    "read_holder",
]

#: An unreadable lock file older than this (seconds) is a holder killed while writing it.
UNREADABLE_GRACE_S = 5.0


class LockHeld(Exception):
    """Another run holds the output; the text names it and how to remove a dead one's lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock."""

    job_id: str
    restart: str
    host: str
    pid: int
    started: str

    @staticmethod
    def me() -> Holder:
        """This process, now."""
        return Holder(
            job_id=os.environ.get("SLURM_JOB_ID", ""),
            restart=os.environ.get("SLURM_RESTART_COUNT", ""),
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def describe(self) -> str:
        """``job 42, host n1, pid 7, since <time>``."""
        job = f"job {self.job_id}" if self.job_id else "no SLURM job"
        return f"{job}, host {self.host}, pid {self.pid}, since {self.started}"


def lock_path(output: str | Path) -> Path:
    """The lock file of a results file: ``<output>.lock`` next to it."""
    p = Path(output)
    return p.with_name(p.name + ".lock")


def read_holder(path: str | Path) -> Holder | None:
    """The holder recorded in a lock file; None if it is missing or unreadable."""
    try:
        raw = json.loads(Path(path).read_text())
        return Holder(
            job_id=str(raw.get("job_id", "")),
            restart=str(raw.get("restart", "")),
            host=str(raw["host"]),
            pid=int(raw["pid"]),
            started=str(raw.get("started", "")),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def slurm_job_listed(job_id: str) -> bool | None:
    """Whether SLURM still lists the job (pending, running, completing), asked with ``squeue``
    (``$COLNET_SQUEUE`` replaces the command); None when SLURM cannot be asked."""
    exe = os.environ.get("COLNET_SQUEUE", "squeue")
    try:
        out = subprocess.run(
            [exe, "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # squeue refuses the id of a job that has left the queue
        return False if "invalid job id" in out.stderr.lower() else None
    return bool(out.stdout.strip())


def stale_reason(holder: Holder, me: Holder) -> str:
    """Why ``holder``'s lock is stale as seen by ``me``, or ``""`` when it is live."""
    if holder.job_id and holder.job_id == me.job_id and holder.restart != me.restart:
        return f"an earlier start of this job (restart {holder.restart or 0})"
    if holder.host == me.host and not pid_alive(holder.pid):
        return f"pid {holder.pid} is no longer running on {holder.host}"
    if holder.host != me.host and holder.job_id and slurm_job_listed(holder.job_id) is False:
        return f"SLURM job {holder.job_id} has ended (squeue no longer lists it)"
    return ""


class OutputLock:
    """A lock this process holds; :meth:`release` removes it (only if it is still ours)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self._text = text
        self.held = True

    def release(self) -> None:
        """Remove the lock file if it is still the one this process wrote; idempotent."""
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text() == self._text:
                self.path.unlink()
        except OSError:
            pass

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _create(path: Path, text: str) -> bool:
    """Create the lock file with ``text`` atomically; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(path: Path, seen: str) -> bool:
    """Remove the stale lock whose text was ``seen``; False if it changed meanwhile (someone
    else took it over first, and then holds a live lock)."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # already gone
    try:
        if aside.read_text() == seen:
            return True
        try:  # not the stale lock we judged: put it back
            os.link(aside, path)
        except OSError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)


def acquire(
    output: str | Path,
    *,
    log: Callable[[str], None] = lambda _msg: None,
    attempts: int = 5,
) -> OutputLock:
    """Take the lock of ``output`` for this process, or raise :class:`LockHeld`."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = Holder.me()
    text = json.dumps({**asdict(me), "output": str(output)}) + "\n"
    for _ in range(attempts):
        if _create(path, text):
            return OutputLock(path, text)
        try:
            seen = path.read_text()
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue  # released meanwhile: try again
        holder = read_holder(path) if seen.strip() else None
        if holder is None:
            if age < UNREADABLE_GRACE_S:  # its holder may be writing it right now
                time.sleep(0.2)
                continue
            reason = f"its lock is unreadable and {age:.0f}s old"
        else:
            reason = stale_reason(holder, me)
            if not reason:
                where = (
                    "still running on this host"
                    if holder.host == me.host
                    else "on another host, so it cannot be checked from here"
                )
                raise LockHeld(
                    f"{str(output)!r} is in use by another run ({holder.describe()}; {where}); "
                    f"wait for it to end, or, if it is gone, remove {str(path)!r} and try again"
                )
        if _take_over(path, seen):
            who = holder.describe() if holder else "unknown holder"
            log(f"{path}: taking over a stale lock ({who}): {reason}")
    raise LockHeld(f"could not take the lock {str(path)!r}: it keeps changing; try again")


def abandon_for_job(output: str | Path) -> bool:
    """From any rank of a run that is about to abort the whole job: remove the lock of
    ``output`` if it names this SLURM job and start (its writer rank is going down with the job,
    perhaps on another host where no later run could tell that it is gone). Returns True when
    removed; outside SLURM it does nothing (a dead pid on the lock's host is recognised anyway)."""
    me = Holder.me()
    path = lock_path(output)
    holder = read_holder(path)
    if not me.job_id or holder is None:
        return False
    if (holder.job_id, holder.restart) != (me.job_id, me.restart):
        return False
    try:
        path.unlink()
    except OSError:
        return False
    return True
