"""One run per output: the lease a run holds on its output while it writes there.

    Lease.take(out, owner)        create OUTPUT/lease.json, or take over an expired one
    lease.beat()                  renew the heartbeat (a thread does it every heartbeat_s)
    lease.check()                 raise LeaseLost once another run took the output over
    lease.release()               delete the lease, if it is still ours
    read_lease(out)               what the lease file says (status: is the driver alive?)

A lease records its owner (host, pid, run id, the Ray job submission id when it runs as
one), when it started, its last heartbeat and its expiry. A run creates it before any
work and only where none exists: a conditional create (local disk: a hard link of a
complete file, which fails when the name exists; S3: a PUT with If-None-Match: *).

A run that finds a lease watches it (`_wait_out`): as soon as its content changes (a
heartbeat: a live holder, seen within one heartbeat) the run refuses (LeaseHeld, a
SetupError: exit code 2). A lease that does not change is taken over once it has
expired, with no manual step: after the rest of its expiry_s as its heartbeat time
says, and never before two of its heartbeats went by unchanged on this run's own clock
(a holder whose clock runs behind is not taken for dead). A holder known gone (its pid
gone on this host, or the same Ray job submission run again: Ray reruns a submission
only once its driver ended) is taken over after those two heartbeats alone.
`takeover=True` (`maskface run --takeover`) takes it at once.

A takeover replaces exactly the lease it read: on S3 a PUT with If-Match on its ETag,
on local disk under a POSIX lock on a lock file beside it (`.lease.lock`); of two runs
taking over at once, one wins and the other then sees a live lease. A holder whose
lease was taken over (or whose heartbeat could not be written for expiry_s) learns it
at its next heartbeat; the driver checks (`check`) before it writes job.json and as each
batch comes back, and stops the job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from pipeline.errors import MAX_ECHO, SetupError, clip
from pipeline.store.storage import STORAGE_ERRORS, replaced_atomically
from pipeline.store.uris import redact

from .layout import Output

log = logging.getLogger(__name__)

FILE = "lease.json"
LOCK = ".lease.lock"     # local disk: the file a replace or a delete of the lease locks
HEARTBEAT_S = 5.0        # how often a holder renews its heartbeat
EXPIRY_S = 60.0          # a lease whose heartbeat is this old is taken over
MAX_EXPIRY_S = 86_400.0  # a lease file saying more is no lease (a run would wait forever)
POLL_S = 0.5             # how often a waiting run reads the lease again
# Threads of one process share its POSIX locks: this makes them take turns as well.
_PROCESS_LOCK = threading.Lock()


class LeaseHeld(SetupError):
    """Another run holds the output (its heartbeat moves): this run refuses."""


class LeaseLost(SetupError):
    """This run's lease was taken over (or could not be renewed before it expired)."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: the run (a fresh id), its host and pid, and the Ray job
    submission it runs as (None outside one)."""
    run_id: str
    host: str
    pid: int
    submission: str | None = None
    command: str = ""

    @classmethod
    def this_process(cls, command: str = "") -> "Owner":
        return cls(run_id=uuid.uuid4().hex[:16], host=socket.gethostname(), pid=os.getpid(),
                   submission=ray_submission_id(), command=redact(command)[:300])

    def describe(self) -> str:
        where = f"run {self.run_id} on {self.host} (pid {self.pid})"
        return f"{where}, Ray job {self.submission}" if self.submission else where


def ray_submission_id() -> str | None:
    """The Ray job submission this process is the driver of (`ray job submit`, a RayJob),
    from the job config Ray hands its driver; None outside one."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return (config.get("metadata") or {}).get("job_submission_id") or None
    except (ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class LeaseRecord:
    """The lease file's content, and `version`: what a conditional replace names (the
    ETag on S3, the content on local disk)."""
    owner: Owner
    started_at: float
    heartbeat_at: float
    heartbeat_s: float
    expiry_s: float
    rows_done: int = 0
    version: str = ""

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return max((time.time() if now is None else now) - self.heartbeat_at, 0.0)

    def expired(self, now: float | None = None) -> bool:
        return self.age(now) >= self.expiry_s

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("version")
        return body

    @classmethod
    def from_json(cls, body: dict, version: str) -> "LeaseRecord":
        """The record a lease file holds; ValueError, TypeError or KeyError when it is not
        one (wrong types, times out of range), whatever wrote it."""
        who = body["owner"]
        submission = who.get("submission")
        owner = Owner(run_id=_text(who["run_id"]), host=_text(who["host"]),
                      pid=int(who["pid"]), submission=_text(submission) if submission else None,
                      command=_text(who.get("command") or ""))
        times = {k: float(body[k]) for k in ("started_at", "heartbeat_at", "heartbeat_s",
                                             "expiry_s")}
        if not (all(v == v and abs(v) < 1e12 for v in times.values())
                and 0 < times["heartbeat_s"] <= times["expiry_s"] <= MAX_EXPIRY_S):
            raise ValueError(f"times out of range: {times}")
        return cls(owner=owner, version=version, rows_done=int(body.get("rows_done") or 0),
                   **times)

    def describe(self, now: float | None = None) -> str:
        return f"{self.owner.describe()}, last heartbeat {self.age(now):.0f} s ago"


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a string was expected, got {type(value).__name__}")
    return clip(value, 200)


def read_lease(out: Output) -> LeaseRecord | None:
    """The output's lease as its file says now (None when there is none). A file there
    that is not a lease (cut short, another tool's) reads as an expired lease of nobody:
    a run replaces exactly it."""
    path = out.path_of(FILE)
    try:
        out.fs.invalidate_cache(path)
        # the ETag before the bytes: if the file changes in between, a replace naming
        # this (older) ETag fails, as it must
        etag = "" if out.local else str(out.fs.info(path).get("ETag") or "")
        with out.fs.open(path, "rb") as f:
            data = f.read(64 * 1024)
    except FileNotFoundError:
        return None
    try:
        return LeaseRecord.from_json(json.loads(data), etag or data.decode("utf-8", "replace"))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        log.warning("%s/%s is not a lease (%s): treated as an expired one",
                    redact(out.uri, MAX_ECHO), FILE, clip(str(e)))
        return LeaseRecord(Owner("unknown", "unknown", 0), 0.0, 0.0, POLL_S, EXPIRY_S,
                           version=etag or data.decode("utf-8", "replace"))


class Lease:
    """This run's hold on an output. `take` makes one; a daemon thread renews it every
    heartbeat_s until `release`."""

    def __init__(self, out: Output, record: LeaseRecord):
        self.out, self.record = out, record
        self.lost: str | None = None
        self.made_folder = False               # the run made the output folder (local disk)
        self.rows_done = record.rows_done      # set by the driver, written at each heartbeat
        self._last_written = record.heartbeat_at
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- taking -------------------------------------------------------------------------------
    @classmethod
    def take(cls, out: Output, owner: Owner, *, takeover: bool = False,
             heartbeat_s: float = HEARTBEAT_S, expiry_s: float = EXPIRY_S) -> "Lease":
        """The output's lease for `owner`, or LeaseHeld naming the run that holds it. Waits
        while a holder whose heartbeat stopped has not expired (at most its expiry_s)."""
        if expiry_s < 2 * heartbeat_s:
            raise ValueError(f"a lease's expiry ({expiry_s:g} s) must be at least two "
                             f"heartbeats ({heartbeat_s:g} s each)")
        for _ in range(100):                 # each pass ends in a create or a replace try
            now = time.time()
            mine = LeaseRecord(owner, now, now, heartbeat_s, expiry_s)
            existed = out.fs.exists(out.root)
            created = _create(out, mine)
            if created is not None:
                log.info("holding %s/%s as %s", redact(out.uri), FILE, owner.describe())
                lease = cls(out, created)
                lease.made_folder = not existed
                return lease.start()
            held = read_lease(out)
            if held is None:
                continue                     # released meanwhile: create it again
            reason = "--takeover"
            if not takeover:
                waited = _wait_out(out, held, owner)     # LeaseHeld when its heartbeat moves
                if waited is None:
                    continue                 # released meanwhile
                held, reason = waited
            taken = _replace(out, held, mine)
            if taken is not None:
                log.log(logging.WARNING if takeover else logging.INFO,
                        "took over %s/%s from %s: %s", redact(out.uri), FILE,
                        held.owner.describe(), reason)
                return cls(out, taken).start()
        raise LeaseHeld(f"{redact(out.uri)}: the lease changed hands 100 times while this run "
                        "tried to take it; try again")

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat_forever, name="output-lease",
                                        daemon=True)
        self._thread.start()
        return self

    # -- holding ------------------------------------------------------------------------------
    def _beat_forever(self) -> None:
        while not self._stop.wait(self.record.heartbeat_s):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 -- a heartbeat that stops must say so
                self.lost = f"its heartbeat failed ({type(e).__name__}: {clip(str(e))})"
                log.error("this run lost its lease on %s: %s", redact(self.out.uri), self.lost)
                return

    def beat(self) -> None:
        """Renew the heartbeat, with `rows_done` (the rows this run finished, for
        status). Once the lease is found taken over, or unwritable for longer than it
        lives, `lost` says why."""
        with self._lock:
            if self.lost or self._stop.is_set():
                return
            new = LeaseRecord(self.record.owner, self.record.started_at, time.time(),
                              self.record.heartbeat_s, self.record.expiry_s, self.rows_done)
            try:
                renewed = _replace(self.out, self.record, new)
                if renewed is None:                   # changed: by whom?
                    renewed = read_lease(self.out)
                    if renewed is None or renewed.owner.run_id != self.record.owner.run_id:
                        self.lost = (f"{renewed.owner.describe()} took over the output"
                                     if renewed else "the lease file was deleted")
                # else our own write, answered late (a PUT retried after its answer was lost)
                if renewed is not None and not self.lost:
                    self.record, self._last_written = renewed, time.time()
                    return
            except STORAGE_ERRORS as e:
                if time.time() - self._last_written < self.record.expiry_s:
                    log.warning("could not renew the lease on %s (%s); trying again",
                                redact(self.out.uri), redact(str(e), MAX_ECHO))
                    return
                self.lost = f"its heartbeat could not be written for {self.record.expiry_s:g} s"
            log.error("this run lost its lease on %s: %s", redact(self.out.uri), self.lost)

    def check(self) -> None:
        """Raise LeaseLost once the lease is no longer this run's."""
        if self.lost:
            raise LeaseLost(f"this run no longer holds {redact(self.out.uri)}: {self.lost}. "
                            "It stops, so two runs never write one output")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, if it is still this run's. Never
        raises: a lease left behind expires, and the run's own outcome (its exit code,
        its first cause) must not be replaced by this cleanup's failure."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.record.heartbeat_s + 30)
        if not self._lock.acquire(timeout=30):       # a heartbeat stuck in a storage call
            log.warning("the lease on %s was not released (its heartbeat is stuck): the "
                        "next run takes it over once it expires", redact(self.out.uri))
            return
        try:
            if not self.lost:
                self._delete()
        except Exception as e:  # noqa: BLE001 -- see the docstring
            log.warning("could not delete the lease on %s (%s: %s): the next run takes it "
                        "over once it expires", redact(self.out.uri), type(e).__name__,
                        redact(str(e), MAX_ECHO))
        finally:
            self._lock.release()

    def _delete(self) -> None:
        with _local_lock(self.out):
            held = read_lease(self.out)
            if held is None or held.owner.run_id != self.record.owner.run_id:
                return
            self.out.fs.rm_file(self.out.path_of(FILE))
            if self.made_folder and self.out.local and os.listdir(self.out.root) == [LOCK]:
                os.unlink(self.out.path_of(LOCK))    # a run that wrote nothing leaves nothing
                os.rmdir(self.out.root)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _known_gone(held: LeaseRecord, owner: Owner) -> str | None:
    """Why `held`'s run is known to have ended (it still gets two heartbeats to prove
    otherwise), or None."""
    if owner.submission and held.owner.submission == owner.submission:
        return f"the same Ray job submission ({owner.submission}) run again"
    if held.owner.host == owner.host and held.owner.pid and not _alive(held.owner.pid):
        return f"its process {held.owner.pid} on this host is gone"
    return None


