"""The bridge from synchronous callers to nats-py's asyncio: a private event loop in a daemon thread.

Every driver method submits coroutines to the loop (`run_coroutine_threadsafe`), so callers
stay synchronous and thread-safe, and nothing of nats-py ever runs on a caller's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """One event loop running forever in its own daemon thread, until stop()."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        # return only once the loop runs: a caller's first call checks running(), and
        # on a busy machine the thread may not have reached run_forever() yet
        started = threading.Event()
        self.loop.call_soon(started.set)
        self.thread.start()
        while not started.wait(0.05):
            if not self.thread.is_alive():  # died before its loop ran: calls then say "closed", never hang
                break

    def running(self) -> bool:
        return self.loop.is_running()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule coro on the loop; its result arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, last: Coroutine[Any, Any, object], timeout: float) -> None:
        """Run last (bounded by timeout), then stop the loop and wait for its thread."""
        if self.loop.is_running():
            future = self.submit(last)
            with contextlib.suppress(Exception):
                future.result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
        else:
            last.close()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()
