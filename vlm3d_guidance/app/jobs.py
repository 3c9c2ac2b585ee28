"""Jobs of the web app: input checks, one private folder per job, the device slots, cleanup.

Nothing here imports gradio or torch, so every rule is testable alone.

- :func:`check_upload` bounds an uploaded file in bytes and pixels (read from the header, before the
  image is decoded) and then runs the CLI's own image check (:func:`vlm3d_guidance.cli.check_image`).
- :func:`job_settings` applies the page's knobs to the server's settings and runs the CLI's own
  option checks (:func:`vlm3d_guidance.cli.check_settings`).
- :class:`JobManager` gives each job a folder named by 32 random bytes (not guessable), limits how
  many jobs use the models at once, cancels jobs, and removes a session's folders and uploads when
  its page disconnects (after a grace period; and any finished folder older than ``keep_seconds``).

A problem with the input raises :class:`InputProblem`: its text is shown on the page and no job is
started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

#: The knobs the page offers (keys of the CLI's settings).
KNOBS = ("lam", "schedule", "steps", "views", "seed", "compare")
_INTEGER_KNOBS = ("steps", "views", "seed")


class InputProblem(Exception):
    """A problem with what the user gave: shown on the page as one message; no job is started."""


class JobCancelled(Exception):
    """Raised inside a running job when its user pressed Cancel or closed the page."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one upload. ``max_bytes`` is also given to gradio, which refuses larger uploads
    at its upload route; ``max_pixels`` (width x height) is checked from the image header."""

    max_bytes: int = 10 * 2 ** 20
    max_pixels: int = 4096 * 4096

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB"


def check_upload(path, limits: Limits, name: str | None = None) -> Path:
    """The uploaded file at ``path`` as a checked image path, or :class:`InputProblem`.

    Order: present, not empty, at most ``limits.max_bytes``, at most ``limits.max_pixels`` (from
    the header: a huge image is refused without decoding it), then the CLI's decode check.
    """
    from PIL import Image

    from .. import cli

    if path is None or str(path) == "":
        raise InputProblem("no image: upload a picture of one object (a PNG with a transparent background is "
                           "best) or pick one of the examples")
    p = Path(path)
    shown = name or p.name
    if not p.is_file():
        raise InputProblem(f"the upload {shown} is gone (the page was idle too long); upload it again")
    size = p.stat().st_size
    if size == 0:
        raise InputProblem(f"the uploaded file {shown} is empty (0 bytes); upload a PNG, JPEG or WebP picture")
    if size > limits.max_bytes:
        raise InputProblem(f"the uploaded file {shown} is {_mb(size)}, more than this server's limit of "
                           f"{_mb(limits.max_bytes)}; upload a smaller picture (1024 px a side is plenty)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:  # reads the header only
                width, height = img.size
    except Image.DecompressionBombError:
        width = height = None
    except Exception:  # not an image: the CLI's check below names the problem
        width = height = 0
    if width is None or width * height > limits.max_pixels:
        dims = "far too many" if width is None else f"{width}x{height} = {width * height / 1e6:.1f} M"
        raise InputProblem(f"the image {shown} has {dims} pixels, more than this server's limit of "
                           f"{limits.max_pixels / 1e6:.1f} M; downscale it (1024 px a side is plenty)")
    try:
        return cli.check_image(p)
    except cli.UsageError as exc:
        raise InputProblem(str(exc).replace(str(p), shown)) from None


def _page_message(message: str) -> str:
    """A CLI message without its pointer to ``--help`` (there is no terminal on the page)."""
    for tail in (f"; see '{_prog()} --help'",):
        message = message.replace(tail, "")
    return message


def _prog() -> str:
    from .. import cli

    return cli.PROG


def _integral(value):
    """8.0 -> 8 (sliders send floats); anything else unchanged, so the CLI check names it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def job_settings(base: dict, knobs: dict) -> dict:
    """``base`` (the server's resolved settings) with the page's ``knobs``, checked by the CLI's
    :func:`~vlm3d_guidance.cli.check_settings` (an :class:`InputProblem` naming the knob)."""
    from .. import cli

    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise InputProblem(f"unknown knobs {unknown}; the page has {list(KNOBS)}")
    s = dict(base)
    for key, value in knobs.items():
        s[key] = _integral(value) if key in _INTEGER_KNOBS else value
    if not isinstance(s["compare"], bool):
        raise InputProblem(f"compare must be true or false (got {s['compare']!r})")
    try:
        cli.check_settings(s)
    except cli.UsageError as exc:
        raise InputProblem(_page_message(str(exc))) from None
    return s


@dataclass
class Job:
    """One generation request: its private folder and its cancel flag."""

    id: str
    session: str
    folder: Path
    created: float
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    discard: bool = False  # remove the folder as soon as the job ends (page gone, or cancelled)


