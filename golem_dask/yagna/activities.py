"""Activities on the yagna daemon: create, run exe-scripts, watch, destroy.

A VM exe-unit runs an exe-script's commands in order and reports each one's result
when it ends.  A ``run`` of the worker itself does not end while the worker lives, so
:meth:`Activities.exec` returns once the commands before it have ended and keeps
watching the batch: when the worker's command ends, the activity is reported failed
with its last output, as a died container would be on the other markets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from golem_dask import config
from golem_dask.errors import ActivityError, MarketError, NetworkError
from golem_dask.protocol.messages import Activity, ActivityState, ExeCommand
from golem_dask.tasks import Tasks
from golem_dask.yagna import convert
from golem_dask.yagna.api import OK, YagnaDaemon, YagnaError

logger = logging.getLogger(__name__)

#: The daemon's activity states, as golem-dask's.
STATES = {
    "New": ActivityState.NEW,
    "Initialized": ActivityState.INITIALIZED,
    "Deployed": ActivityState.DEPLOYED,
    "Ready": ActivityState.READY,
    "Terminated": ActivityState.TERMINATED,
    "Unresponsive": ActivityState.FAILED,
}
FINAL = (ActivityState.TERMINATED, ActivityState.FAILED)


@dataclass
class _Watch:
    """One activity's state as last seen, and its listeners' queue."""

    agreement_id: str
    queue: asyncio.Queue[Activity] = field(default_factory=asyncio.Queue)
    state: ActivityState = ActivityState.INITIALIZED
    tasks: Tasks = field(default_factory=Tasks)

    def report(self, activity: Activity) -> None:
        if self.state in FINAL or activity.state == self.state:
            return
        self.state = activity.state
        self.queue.put_nowait(activity)
        if activity.state in FINAL:
            for task in self.tasks:
                if task is not asyncio.current_task():
                    task.cancel()


def _failure(result: dict[str, Any]) -> str:
    parts = [str(result.get(k)).strip() for k in ("message", "stderr", "stdout") if result.get(k)]
    return "; ".join(parts) or str(result.get("result", "failed"))


class Activities:
    """The activity half of :class:`~golem_dask.yagna.market.YagnaMarket`."""

    def __init__(self, daemon: YagnaDaemon) -> None:
        self.daemon = daemon
        self.api = daemon.api
        self._watches: dict[str, _Watch] = {}
        self._destroying = Tasks()

    async def create(self, agreement_id: str) -> Activity:
        timeout = config.seconds("yagna.activity-timeout")
        made = await self.api.call("POST", "/activity-api/v1/activity", body={"agreementId": agreement_id},
                                   params={"timeout": timeout}, timeout_s=timeout + 10)
        activity_id = str(made["activityId"] if isinstance(made, dict) else made)
        self.daemon.activities.setdefault(agreement_id, []).append(activity_id)
        watch = self._watches[activity_id] = _Watch(agreement_id)
        watch.tasks.spawn(self._poll_state(activity_id, watch), f"golem-yagna-state-{activity_id[:8]}")
        return Activity(activity_id, agreement_id, ActivityState.INITIALIZED)

    async def exec(self, activity_id: str, commands: Sequence[ExeCommand], timeout_s: float) -> list[str]:
        script = convert.exe_script(commands)
        # A trailing run of the worker does not end while the worker lives.
        service = bool(commands) and commands[-1].command == "run"
        batch = await self.api.call("POST", f"/activity-api/v1/activity/{activity_id}/exec",
                                    body={"text": json.dumps(script)})
        batch_id = str(batch)
        awaited = len(script) - (1 if service else 0)
        results = await self._results(activity_id, batch_id, commands, awaited, timeout_s)
        outputs = [str(r.get("stdout") or r.get("message") or "ok").strip() for r in results[:awaited]]
        if service:
            watch = self._watches.get(activity_id)
            if watch is not None:
                watch.tasks.spawn(self._follow_service(activity_id, batch_id, awaited, watch),
                                  f"golem-yagna-service-{activity_id[:8]}")
            outputs.append("started")
        return outputs

    async def _results(self, activity_id: str, batch_id: str, commands: Sequence[ExeCommand], awaited: int,
                       timeout_s: float) -> list[dict[str, Any]]:
        """The batch's results once ``awaited`` commands ended; an error ends it at once."""
        if awaited == 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        poll = config.seconds("yagna.poll-timeout")
        while True:
            results = await self._batch(activity_id, batch_id, min(poll, max(0.1, deadline - loop.time())),
                                        awaited - 1)
            for result in results:
                if result.get("result") == "Error":
                    index = int(result.get("index", 0))
                    name = commands[index].command if index < len(commands) else "command"
                    raise ActivityError(f"activity {activity_id[:8]}: {name} (command {index}) failed: "
                                        f"{_failure(result)}")
            if len(results) >= awaited:
                return results
            if loop.time() >= deadline:
                raise ActivityError(f"activity {activity_id[:8]}: {len(results)} of {awaited} commands ended "
                                    f"within {timeout_s:g}s")

    async def _batch(self, activity_id: str, batch_id: str, wait_s: float,
                     index: int | None = None) -> list[dict[str, Any]]:
        """The batch's results so far, waiting up to ``wait_s`` for command ``index`` to end."""
        try:
            found = await self.api.call("GET", f"/activity-api/v1/activity/{activity_id}/exec/{batch_id}",
                                        params={"timeout": round(wait_s, 3), "commandIndex": index},
                                        timeout_s=wait_s + 10, ok=(*OK, 408))
        except YagnaError as e:
            if e.status == 404:
                return []  # not started yet
            raise
        return [r for r in found if isinstance(r, dict)] if isinstance(found, list) else []

    async def _follow_service(self, activity_id: str, batch_id: str, index: int, watch: _Watch) -> None:
        """Report the activity failed when the worker's command ends."""
        poll = config.seconds("yagna.poll-timeout")
        while True:
            try:
                results = await self._batch(activity_id, batch_id, poll, index)
            except NetworkError:
                await asyncio.sleep(1)
                continue
            except YagnaError:
                return  # the activity is gone: the state poll reports it
            ended = [r for r in results if int(r.get("index", -1)) >= index]
            if ended:
                state = ActivityState.TERMINATED if ended[-1].get("result") == "Ok" else ActivityState.FAILED
                watch.report(Activity(activity_id, watch.agreement_id, state,
                                      f"the worker's command ended: {_failure(ended[-1])}"))
                return
            await asyncio.sleep(0.05)

    async def _poll_state(self, activity_id: str, watch: _Watch) -> None:
        interval = config.seconds("yagna.state-poll-interval")
        while True:
            await asyncio.sleep(interval)
            try:
                found = await self.api.call("GET", f"/activity-api/v1/activity/{activity_id}/state")
            except YagnaError as e:
                if e.status in (404, 410):
                    watch.report(Activity(activity_id, watch.agreement_id, ActivityState.TERMINATED, "activity gone"))
                    return
                continue
            except NetworkError:
                continue
            if not isinstance(found, dict):
                continue
            states = found.get("state") or []
            state = STATES.get(str(states[0]) if states else "", None)
            if state is not None:
                reason = found.get("errorMessage") or found.get("reason")
                watch.report(Activity(activity_id, watch.agreement_id, state, str(reason) if reason else None))

    async def events(self, activity_id: str) -> AsyncIterator[Activity]:
        watch = self._watches.get(activity_id)
        if watch is None:
            raise MarketError(f"no activity {activity_id}")
        while True:
            activity = await watch.queue.get()
            yield activity
            if activity.state in FINAL:
                return

    async def destroy(self, activity_id: str) -> None:
        """Ask the daemon to destroy the activity, and return: the daemon answers only once
        the provider's exe-unit has stopped (most of a second), and nothing here needs to
        wait for that; :meth:`close` does."""
        watch = self._watches.get(activity_id)
        if watch is not None:
            watch.report(Activity(activity_id, watch.agreement_id, ActivityState.TERMINATED, "destroyed"))
        self._destroying.spawn(self._destroy(activity_id), f"golem-yagna-destroy-{activity_id[:8]}")

    async def _destroy(self, activity_id: str) -> None:
        timeout = config.seconds("yagna.activity-timeout")
        try:
            await self.api.call("DELETE", f"/activity-api/v1/activity/{activity_id}", params={"timeout": timeout},
                                timeout_s=timeout + 10, ok=(*OK, 404, 410))
        except MarketError as e:
            logger.warning("destroying activity %s: %s", activity_id, e)
        else:
            logger.debug("destroyed activity %s", activity_id)

    async def close(self) -> None:
        await self._destroying.wait(config.seconds("yagna.activity-timeout") + 10)
        for watch in self._watches.values():
            await watch.tasks.cancelled()
