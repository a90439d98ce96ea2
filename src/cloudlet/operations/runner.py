"""The operation runner: long actions as asyncio tasks with persisted state and live progress.

An operation's row is written when it is submitted, when it starts and ends, and (throttled)
as it progresses, so ``GET /v1/operations/{id}`` answers from the catalog even for operations of
an earlier server process. Live subscribers (the SSE endpoint) get every event from memory.

A server killed mid-operation leaves rows in ``pending``/``running``: :meth:`recover` turns them
into ``failed`` ("interrupted by server restart") at the next start and removes the temporary
files they had registered, so no half-written blob survives looking valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import OperationRow
from cloudlet.errors import CloudletError, ConflictError, NotFoundError

log = logging.getLogger("cloudlet.operations")

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "pending",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
FINAL = (SUCCEEDED, FAILED, CANCELLED)
_PROGRESS_WRITE_INTERVAL = 0.5  # seconds between persisted progress updates


def op_dict(r: OperationRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "kind": r.kind,
        "state": r.state,
        "target": r.target,
        "progress": round(r.progress, 4),
        "message": r.message,
        "result": r.result,
        "error": r.error,
        "created": r.created,
        "updated": r.updated,
        "finished": r.finished,
    }


class OperationContext:
    """Handed to an operation's body: report progress, register temp files to clean up."""

    def __init__(self, runner: OperationRunner, op_id: str) -> None:
        self.runner = runner
        self.id = op_id
        self._last_write = 0.0
        self._loop = asyncio.get_running_loop()

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress; callable from the event loop or from a worker thread."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not self._loop:  # from a thread (e.g. the overlay decoder)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._progress, fraction, message)
        else:
            self._progress(fraction, message)

    def _progress(self, fraction: float, message: str) -> None:
        fraction = max(0.0, min(1.0, fraction))
        t = time.monotonic()
        persist = t - self._last_write >= _PROGRESS_WRITE_INTERVAL
        if persist:
            self._last_write = t
        self.runner._update(self.id, persist, progress=fraction, message=message)

    def step_progress(self, lo: float, hi: float) -> Callable[[str, int, int], None]:
        """A ``progress(stage, done, total)`` callback (as the synthesis code takes) mapped
        onto ``[lo, hi]`` of this operation."""

        def cb(stage: str, done: int, total: int) -> None:
            frac = done / total if total else 0.0
            self.progress(lo + (hi - lo) * frac, stage)

        return cb

    def add_temp(self, path: Path) -> None:
        """Remove ``path`` if this operation is interrupted (also across a server kill)."""
        self.runner._add_temp(self.id, path)


Body = Callable[[OperationContext], Awaitable[dict[str, Any] | None]]