def _wait_out(out: Output, held: LeaseRecord, owner: Owner
              ) -> tuple[LeaseRecord, str] | None:
    """Watch a lease: LeaseHeld as soon as it changes (a live holder); the lease and why
    it may be taken over once it has stayed unchanged long enough (see the module doc);
    None when it was released meanwhile."""
    beats = min(max(2 * held.heartbeat_s, 1.0), 30.0)    # two of the holder's heartbeats
    gone = _known_gone(held, owner)
    wait_s = beats if gone else max(beats, held.expiry_s - min(held.age(), held.expiry_s))
    deadline = time.monotonic() + wait_s
    logged = False
    while True:
        time.sleep(POLL_S)
        now = read_lease(out)
        if now is None:
            return None
        if now.version != held.version:
            raise LeaseHeld(f"the output {redact(out.uri, MAX_ECHO)} is held by "
                            f"{now.describe()}; one run per output: wait for it to end "
                            "(maskface status shows it), or run with --takeover if that run "
                            "is gone")
        left = deadline - time.monotonic()
        if left <= 0:
            return now, gone or f"its heartbeat stopped {now.age():.0f} s ago (expired)"
        if not logged and wait_s - left > beats:
            log.info("the lease on %s is held by %s; its heartbeat stopped: waiting %.0f s "
                     "for it to expire", redact(out.uri), now.describe(), left)
            logged = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                          # someone else's process
    return True


