"""The trio-asyncio loop redis-py runs on, made safe for what the garbage collector does to it.

trio-asyncio's loop may only be touched from trio's thread, and not from inside trio's own bookkeeping
(python-trio/trio-asyncio#44). Finalizers break both rules: asyncio's `StreamWriter.__del__` and redis-py's
`Connection.__del__` close their transport wherever the collector runs, in any thread or re-entrantly in
the middle of trio's or trio-asyncio's own code. Closing removes the socket from trio's epoll, cancels its
scope and queues callbacks right there. With traffic on such sockets that ended the trio run with
TrioInternalError, or hung it, within seconds. redis-py's cluster client leaves unclosed connections
behind while slots move.

So, on loops guarded here:
- a writer closed during a collection or from another thread is closed in trio's thread at a safe
  point, through the trio token (`run_sync_soon` is safe from any thread and from re-entrant code);
- a writer collected unclosed is closed the same way;
- `call_soon` during a collection or from another thread goes through the token too;
- an exception nobody retrieved is logged, as asyncio does, instead of trio-asyncio's default, which
  raises it into the loop's nursery and so ends the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

# Each guarded loop's trio token and thread.
_LOOPS: weakref.WeakKeyDictionary[Any, tuple[trio.lowlevel.TrioToken, int]] = weakref.WeakKeyDictionary()
_STDLIB_CLOSE = asyncio.StreamWriter.close
_STDLIB_DEL = asyncio.StreamWriter.__del__
_collecting = False  # a garbage collection is running (in whichever thread): finalizers may run anywhere


def guard(loop: Any) -> None:
    """Call once, in trio's thread, right after the loop opens."""
    token, home = trio.lowlevel.current_trio_token(), threading.get_ident()
    _LOOPS[loop] = (token, home)
    _defer_call_soon(loop, token, home)
    loop.set_exception_handler(_log_only)
    if asyncio.StreamWriter.close is _STDLIB_CLOSE:  # once per process
        asyncio.StreamWriter.close = _writer_close  # type: ignore[method-assign, assignment]
        asyncio.StreamWriter.__del__ = _writer_del  # type: ignore[method-assign]
        gc.callbacks.append(_note_collection)


def _note_collection(phase: str, _info: dict[str, int]) -> None:
    global _collecting
    _collecting = phase == "start"


def _not_here(home: int) -> bool:
    """Whether the loop must not be touched from where we are now."""
    return _collecting or threading.get_ident() != home


def _writer_close(writer: asyncio.StreamWriter) -> None:
    found = _LOOPS.get(writer._loop)  # type: ignore[attr-defined]
    if found is None or not _not_here(found[1]):
        _STDLIB_CLOSE(writer)
        return
    _soon(found[0], _close_quietly, writer.transport)


def _writer_del(writer: asyncio.StreamWriter) -> None:
    found = _LOOPS.get(writer._loop)  # type: ignore[attr-defined]
    if found is None:
        _STDLIB_DEL(writer)
    elif not writer.transport.is_closing():
        _soon(found[0], _close_quietly, writer.transport)


def _soon(token: trio.lowlevel.TrioToken, fn: Callable[[Any], None], arg: Any) -> None:
    """`fn(arg)` in trio's thread, at a safe point; nothing if trio is gone (so is what it would do)."""
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn, arg)


def _close_quietly(transport: asyncio.BaseTransport) -> None:
    # An exception in a run_sync_soon callback ends trio's run: a loop closed meanwhile (RuntimeError), or
    # anything else a dropped connection's close raises, is not worth that.
    try:
        transport.close()
    except Exception as exc:
        log.debug("closing a dropped connection failed: %s: %s", type(exc).__name__, exc)


def _defer_call_soon(loop: Any, token: trio.lowlevel.TrioToken, home: int) -> None:
    queue = loop._queue_handle

    def queue_handle(handle: asyncio.Handle) -> asyncio.Handle:
        if not _not_here(home):
            queued: asyncio.Handle = queue(handle)
            return queued
        _soon(token, queue_later, handle)
        return handle

    def queue_later(handle: asyncio.Handle) -> None:
        # A loop closed meanwhile, or its channel: nothing left to run the handle (a dropped
        # connection's close), and an exception here would end trio's run.
        with contextlib.suppress(RuntimeError, trio.ClosedResourceError, trio.BrokenResourceError):
            queue(handle)

    loop._queue_handle = queue_handle


def _log_only(_loop: Any, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    log.warning("asyncio: %s%s", context.get("message", ""), f": {exc!r}" if exc is not None else "")