class OperationRunner:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._subscribers: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self.on_finish: list[Callable[[dict[str, Any]], None]] = []

    # -- lifecycle -----------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Fail the operations an earlier process left unfinished; remove their temp files."""
        failed = []
        with self.catalog.session() as s:
            rows = s.scalars(select(OperationRow).where(OperationRow.state.in_([PENDING, RUNNING])))
            for r in rows:
                for p in r.temp_paths or []:
                    _remove(Path(p))
                r.state = FAILED
                r.error = {
                    "error": "Interrupted",
                    "message": "interrupted by server restart",
                    "hint": "run it again",
                }
                r.finished = r.updated = now()
                failed.append(r.id)
        return failed

    def settle(self, op_id: str, result: dict[str, Any]) -> None:
        """Mark an operation that :meth:`recover` failed as succeeded after all: its effect was
        complete (e.g. the instance it started is running) when the server died."""
        with self.catalog.session() as s:
            r = s.get(OperationRow, op_id)
            if r is not None and r.state == FAILED:
                r.state, r.error, r.result, r.progress = SUCCEEDED, None, result, 1.0
                r.updated = now()

    async def close(self) -> None:
        """Cancel what still runs (server shutdown) and wait for the cleanups."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- submit / run --------------------------------------------------------------------
    def submit(self, kind: str, body: Body, *, target: str | None = None) -> str:
        """Start ``body`` as a task; returns the operation id at once."""
        op_id = secrets.token_hex(8)
        t = now()
        with self.catalog.session() as s:
            s.add(
                OperationRow(
                    id=op_id,
                    kind=kind,
                    state=PENDING,
                    target=target,
                    progress=0.0,
                    message="",
                    temp_paths=[],
                    created=t,
                    updated=t,
                )
            )
        self._done[op_id] = asyncio.Event()
        self._tasks[op_id] = asyncio.create_task(self._run(op_id, body), name=f"op-{op_id}")
        return op_id

    async def _run(self, op_id: str, body: Body) -> None:
        ctx = OperationContext(self, op_id)
        self._update(op_id, True, state=RUNNING)
        try:
            result = await body(ctx)
        except asyncio.CancelledError:
            self._finish(op_id, CANCELLED, error={"error": "Cancelled", "message": "cancelled"})
            raise
        except CloudletError as e:
            self._finish(op_id, FAILED, error=e.to_dict())
        except Exception as e:  # a bug: keep the server alive, record it, log the traceback
            log.exception("operation %s failed", op_id)
            self._finish(
                op_id, FAILED, error={"error": type(e).__name__, "message": str(e), "hint": None}
            )
        else:
            self._finish(op_id, SUCCEEDED, result=result or {})
        finally:
            self._tasks.pop(op_id, None)

    def _finish(self, op_id: str, state: str, **fields: Any) -> None:
        # Temp files belong to the operation: on success they were renamed into place (or
        # removed); on failure or cancellation nothing of them may survive.
        with self.catalog.session() as s:
            r = s.get(OperationRow, op_id)
            if r is not None and state != SUCCEEDED:
                for p in r.temp_paths or []:
                    _remove(Path(p))
        progress = {"progress": 1.0} if state == SUCCEEDED else {}
        d = self._update(
            op_id, True, state=state, finished=now(), temp_paths=[], **progress, **fields
        )
        ev = self._done.pop(op_id, None)
        if ev is not None:
            ev.set()
        for cb in self.on_finish:
            with contextlib.suppress(Exception):
                cb(d)

    def _update(self, op_id: str, persist: bool, **fields: Any) -> dict[str, Any]:
        if not persist and not self._subscribers.get(op_id):
            return {}  # nobody listens and it is not time to write: nothing to do
        with self.catalog.session() as s:
            r = s.get(OperationRow, op_id)
            if r is None:
                return {}
            if persist:
                for k, v in fields.items():
                    setattr(r, k, v)
                r.updated = now()
                d = op_dict(r)
            else:
                d = op_dict(r) | {k: v for k, v in fields.items() if k in ("progress", "message")}
                s.expunge(r)
        for q in self._subscribers.get(op_id, []):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(d)
        return d

    def _add_temp(self, op_id: str, path: Path) -> None:
        with self.catalog.session() as s:
            r = s.get(OperationRow, op_id)
            if r is not None:
                r.temp_paths = [*(r.temp_paths or []), str(path)]

    # -- queries -------------------------------------------------------------------------
    def get(self, op_id: str) -> dict[str, Any]:
        with self.catalog.session() as s:
            r = s.get(OperationRow, op_id)
            if r is None:
                raise NotFoundError(f"no operation {op_id!r}")
            return op_dict(r)

    def list(self, *, limit: int = 100, state: str | None = None) -> list[dict[str, Any]]:
        with self.catalog.session() as s:
            q = select(OperationRow).order_by(OperationRow.created.desc()).limit(limit)
            if state:
                q = q.where(OperationRow.state == state)
            return [op_dict(r) for r in s.scalars(q)]

    def cancel(self, op_id: str) -> dict[str, Any]:
        d = self.get(op_id)
        task = self._tasks.get(op_id)
        if d["state"] in FINAL or task is None:
            raise ConflictError(f"operation {op_id} is {d['state']}; it cannot be cancelled")
        task.cancel()
        return d

    async def wait(self, op_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The operation once it has ended (from memory if it runs here, else polling)."""
        ev = self._done.get(op_id)
        if ev is not None:
            await asyncio.wait_for(ev.wait(), timeout)
            return self.get(op_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            d = self.get(op_id)
            if d["state"] in FINAL:
                return d
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"operation {op_id} did not end within {timeout} s")
            await asyncio.sleep(0.1)

    async def events(self, op_id: str) -> AsyncIterator[dict[str, Any]]:
        """The current state, then every change, until the operation has ended."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(1000)
        self._subscribers.setdefault(op_id, []).append(q)
        try:
            d = self.get(op_id)
            yield d
            while d.get("state") not in FINAL:
                if op_id not in self._tasks and op_id not in self._done:
                    d = self.get(op_id)  # ended meanwhile, or runs in no task here
                    yield d
                    if d["state"] not in FINAL:
                        await asyncio.sleep(0.2)
                    continue
                try:
                    d = await asyncio.wait_for(q.get(), 15)
                except TimeoutError:
                    d = self.get(op_id)
                yield d
        finally:
            subs = self._subscribers.get(op_id, [])
            with contextlib.suppress(ValueError):
                subs.remove(q)
            if not subs:
                self._subscribers.pop(op_id, None)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