@contextlib.contextmanager
def _local_lock(out: Output) -> Iterator[None]:
    """Local disk: an exclusive POSIX lock (which NFS honours, unlike flock) on the lock
    file beside the lease while the lease is replaced or deleted; an object store's
    conditional writes need none."""
    if not out.local:
        yield
        return
    os.makedirs(out.root, exist_ok=True)
    with _PROCESS_LOCK:
        fd = os.open(out.path_of(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                     # closing the descriptor releases the lock


def _precondition_failed(error: OSError) -> bool:
    """A conditional S3 write refused: the object is not the one the write named."""
    cause = error.__cause__ or error.__context__
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return (code in ("PreconditionFailed", "ConditionalRequestConflict")
            or "pre-condition" in str(error) or "PreconditionFailed" in str(error))


def _body(record: LeaseRecord) -> bytes:
    return json.dumps(record.as_json(), indent=1).encode()


def _create(out: Output, record: LeaseRecord) -> LeaseRecord | None:
    """Create the lease file only where none exists: `record` with its version, or None
    when one exists."""
    data, path = _body(record), out.path_of(FILE)
    try:
        if not out.local:
            put = out.fs.pipe_file(path, data, mode="create")      # If-None-Match: *
            return _versioned(record, data, put)
        os.makedirs(out.root, exist_ok=True)
        tmp = out.path_of(f".{FILE}.new-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.link(tmp, path)               # fails when the name exists: complete or absent
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return _versioned(record, data, None)
    except FileExistsError:
        return None
    except OSError as e:
        if not out.local and _precondition_failed(e):   # a create raced by another
            return None
        raise


def _replace(out: Output, old: LeaseRecord, new: LeaseRecord) -> LeaseRecord | None:
    """Replace the lease file with `new` only if it still is `old`: `new` with its
    version, or None when the file changed (or is gone)."""
    data, path = _body(new), out.path_of(FILE)
    if not out.local:
        try:
            return _versioned(new, data, out.fs.pipe_file(path, data, IfMatch=old.version))
        except FileNotFoundError:
            return None
        except OSError as e:
            if _precondition_failed(e):
                return None
            raise
    with _local_lock(out):
        held = read_lease(out)
        if held is None or held.version != old.version:
            return None
        with replaced_atomically(path) as tmp:
            tmp.write_bytes(data)
        return _versioned(new, data, None)


def _versioned(record: LeaseRecord, data: bytes, put: Any) -> LeaseRecord:
    """`record` with the version a later conditional replace names: the ETag the store
    answered the PUT with, or on local disk the content itself."""
    etag = (put or {}).get("ETag") if isinstance(put, dict) else None
    return dataclasses.replace(record, version=str(etag) if etag else data.decode())
