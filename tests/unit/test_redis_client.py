"""The asyncio loop redis-py runs on: usable from the threads where garbage is collected.

Each case runs in a child process with a timeout: without the fix the trio loop itself hangs, where no
trio timeout can fire."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CALL_SOON_FROM_A_THREAD = """
import trio, trio_asyncio
from sentiment.redis_client import asyncio_loop

async def main():
    ran, all_ran = [], trio.Event()

    def note(i):
        ran.append(i)
        if len(ran) == 5:
            all_ran.set()

    async with asyncio_loop():
        loop = trio_asyncio.current_loop.get()
        for i in range(5):
            await trio.sleep(0.01)  # the loop's task is waiting for handles
            await trio.to_thread.run_sync(loop.call_soon, note, i)
        await all_ran.wait()
    print("ran", ran)

trio.run(main)
"""

UNCLOSED_CONNECTION_COLLECTED_IN_A_THREAD = """
import asyncio, gc, socket, warnings, trio, trio_asyncio
from sentiment.redis_client import asyncio_loop

warnings.simplefilter("ignore", ResourceWarning)  # "unclosed StreamWriter": rightly said, not the point

async def main():
    listener = socket.create_server(("127.0.0.1", 0))
    async with asyncio_loop():
        async def connect():
            _reader, writer = await asyncio.open_connection(*listener.getsockname())
            cycle = [writer]
            cycle.append(cycle)  # only the collector frees it, wherever it runs: a dropped connection
            return writer.transport

        transport = await trio_asyncio.aio_as_trio(connect)()
        await trio.to_thread.run_sync(gc.collect)  # StreamWriter.__del__ in that thread
        while not transport.is_closing():
            await trio.sleep(0.01)
        await trio_asyncio.aio_as_trio(asyncio.sleep)(0.05)  # the loop still runs callbacks
    print("closed", transport.is_closing())

trio.run(main)
"""


def run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Error" not in done.stderr, done.stderr[-2000:]
    return done.stdout


def test_call_soon_from_another_thread_runs_in_the_loop() -> None:
    # asyncio's StreamWriter.__del__ calls call_soon wherever the collector runs; from a worker thread
    # this corrupted trio's channel (the loop hung, or the run ended with TrioInternalError).
    assert run(CALL_SOON_FROM_A_THREAD).strip() == "ran [0, 1, 2, 3, 4]"


def test_an_unclosed_connection_collected_in_a_thread_is_closed_in_the_loop() -> None:
    assert run(UNCLOSED_CONNECTION_COLLECTED_IN_A_THREAD).strip() == "closed True"


CALL_SOON_FROM_A_THREAD_AFTER_THE_LOOP_CLOSED = """
import threading, trio, trio_asyncio
from sentiment.redis_client import asyncio_loop

async def main():
    async with asyncio_loop():
        loop = trio_asyncio.current_loop.get()
    # trio runs on; the loop is closed: a late __del__ in some thread still calls call_soon
    thread = threading.Thread(target=loop.call_soon, args=(print, "never"))
    thread.start()
    thread.join()
    await trio.sleep(0.1)
    print("trio still runs")

trio.run(main)
"""


def test_call_soon_from_a_thread_after_the_loop_closed_does_not_end_trio() -> None:
    assert run(CALL_SOON_FROM_A_THREAD_AFTER_THE_LOOP_CLOSED).strip() == "trio still runs"
