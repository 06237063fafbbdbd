"""Background tasks an object starts and must end: kept until done, cancelled or waited for together.

The event loop holds only weak references to tasks, so a task nobody keeps may vanish
mid-run; every long-lived object that starts tasks keeps them in a :class:`Tasks`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any


class Tasks:
    """The tasks started by :meth:`spawn` that have not ended yet."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """``coro`` as a task on the running loop, kept here until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    def __len__(self) -> int:
        return len(self._running)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._running))

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Cancel every task; the tasks cancelled (they end at their next await)."""
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        return tasks

    async def cancelled(self) -> None:
        """Cancel every task and wait until they have ended (their errors are theirs)."""
        await asyncio.gather(*self.cancel(), return_exceptions=True)

    async def wait(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the tasks running now to end; they keep running after."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)