class JobManager:
    """Job folders under ``root`` (each named by a random token), ``concurrency`` device slots.

    Thread-safe: gradio calls it from its worker threads.
    """

    def __init__(self, root, concurrency: int = 1, keep_seconds: float = 3600.0, grace_seconds: float = 60.0):
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1 (got {concurrency!r})")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.concurrency = concurrency
        self.keep_seconds = float(keep_seconds)
        self.grace_seconds = float(grace_seconds)
        self._timers: set = set()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._uploads: dict[str, set] = {}
        self.started = 0  # jobs ever created (tests: a refused input starts none)

    # -- jobs ---------------------------------------------------------------------------------
    def new_job(self, session: str) -> Job:
        self.sweep()
        token = secrets.token_urlsafe(32)
        folder = self.root / token
        folder.mkdir(mode=0o700)
        job = Job(id=token, session=str(session), folder=folder, created=time.time())
        with self._lock:
            self._jobs[token] = job
            self.started += 1
        return job

    def jobs(self, session: str | None = None) -> list:
        with self._lock:
            return [j for j in self._jobs.values() if session is None or j.session == session]

    @contextlib.contextmanager
    def slot(self, job: Job, poll: float = 0.2):
        """Hold one device slot while the job runs; waiting ends early (JobCancelled) on cancel."""
        while not self._slots.acquire(timeout=poll):
            if job.cancel.is_set():
                raise JobCancelled()
        try:
            yield
        finally:
            self._slots.release()

    def finish(self, job: Job) -> None:
        """The job's thread is done: remove its folder now if nobody will look at it. A cancelled or
        discarded job's folder is removed BEFORE the job reads as finished (whoever waits for
        ``finished`` finds it gone), and again after, for a flag set in between."""
        if job.discard or job.cancel.is_set():
            shutil.rmtree(job.folder, ignore_errors=True)
        with self._lock:
            job.finished = True
            drop = job.discard or job.cancel.is_set()
            if drop:
                self._jobs.pop(job.id, None)
        if drop:
            shutil.rmtree(job.folder, ignore_errors=True)

    def cancel_session(self, session: str) -> int:
        """Set the cancel flag of the session's running jobs; returns how many were running."""
        count = 0
        for job in self.jobs(session):
            if not job.finished:
                job.cancel.set()
                count += 1
        return count

    # -- uploads ------------------------------------------------------------------------------
    def track_upload(self, session: str, path) -> None:
        """Remember a file gradio stored for this session's upload (removed on disconnect)."""
        with self._lock:
            self._uploads.setdefault(str(session), set()).add(str(path))

    # -- cleanup ------------------------------------------------------------------------------
    def session_closed(self, session: str) -> None:
        """gradio saw the page's keep-alive stream end: clean up after ``grace_seconds``.

        The grace period exists because a live page whose stream merely dropped (a busy machine, a
        network hiccup; gradio_client gives up after 20 s without a byte) looks the same as a closed
        one. A session that starts a job within the grace period is alive and is left alone; one
        whose job is still running is checked again when the grace period has passed once more.
        """
        closed_at = time.time()
        if self.grace_seconds <= 0:
            self._expire(str(session), closed_at)
            return
        self._arm(str(session), closed_at)

    def _arm(self, session: str, closed_at: float) -> None:
        timer = threading.Timer(self.grace_seconds, self._expire, args=(session, closed_at))
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _expire(self, session: str, closed_at: float) -> None:
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
        jobs = self.jobs(session)
        if any(j.created > closed_at for j in jobs):
            return  # the page came back (its stream had only dropped)
        if any(not j.finished for j in jobs) and self.grace_seconds > 0:
            self._arm(session, closed_at)  # let a running job end; look again later
            return
        self.cleanup_session(session)

    def cleanup_session(self, session: str) -> None:
        """The page disconnected: cancel its jobs, remove their folders and its uploads."""
        session = str(session)
        self.cancel_session(session)
        with self._lock:
            mine = [j for j in self._jobs.values() if j.session == session]
            uploads = self._uploads.pop(session, set())
            for job in mine:
                job.discard = True
                if job.finished:
                    self._jobs.pop(job.id, None)
        for job in mine:
            if job.finished:
                shutil.rmtree(job.folder, ignore_errors=True)
        for upload in uploads:
            with contextlib.suppress(OSError):
                os.unlink(upload)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(upload))  # gradio's per-upload folder, when now empty

    def sweep(self, now: float | None = None) -> None:
        """Remove finished jobs older than ``keep_seconds`` (pages that never disconnected cleanly)."""
        now = time.time() if now is None else now
        with self._lock:
            old = [j for j in self._jobs.values() if j.finished and now - j.created > self.keep_seconds]
            for job in old:
                self._jobs.pop(job.id, None)
        for job in old:
            shutil.rmtree(job.folder, ignore_errors=True)

    def close(self) -> None:
        """Server shutdown: cancel everything and remove the whole root."""
        with self._lock:
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()
        for job in self.jobs():
            job.cancel.set()
        shutil.rmtree(self.root, ignore_errors=True)
