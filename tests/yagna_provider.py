"""A provider for tests against a real ``yagna`` daemon, played over its REST and GSB APIs.

:class:`YagnaTestProvider` sells compute through a running daemon with the provider's app
key: it publishes an offer, answers the requestor's counter-proposals with unchanged terms,
approves agreements, and serves each activity's exe-unit on the daemon's GSB API (a
``gsb+flexbuffers`` websocket per activity).  Commands really run on this machine, as a VM
exe-unit would run them: ``deploy`` makes the activity's sandbox (standing for the VM's
``/golem`` directory), ``run`` starts a real process (so a requestor's ``dask worker``
runs here), ``transfer`` moves files over HTTP(S) and inside the sandbox.  Usage is
measured from the processes, billed with debit notes while an activity runs and with one
invoice when its agreement ends; every document sent is kept with its latest status, for
tests to assert on.

Everything runs on an asyncio loop in a thread of its own, so synchronous tests can drive a
requestor while the provider answers.

Facts of yagna 0.17.6 this relies on:

* one daemon may hold both identities: agreement events of the requestor show up too, and
  activity events are read by timestamp (never consumed), so several providers on one
  identity can share the daemon, each keeping to the agreements it approved;
* yagna never answers a websocket close frame, and ``DELETE`` of a GSB service leaves its
  socket open: the socket is closed with a short timeout and every activity binds a fresh
  address;
* yagna refuses an invoice for less than what the debit notes of its agreement claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import psutil

from yagna_vpn import TestVpn, VpnHost

from golem_dask.protocol import properties as P
from golem_dask.protocol.pricing import LinearPricing, quantize

logger = logging.getLogger(__name__)

#: Server-side wait of a long poll (market, activity and payment events), seconds.
POLL_S = 5.0
#: Added to a request's own wait before the client gives up on the daemon, seconds.
HTTP_MARGIN_S = 15.0
#: yagna never answers a websocket close frame: how long to wait for it anyway, seconds.
WS_CLOSE_TIMEOUT_S = 0.3
#: How long the requestor's approval is awaited, seconds (``approve?timeout=``).
APPROVE_TIMEOUT_S = 10.0
#: Pause after a failed poll before the next one, seconds.
RETRY_S = 0.5
#: How often issued invoices are re-read for their status, seconds.
INVOICE_POLL_S = 0.5
#: Payment due date of an invoice, after its issue.
INVOICE_DUE = timedelta(minutes=5)
#: Output kept per stream of a command (the tail), bytes.
OUTPUT_LIMIT = 64 * 1024
#: Stderr kept in the message of a failed command (the tail), characters.
MESSAGE_TAIL = 2000
#: Decimals kept of each usage counter (seconds): the debit note's vector and its amount
#: are computed from the same rounded numbers.
USAGE_DECIMALS = 3
#: Exe-unit calls bound on the GSB for every activity.
COMPONENTS = ("Exec", "GetExecBatchResults", "GetRunningCommand", "GetActivityState", "GetActivityUsage")
#: Document statuses after which nothing changes.
FINAL_STATUSES = frozenset({"SETTLED", "REJECTED", "CANCELLED", "FAILED"})
#: ``/golem`` as a whole path component, anywhere in an argument (``sh -c "cat /golem/x"``).
_GOLEM_PATH = re.compile(r"(?<![\w.\-/])/golem(?=/|$|[^\w.\-])")


def _flexbuffers():
    try:
        from flatbuffers import flexbuffers
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("the yagna GSB API speaks flexbuffers: pip install flatbuffers") from e
    return flexbuffers


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_time(stamp: str) -> datetime:
    """An event's date as yagna writes it (``Z``, up to nanoseconds)."""
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp.replace("Z", "+00:00"))
    return datetime.fromisoformat(stamp)


def _now() -> str:
    return _iso(datetime.now(UTC))


def _amount(value: Decimal) -> str:
    """A token amount as yagna reads it: plain digits, never an exponent."""
    return format(value, "f")


class YagnaApiError(RuntimeError):
    """The daemon answered a call with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, text: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {text[:500]}")
        self.status = status


class _Api:
    """The daemon's REST API under one app key."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, app_key: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {app_key}"}

    @property
    def base_url(self) -> str:
        return self._base

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    async def call(self, method: str, path: str, *, expect: Iterable[int] = (200, 201, 204),
                   json: Any = None, params: dict[str, Any] | None = None, wait_s: float = 0.0) -> Any:
        """One call; the decoded JSON answer (``None`` when empty)."""
        timeout = aiohttp.ClientTimeout(total=wait_s + HTTP_MARGIN_S)
        async with self._session.request(method, self._base + path, json=json, params=params,
                                         headers=self._headers, timeout=timeout) as response:
            text = await response.text()
            if response.status not in tuple(expect):
                raise YagnaApiError(method, path, response.status, text)
            if not text:
                return None
            try:
                return jsonlib.loads(text)
            except ValueError:
                return text


async def _poll(api: _Api, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """One long poll for events: the events, ``[]`` when none came in time (some APIs answer 408)."""
    try:
        return await api.call("GET", path, params={"timeout": POLL_S, **params}, wait_s=POLL_S) or []
    except YagnaApiError as e:
        if e.status == 408:
            return []
        raise


async def _events_after(api: _Api, path: str, since: str, what: str) -> AsyncIterator[dict[str, Any]]:
    """Every event of a long-polled ``path`` dated after ``since``, retrying on errors."""
    latest = _parse_time(since)
    while True:
        try:
            events = await _poll(api, path, {"afterTimestamp": since})
        except (TimeoutError, YagnaApiError, aiohttp.ClientError) as e:
            logger.warning("%s: %r", what, e)
            await asyncio.sleep(RETRY_S)
            continue
        for event in events or []:
            stamp = event.get("eventDate")
            if stamp and _parse_time(stamp) > latest:
                since, latest = stamp, _parse_time(stamp)
            yield event


class _Tasks:
    """Owner of background tasks: keeps them, logs their failures, cancels them."""

    def __init__(self, errors: list[str]) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._errors = errors

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            logger.error("%s failed: %r", task.get_name(), error, exc_info=error)
            self._errors.append(f"{task.get_name()}: {error!r}")

    async def cancel(self) -> None:
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- usage ------------------------------------------------------------------------------------


def _tree_cpu(process: psutil.Process) -> float:
    """CPU seconds of a process and its descendants, living or reaped by their parents."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class _Meter:
    """Usage of one activity: wall time since ``start`` and CPU seconds of its processes."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._stopped: float | None = None
        self._processes: dict[int, psutil.Process | None] = {}
        self._cpu: dict[int, float] = {}

    @property
    def started(self) -> bool:
        return self._started is not None

    def start(self) -> None:
        if self._started is None:
            self._started = time.monotonic()

    def add(self, pid: int) -> None:
        try:
            self._processes[pid] = psutil.Process(pid)
        except psutil.Error:
            self._processes[pid] = None
        self._cpu.setdefault(pid, 0.0)

    def exited(self, pid: int, cpu_s: float) -> None:
        """A process was reaped: its rusage (children included) is its final CPU time."""
        self._processes[pid] = None
        self._cpu[pid] = max(self._cpu.get(pid, 0.0), cpu_s)

    def sample(self) -> None:
        for pid, process in self._processes.items():
            if process is None or self._stopped is not None:
                continue
            try:
                self._cpu[pid] = max(self._cpu[pid], _tree_cpu(process))
            except psutil.Error:
                pass  # exited: the last value seen stands until its rusage comes

    def stop(self) -> None:
        """Freeze the usage (the activity is over)."""
        if self._stopped is None:
            self.sample()
            self._stopped = time.monotonic()

    def usage(self) -> tuple[float, float]:
        """``(duration_sec, cpu_sec)``, rounded to :data:`USAGE_DECIMALS`; never decreasing."""
        self.sample()
        if self._started is None:
            return 0.0, 0.0
        end = self._stopped if self._stopped is not None else time.monotonic()
        return round(end - self._started, USAGE_DECIMALS), round(sum(self._cpu.values()), USAGE_DECIMALS)


def usage_counters(duration_s: float, cpu_s: float) -> dict[str, Decimal]:
    """Usage as :meth:`LinearPricing.cost` reads it, from the numbers a debit note carries."""
    return {P.USAGE_DURATION_SEC: Decimal(str(duration_s)), P.USAGE_CPU_SEC: Decimal(str(cpu_s))}


# --- the exe-unit -----------------------------------------------------------------------------


class CommandError(Exception):
    """A command of a batch failed; its message goes to the requestor."""


class Sandbox:
    """The activity's filesystem: ``root`` stands for the VM's ``/``, ``golem`` for ``/golem``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.golem = root / "golem"
        self.logs = root.parent / f"{root.name}.logs"

    def create(self) -> None:
        for d in (self.golem, self.root / "tmp", self.root / "root", self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def rewrite(self, arg: str) -> str:
        """``/golem`` in an argument becomes the sandbox's path."""
        return _GOLEM_PATH.sub(lambda _: str(self.golem), arg)

    def path(self, location: str) -> Path:
        """A container path (``container:/golem/x`` or ``/golem/x``) inside the sandbox."""
        path = location.removeprefix("container:")
        if not path.startswith("/"):
            raise CommandError(f"container path {location!r} is not absolute")
        local = (self.root / path.lstrip("/")).resolve()
        if not local.is_relative_to(self.root.resolve()):
            raise CommandError(f"container path {location!r} leaves the container")
        return local

    def env(self) -> dict[str, str]:
        """A clean environment: the venv's ``bin`` first, so ``dask`` and ``python3`` resolve."""
        venv_bin = Path(sys.prefix) / "bin"
        return {
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.root / "root"),
            "TMPDIR": str(self.root / "tmp"),
            "LANG": "C.UTF-8",
        }


class _Processes:
    """The processes an activity started: spawned in sessions of their own, reaped, killed."""

    def __init__(self, meter: _Meter, errors: list[str]) -> None:
        self._meter = meter
        self._live: dict[int, subprocess.Popen] = {}
        self._exits: dict[int, asyncio.Future] = {}
        self._tasks = _Tasks(errors)
        self.pids: list[int] = []

    def spawn(self, argv: list[str], cwd: Path, env: dict[str, str], stdout: Path, stderr: Path) -> int:
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        self.pids.append(proc.pid)
        self._live[proc.pid] = proc
        self._meter.add(proc.pid)
        self._exits[proc.pid] = asyncio.get_running_loop().create_future()
        self._tasks.spawn(self._reap(proc), f"reap {proc.pid}")
        return proc.pid

    async def wait(self, pid: int) -> int:
        """The exit code of ``pid``."""
        return await asyncio.shield(self._exits[pid])

    async def _reap(self, proc: subprocess.Popen) -> None:
        # wait4, not Popen.wait: its rusage is the CPU time of the process and of every
        # descendant it reaped, which psutil can no longer see once they are gone.
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(proc.pid)
        exited = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        _, status, rusage = os.wait4(proc.pid, 0)  # does not block: the pidfd says it exited
        proc.returncode = os.waitstatus_to_exitcode(status)
        self._meter.exited(proc.pid, rusage.ru_utime + rusage.ru_stime)
        self._live.pop(proc.pid, None)
        self._exits[proc.pid].set_result(proc.returncode)

    def kill(self) -> None:
        """SIGKILL every process still running, with its session and descendants (a VM dies at once)."""
        self._meter.sample()
        for pid in list(self._live):
            kill_tree(pid)

    async def reap_all(self, timeout_s: float) -> None:
        pending = [f for f in self._exits.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
        await self._tasks.cancel()

    @property
    def running(self) -> list[int]:
        return list(self._live)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s session (it leads one) and every descendant, even those that left it."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for process in descendants:
        with contextlib.suppress(psutil.Error):
            process.kill()


class _Batch:
    """Results of one exe-script, appended as its commands end."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return bool(self.results) and self.results[-1]["isBatchFinished"]

    def add(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, index: int | None, timeout_s: float) -> list[dict[str, Any]]:
        """Results so far, once command ``index`` (else the whole batch) is done or after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (self.finished or (index is not None and len(self.results) > index)):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return list(self.results)


class _Vms:
    """The provider's VMs on its requestors' VPNs (:mod:`yagna_vpn`), one bus connection per network."""

    def __init__(self, gsb_url: str, provider_id: str) -> None:
        self.gsb_url, self.provider_id = gsb_url, provider_id
        self.nets: dict[str, TestVpn] = {}
        self._lock = asyncio.Lock()

    async def add(self, net_id: str, ip: str) -> VpnHost:
        async with self._lock:
            vpn = self.nets.get(net_id)
            if vpn is None:
                vpn = TestVpn(self.gsb_url, net_id)
                await vpn.start()
                self.nets[net_id] = vpn
            return await vpn.add_vm(self.provider_id, ip)

    def remove(self, host: VpnHost) -> None:
        for vpn in self.nets.values():
            vpn.remove_vm(host)

    async def close(self) -> None:
        for vpn in self.nets.values():
            await vpn.close()
        self.nets.clear()


class ExeUnit:
    """One activity's exe-unit: its state, sandbox, batches and processes.

    ``handle(component, payload)`` answers one GSB call; ``stop()`` ends the activity.
    """

    def __init__(self, activity_id: str, agreement_id: str, root: Path, api: _Api,
                 session: aiohttp.ClientSession, errors: list[str], vms: _Vms | None = None) -> None:
        self.activity_id = activity_id
        self.vms = vms
        self.vm: VpnHost | None = None  # with a deploy on a VPN: the VM's namespace
        self.agreement_id = agreement_id
        self.sandbox = Sandbox(root)
        self.meter = _Meter()
        self.processes = _Processes(self.meter, errors)
        self.state = "Initialized"
        self._api = api
        self._session = session
        self._batches: dict[str, _Batch] = {}
        self._running: dict[str, str] = {}  # batch id -> name of its running command
        self._tasks = _Tasks(errors)
        self._stopped: asyncio.Future | None = None

    async def set_state(self, state: str) -> None:
        self.state = state
        await self._api.call("PUT", f"/activity-api/v1/activity/{self.activity_id}/state",
                             json={"state": [state, None], "reason": None, "errorMessage": None})

    # GSB calls

    async def handle(self, component: str, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("activityId") not in (None, self.activity_id):
            return {"error": {"forbidden": f"this exe-unit serves activity {self.activity_id}"}}
        if component == "Exec":
            return self._exec(payload)
        if component == "GetExecBatchResults":
            batch = self._batches.get(str(payload.get("batchId")))
            if batch is None:
                return {"error": {"notFound": f"batch_id = {payload.get('batchId')}"}}
            index, timeout = payload.get("commandIndex"), payload.get("timeout")
            # answer a little before the daemon's own deadline for the call
            wait_s = max(0.0, float(timeout) * 0.9 - 0.1) if timeout else 0.0
            return {"payload": await batch.wait(index, wait_s)}
        if component == "GetRunningCommand":
            return {"payload": [{"command": name, "progress": None, "params": None}
                                for name in self._running.values()]}
        if component == "GetActivityState":
            return {"payload": {"state": [self.state, None], "reason": None, "errorMessage": None}}
        if component == "GetActivityUsage":
            duration, cpu = self.meter.usage()
            return {"payload": {"currentUsage": [duration, cpu], "timestamp": int(time.time())}}
        return {"error": {"badRequest": f"unsupported call {component}"}}

    def _exec(self, payload: dict[str, Any]) -> dict[str, Any]:
        batch_id, script = payload.get("batchId"), payload.get("exeScript")
        if not isinstance(batch_id, str) or not isinstance(script, list):
            return {"error": {"badRequest": "Exec needs batchId and exeScript"}}
        if self.state == "Terminated":
            return {"error": {"activity": f"activity {self.activity_id} is terminated"}}
        if batch_id in self._batches:
            return {"error": {"badRequest": f"batch {batch_id} exists"}}
        batch = self._batches[batch_id] = _Batch()
        self._tasks.spawn(self._run_batch(batch_id, batch, script), f"batch {batch_id}")
        return {"payload": batch_id}

    async def _run_batch(self, batch_id: str, batch: _Batch, script: list[Any]) -> None:
        for index, command in enumerate(script):
            # a command is a one-key object: {"run": {"entry_point": ..., "args": [...]}}
            well_formed = isinstance(command, dict) and len(command) == 1
            name = next(iter(command)) if well_formed else repr(command)
            self._running[batch_id] = name
            outcome: dict[str, Any] = {"stdout": None, "stderr": None, "message": None}
            try:
                outcome.update(await self._command(name, (command[name] if well_formed else None) or {}))
                ok = True
            except CommandError as e:
                outcome["message"], ok = str(e), False
            except Exception as e:  # a bug here must reach the requestor, not hang its batch
                logger.exception("command %s of batch %s", name, batch_id)
                outcome["message"], ok = f"{type(e).__name__}: {e}", False
            last = index == len(script) - 1 or not ok
            batch.add({"index": index, "result": "Ok" if ok else "Error", **outcome,
                       "isBatchFinished": last, "eventDate": _now()})
            if last:
                break
        self._running.pop(batch_id, None)

    async def _command(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if self.state == "Terminated":
            raise CommandError("the activity is terminated")
        if name == "deploy":
            if self.state != "Initialized":
                raise CommandError(f"deploy in state {self.state}")
            self.sandbox.create()
            if args.get("net"):
                self.vm = await self._join_vpn(args["net"])
            await self.set_state("Deployed")
            return {}
        if name == "start":
            if self.state != "Deployed":
                raise CommandError(f"start in state {self.state}")
            self.meter.start()
            await self.set_state("Ready")
            return {}
        if name == "run":
            if self.state != "Ready":
                raise CommandError(f"run in state {self.state} (deploy and start first)")
            return await self._run(args)
        if name == "transfer":
            if self.state not in ("Deployed", "Ready"):
                raise CommandError(f"transfer in state {self.state} (deploy first)")
            await self._transfer(args.get("from"), args.get("to"))
            return {}
        if name == "terminate":
            # the VM's programs end; the activity itself ends when the requestor destroys it
            self.processes.kill()
            return {}
        if name == "sign":
            return {}
        raise CommandError(f"unsupported command {name!r}")

    async def _join_vpn(self, nets: Any) -> VpnHost:
        """The VM joins the network the deploy names (one, as the requestor sends)."""
        if self.vms is None:
            raise CommandError("this provider has no VPN (start it with gsb_url)")
        if not isinstance(nets, list) or len(nets) != 1 or not isinstance(nets[0], dict):
            raise CommandError(f"deploy's net must name one network, not {nets!r}")
        net = nets[0]
        try:
            return await self.vms.add(str(net["id"]), str(net["nodeIp"]))
        except (KeyError, OSError, subprocess.CalledProcessError) as e:
            raise CommandError(f"cannot join the VPN: {e!r}") from e

    async def _run(self, args: dict[str, Any]) -> dict[str, Any]:
        entry = args.get("entry_point")
        if not isinstance(entry, str) or not entry:
            raise CommandError("run needs an entry_point")
        argv = [self.sandbox.rewrite(a) for a in [entry, *(args.get("args") or [])]]
        if self.vm is not None:
            argv = self.vm.command(argv)
        n = len(self.processes.pids)
        out, err = self.sandbox.logs / f"{n}.stdout", self.sandbox.logs / f"{n}.stderr"
        try:
            pid = self.processes.spawn(argv, self.sandbox.golem, self.sandbox.env(), out, err)
        except OSError as e:
            raise CommandError(f"cannot run {entry}: {e}") from e
        code = await self.processes.wait(pid)
        stdout, stderr = _tail(out, OUTPUT_LIMIT), _tail(err, OUTPUT_LIMIT)
        if code != 0:
            raise CommandError(f"{entry} exited with code {code}: {stderr[-MESSAGE_TAIL:]}")
        return {"stdout": stdout, "stderr": stderr}

    async def _transfer(self, source: Any, target: Any) -> None:
        if not isinstance(source, str) or not isinstance(target, str):
            raise CommandError("transfer needs from and to")
        remote = ("http://", "https://")
        try:
            if source.startswith(remote) and not target.startswith(remote):
                dest = self.sandbox.path(target)
                dest.parent.mkdir(parents=True, exist_ok=True)
                async with self._session.get(source) as response:
                    if response.status != 200:
                        raise CommandError(f"GET {source} -> HTTP {response.status}")
                    with open(dest, "wb") as f:
                        async for chunk in response.content.iter_chunked(1 << 16):
                            f.write(chunk)
            elif target.startswith(remote) and not source.startswith(remote):
                data = self.sandbox.path(source).read_bytes()
                async with self._session.put(target, data=data) as response:
                    if response.status >= 300:
                        raise CommandError(f"PUT {target} -> HTTP {response.status}")
            elif not source.startswith(remote):
                dest = self.sandbox.path(target)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.sandbox.path(source), dest)
            else:
                raise CommandError(f"cannot transfer from {source} to {target}")
        except (OSError, aiohttp.ClientError) as e:
            raise CommandError(f"transfer {source} -> {target}: {e}") from e

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Kill the processes, freeze usage, end the batches; safe to call twice."""
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
            return
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            self.processes.kill()
            self.meter.stop()
            await self.processes.reap_all(timeout_s)
            if self.vm is not None and self.vms is not None:
                self.vms.remove(self.vm)
            await self._tasks.cancel()
            self._running.clear()
            self.state = "Terminated"
        finally:
            self._stopped.set_result(None)


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - limit))
        return f.read().decode("utf-8", "replace")


class _GsbService:
    """An exe-unit bound on the daemon's GSB: ``/public/exeunit/<activity>`` over a websocket."""

    def __init__(self, api: _Api, session: aiohttp.ClientSession, activity_id: str,
                 handler: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]], errors: list[str]) -> None:
        self._api = api
        self._session = session
        self._address = f"/public/exeunit/{activity_id}"
        self._handler = handler
        self._tasks = _Tasks(errors)
        self._send_lock = asyncio.Lock()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.services_id: str | None = None

    @property
    def is_open(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def open(self) -> None:
        bound = await self._api.call("POST", "/gsb-api/v1/services",
                                     json={"listen": {"on": self._address, "components": list(COMPONENTS)}})
        self.services_id = bound["servicesId"]
        url = "ws" + self._api.base_url.removeprefix("http") + f"/gsb-api/v1/services/{quote(self.services_id)}"
        self._ws = await self._session.ws_connect(
            url, protocols=("gsb+flexbuffers",), headers=self._api.headers,
            timeout=aiohttp.ClientWSTimeout(ws_close=WS_CLOSE_TIMEOUT_S))
        self._tasks.spawn(self._serve(self._ws), f"gsb {self._address}")

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        fb = _flexbuffers()
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                request = fb.Loads(message.data)
                logger.debug("GSB %s %s: %s", self._address, request.get("component"), request.get("payload"))
                self._tasks.spawn(self._answer(fb, request), f"gsb {request.get('component')}")
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                break

    async def _answer(self, fb: Any, request: dict[str, Any]) -> None:
        try:
            reply = await self._handler(request.get("component", ""), request.get("payload") or {})
        except Exception as e:
            logger.exception("GSB call %s", request.get("component"))
            reply = {"error": {"service": f"{type(e).__name__}: {e}"}}
        async with self._send_lock:
            ws = self._ws
            if ws is not None and not ws.closed:
                await ws.send_bytes(bytes(fb.Dumps({"id": request["id"], **reply})))

    async def close(self) -> None:
        """Unbind, then close the socket (yagna never answers the close frame)."""
        if self.services_id is not None:
            with contextlib.suppress(Exception):
                await self._api.call("DELETE", f"/gsb-api/v1/services/{quote(self.services_id)}",
                                     expect=(200, 204, 404))
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), WS_CLOSE_TIMEOUT_S * 2)
        await self._tasks.cancel()


# --- market -----------------------------------------------------------------------------------


def offer_properties(*, provider_id: str, platform: str, subnet: str, name: str, threads: int, mem_gib: float,
                     storage_gib: float, price_per_second: Decimal, price_per_cpu_second: Decimal,
                     start_price: Decimal, debit_note_interval_s: int) -> dict[str, Any]:
    """The offer's properties, in the public Golem network's vocabulary.

    Examples
    --------
    >>> props = offer_properties(provider_id="0xAB", platform="erc20-hoodi-tglm", subnet="s", name="p",
    ...                          threads=2, mem_gib=4.0, storage_gib=10.0, price_per_second=Decimal("0.0001"),
    ...                          price_per_cpu_second=Decimal("0.0002"), start_price=Decimal(0),
    ...                          debit_note_interval_s=2)
    >>> props["golem.com.pricing.model.linear.coeffs"]
    [0.0001, 0.0002, 0.0]
    >>> LinearPricing.from_properties(props).price_per_cpu_second
    Decimal('0.0002')
    """
    return {
        "golem.inf.cpu.threads": int(threads),
        "golem.inf.mem.gib": float(mem_gib),
        "golem.inf.storage.gib": float(storage_gib),
        "golem.runtime.name": "vm",
        "golem.runtime.capabilities": ["vpn", "inet", "manifest-support", "start-entrypoint"],
        "golem.node.debug.subnet": subnet,
        "golem.node.id.name": name,
        P.PRICING_MODEL: "linear",
        P.USAGE_VECTOR: [P.USAGE_DURATION_SEC, P.USAGE_CPU_SEC],
        P.LINEAR_COEFFS: [float(price_per_second), float(price_per_cpu_second), float(start_price)],
        "golem.com.scheme": "payu",
        "golem.com.scheme.payu.debit-note.interval-sec?": int(debit_note_interval_s),
        "golem.com.payment.protocol.version": 3,
        f"golem.com.payment.platform.{platform}.address": provider_id.lower(),
    }


class _Market:
    """The offer, its negotiations, and the agreements approved from it."""

    def __init__(self, api: _Api, properties: dict[str, Any], subnet: str, provider_id: str, platform: str,
                 on_terminated: Callable[[str, str | None], None], errors: list[str]) -> None:
        self._api = api
        self.offer: dict[str, Any] = {
            "properties": properties,
            "constraints": f"(&(golem.srv.comp.expiration>0)(golem.node.debug.subnet={subnet}))"}
        self._provider_id = provider_id.lower()
        self._platform = platform
        self._on_terminated = on_terminated
        self._tasks = _Tasks(errors)
        self.offer_id: str | None = None
        self.agreements: dict[str, dict[str, Any]] = {}
        self.refused: list[dict[str, str]] = []

    async def publish(self) -> None:
        self.offer_id = await self._api.call("POST", "/market-api/v1/offers", json=self.offer)
        self._tasks.spawn(self._negotiate(), "offer events")
        self._tasks.spawn(self._watch_agreements(_now()), "agreement events")

    async def unpublish(self) -> None:
        await self._tasks.cancel()
        if self.offer_id is not None:
            await self._api.call("DELETE", f"/market-api/v1/offers/{self.offer_id}", expect=(200, 204, 404, 410))

    async def terminate(self, agreement_id: str, message: str) -> None:
        await self._api.call("POST", f"/market-api/v1/agreements/{agreement_id}/terminate",
                             json={"message": message}, expect=(200, 204, 409, 410), wait_s=APPROVE_TIMEOUT_S)

    async def _negotiate(self) -> None:
        path = f"/market-api/v1/offers/{self.offer_id}/events"
        while True:
            try:
                events = await _poll(self._api, path, {"maxEvents": 100})
            except YagnaApiError as e:
                if e.status in (404, 410):
                    return  # the offer is gone
                logger.warning("offer events: %s", e)
                await asyncio.sleep(RETRY_S)
                continue
            except (TimeoutError, aiohttp.ClientError) as e:
                logger.warning("offer events: %r", e)
                await asyncio.sleep(RETRY_S)
                continue
            for event in events or []:
                kind = event.get("eventType")
                if kind == "ProposalEvent":
                    self._tasks.spawn(self._on_proposal(event["proposal"]), "counter-proposal")
                elif kind == "AgreementEvent":
                    self._tasks.spawn(self._on_agreement(event["agreement"]), "approval")

    async def _on_proposal(self, proposal: dict[str, Any]) -> None:
        if proposal.get("state") not in ("Initial", "Draft"):
            return
        proposal_id = proposal["proposalId"]
        chosen = proposal.get("properties", {}).get("golem.com.payment.chosen-platform")
        if chosen is not None and chosen != self._platform:
            reason = f"payment platform {chosen!r} is not {self._platform!r}"
            self.refused.append({"proposal": proposal_id, "reason": reason})
            await self._api.call("POST", f"/market-api/v1/offers/{self.offer_id}/proposals/{proposal_id}/reject",
                                 json={"message": reason}, expect=(200, 204, 404, 410))
            return
        try:
            await self._api.call("POST", f"/market-api/v1/offers/{self.offer_id}/proposals/{proposal_id}",
                                 json=self.offer)
        except YagnaApiError as e:  # the requestor's doing (its demand gone, the proposal stale)
            logger.warning("no counter-proposal to %s: %s", proposal_id, e)

    def _check(self, agreement: dict[str, Any]) -> str | None:
        """Why ``agreement`` is not what this provider offered, or ``None``."""
        offer = agreement.get("offer", {})
        if str(offer.get("providerId", "")).lower() != self._provider_id:
            return f"offer of provider {offer.get('providerId')}, not {self._provider_id}"
        signed = offer.get("properties", {})
        for key, value in self.offer["properties"].items():
            if signed.get(key) != value:
                return f"{key} is {signed.get(key)!r} in the agreement, {value!r} in the offer"
        chosen = agreement.get("demand", {}).get("properties", {}).get("golem.com.payment.chosen-platform")
        if chosen is not None and chosen != self._platform:
            return f"payment platform {chosen!r} is not {self._platform!r}"
        return None

    async def _on_agreement(self, agreement: dict[str, Any]) -> None:
        agreement_id = agreement["agreementId"]
        reason = self._check(agreement)
        if reason is not None:
            self.refused.append({"agreement": agreement_id, "reason": reason})
            await self._api.call("POST", f"/market-api/v1/agreements/{agreement_id}/reject",
                                 json={"message": reason}, expect=(200, 204, 404, 409, 410))
            return
        self.agreements[agreement_id] = {"id": agreement_id, "state": "Approving", "demand": agreement.get("demand"),
                                         "offer": agreement.get("offer"), "activities": []}
        try:
            await self._api.call("POST", f"/market-api/v1/agreements/{agreement_id}/approve",
                                 params={"timeout": APPROVE_TIMEOUT_S}, wait_s=APPROVE_TIMEOUT_S)
        except YagnaApiError as e:
            self.agreements[agreement_id]["state"] = "NotApproved"
            self.refused.append({"agreement": agreement_id, "reason": f"approval failed: {e}"})
            return
        if self.agreements[agreement_id]["state"] == "Approving":
            self.agreements[agreement_id]["state"] = "Approved"

    async def _watch_agreements(self, since: str) -> None:
        async for event in _events_after(self._api, "/market-api/v1/agreementEvents", since, "agreement events"):
            agreement = self.agreements.get(str(event.get("agreementId")))
            if (event.get("eventType") == "AgreementTerminatedEvent" and agreement is not None
                    and agreement["state"] != "Terminated"):
                self._on_terminated(agreement["id"], event.get("terminator"))


# --- money ------------------------------------------------------------------------------------


class _Billing:
    """Debit notes while activities run, one invoice per ended agreement, and their statuses."""

    def __init__(self, api: _Api, pricing: LinearPricing, interval_s: float, markup: Decimal,
                 errors: list[str]) -> None:
        self._api = api
        self._pricing = pricing
        self._interval_s = interval_s
        self._markup = markup
        self._tasks = _Tasks(errors)
        self._documents: dict[str, dict[str, Any]] = {}
        self._invoiced: set[str] = set()
        self.debit_notes: list[dict[str, Any]] = []
        self.invoices: list[dict[str, Any]] = []
        self.failures: list[str] = []

    def start(self) -> None:
        since = _now()
        self._tasks.spawn(self._follow("debitNote", since), "debit note events")
        self._tasks.spawn(self._follow("invoice", since), "invoice events")
        self._tasks.spawn(self._poll_invoices(), "invoice statuses")

    async def stop(self) -> None:
        await self._tasks.cancel()

    def bill(self, unit: ExeUnit, agreement_open: Callable[[], bool]) -> None:
        """Send a debit note for ``unit`` every interval while it runs."""
        self._tasks.spawn(self._every_interval(unit, agreement_open), f"debit notes {unit.activity_id}")

    async def _every_interval(self, unit: ExeUnit, agreement_open: Callable[[], bool]) -> None:
        while unit.state != "Terminated":
            await asyncio.sleep(self._interval_s)
            if unit.meter.started and unit.state != "Terminated" and agreement_open():
                await self.debit_note(unit)

    async def debit_note(self, unit: ExeUnit) -> None:
        """One debit note for ``unit``'s usage so far (nothing when nothing changed since the last)."""
        duration, cpu = unit.meter.usage()
        amount = self._pricing.cost(usage_counters(duration, cpu))
        sent = [d for d in self.debit_notes if d["activity_id"] == unit.activity_id]
        if sent and sent[-1]["usage"] == (duration, cpu):
            return
        body = {"agreementId": unit.agreement_id, "activityId": unit.activity_id,
                "totalAmountDue": _amount(amount), "usageCounterVector": [duration, cpu]}
        record = {"id": None, "agreement_id": unit.agreement_id, "activity_id": unit.activity_id,
                  "amount": amount, "usage": (duration, cpu), "status": None}
        await self._issue("debitNote", body, record, self.debit_notes)

    async def invoice(self, agreement_id: str, units: list[ExeUnit]) -> None:
        """The agreement's one invoice: the cost of its activities' final usage, times the markup."""
        if agreement_id in self._invoiced or not units:
            return
        self._invoiced.add(agreement_id)
        usage = {u.activity_id: u.meter.usage() for u in units}
        total = sum((self._pricing.cost(usage_counters(*counters)) for counters in usage.values()), Decimal(0))
        amount = quantize(total * self._markup)
        body = {"agreementId": agreement_id, "activityIds": list(usage), "amount": _amount(amount),
                "paymentDueDate": _iso(datetime.now(UTC) + INVOICE_DUE)}
        record = {"id": None, "agreement_id": agreement_id, "activity_ids": list(usage), "amount": amount,
                  "usage": usage, "status": None}
        await self._issue("invoice", body, record, self.invoices)

    async def _issue(self, kind: str, body: dict[str, Any], record: dict[str, Any],
                     issued: list[dict[str, Any]]) -> None:
        try:
            document = await self._api.call("POST", f"/payment-api/v1/{kind}s", json=body)
            record["id"] = document[f"{kind}Id"]
            record["status"] = document.get("status")
            self._documents[record["id"]] = record
            issued.append(record)
            await self._api.call("POST", f"/payment-api/v1/{kind}s/{record['id']}/send", wait_s=POLL_S)
            await self._refresh(kind, record)
        except (TimeoutError, YagnaApiError, aiohttp.ClientError) as e:
            logger.warning("%s %s: %s", kind, body, e)
            self.failures.append(f"{kind} {record['id'] or body}: {e}")

    async def _refresh(self, kind: str, record: dict[str, Any]) -> None:
        document = await self._api.call("GET", f"/payment-api/v1/{kind}s/{record['id']}")
        record["status"] = document["status"]

    async def _follow(self, kind: str, since: str) -> None:
        """Keep each document's status as the payment events say it changed."""
        latest = _parse_time(since)
        while True:
            try:
                events = await _poll(self._api, f"/payment-api/v1/{kind}Events", {"afterTimestamp": since})
                for event in events or []:
                    stamp = event.get("eventDate")
                    if stamp and _parse_time(stamp) > latest:
                        since, latest = stamp, _parse_time(stamp)
                    record = self._documents.get(str(event.get(f"{kind}Id")))
                    if record is not None:
                        await self._refresh(kind, record)
            except (TimeoutError, YagnaApiError, aiohttp.ClientError) as e:
                logger.warning("%s events: %r", kind, e)
                await asyncio.sleep(RETRY_S)

    async def _poll_invoices(self) -> None:
        # Settlement reaches the provider with the payment, not always as an invoice event.
        while True:
            await asyncio.sleep(INVOICE_POLL_S)
            for record in list(self.invoices):
                if record["status"] not in FINAL_STATUSES:
                    with contextlib.suppress(YagnaApiError, aiohttp.ClientError, asyncio.TimeoutError):
                        await self._refresh("invoice", record)


# --- activities -------------------------------------------------------------------------------


class _Activities:
    """Activities of approved agreements: an exe-unit bound on the GSB for each, until destroyed."""

    def __init__(self, api: _Api, session: aiohttp.ClientSession, workdir: Path, market: _Market,
                 billing: _Billing, errors: list[str], vms: _Vms | None = None) -> None:
        self._api = api
        self._session = session
        self.vms = vms
        self._workdir = workdir
        self._market = market
        self._billing = billing
        self._errors = errors
        self._tasks = _Tasks(errors)
        self._retire_tasks = _Tasks(errors)  # not cancelled with the watcher: a retirement runs to its end
        self._retiring: dict[str, asyncio.Task] = {}
        self.units: dict[str, ExeUnit] = {}
        self.services: dict[str, _GsbService] = {}

    def start(self) -> None:
        self._tasks.spawn(self._watch(_now()), "activity events")

    async def stop_watching(self) -> None:
        await self._tasks.cancel()

    def of(self, agreement_id: str) -> list[ExeUnit]:
        return [u for u in self.units.values() if u.agreement_id == agreement_id]

    def _agreement_open(self, agreement_id: str) -> bool:
        return self._market.agreements.get(agreement_id, {}).get("state") in ("Approving", "Approved")

    async def _watch(self, since: str) -> None:
        seen = set()
        async for event in _events_after(self._api, "/activity-api/v1/events", since, "activity events"):
            kind = next(iter(event.get("eventType") or {}), None)
            key = (event.get("activityId"), kind)
            if key in seen or event.get("agreementId") not in self._market.agreements:
                continue  # another provider's activity on this identity
            seen.add(key)
            if kind == "CreateActivity":
                await self._create(event["activityId"], event["agreementId"])
            elif kind == "DestroyActivity":
                self.retire(event["activityId"])

    async def _create(self, activity_id: str, agreement_id: str) -> None:
        if not self._agreement_open(agreement_id):
            logger.warning("activity %s of agreement %s, which is not open", activity_id, agreement_id)
            return
        unit = ExeUnit(activity_id, agreement_id, self._workdir / activity_id, self._api, self._session, self._errors,
                       self.vms)
        service = _GsbService(self._api, self._session, activity_id, unit.handle, self._errors)
        self.units[activity_id] = unit
        self.services[activity_id] = service
        self._market.agreements[agreement_id]["activities"].append(activity_id)
        try:
            await service.open()
            await unit.set_state("Initialized")
        except (TimeoutError, YagnaApiError, aiohttp.ClientError) as e:
            self._errors.append(f"activity {activity_id} not served: {e!r}")
            await self.retire(activity_id)
            return
        self._billing.bill(unit, lambda: self._agreement_open(agreement_id))

    def retire(self, activity_id: str) -> asyncio.Task:
        """End an activity (idempotent): kill, bill its final usage, Terminated, unbind."""
        task = self._retiring.get(activity_id)
        if task is None:
            task = self._retiring[activity_id] = self._retire_tasks.spawn(
                self._retire(self.units[activity_id]), f"retire {activity_id}")
        return task

    async def _retire(self, unit: ExeUnit) -> None:
        await unit.stop()
        if unit.meter.started and self._agreement_open(unit.agreement_id):
            # the requestor sees the usage it will be invoiced for before the agreement ends
            await self._billing.debit_note(unit)
        with contextlib.suppress(YagnaApiError, aiohttp.ClientError, asyncio.TimeoutError):
            await unit.set_state("Terminated")
        await self.services[unit.activity_id].close()

    async def retire_all(self) -> None:
        tasks = [self.retire(activity_id) for activity_id in list(self.units)]
        await asyncio.gather(*tasks, return_exceptions=True)

    def kill_all(self) -> None:
        for unit in self.units.values():
            unit.processes.kill()


# --- the provider -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Parts:
    """What a started provider runs: its HTTP session and the three jobs sharing it."""

    session: aiohttp.ClientSession
    market: _Market
    billing: _Billing
    activities: _Activities


class YagnaTestProvider:
    """A provider selling compute through a real yagna daemon, for integration tests.

    Parameters
    ----------
    api_url, app_key, provider_id, platform
        The daemon's REST API, the provider identity's app key and address, and the payment
        platform (``erc20-hoodi-tglm`` on the offline test stack).
    subnet
        ``golem.node.debug.subnet`` of the offer: only demands in the same subnet match, so
        tests sharing one daemon never meet each other's providers.
    name
        ``golem.node.id.name``.
    threads, mem_gib, storage_gib
        Resources offered.
    price_per_second, price_per_cpu_second, start_price
        The linear price: per second of an activity's duration, per CPU second, per activity.
    debit_note_interval_s
        Period of debit notes while an activity runs (also offered as
        ``golem.com.scheme.payu.debit-note.interval-sec?``).
    invoice_markup
        The invoice claims the final usage's cost times this; above 1 plays a provider that
        overcharges.
    workdir
        Where activities' sandboxes live (one directory each, named by the activity);
        a temporary directory removed by :meth:`close` when not given.
    close_timeout_s
        The most :meth:`close` waits for the daemon before it kills what is left.
    gsb_url
        The daemon's bus: with it, an activity deployed on a requestor's VPN runs in a
        test VM on that network (:mod:`yagna_vpn`); without, such a deploy fails.

    Attributes for tests (snapshots, safe to read from any thread): :attr:`offer_id`,
    :attr:`properties`, :attr:`pricing`, :attr:`agreements`, :attr:`activities`,
    :attr:`debit_notes`, :attr:`invoices`, :attr:`refused`, :attr:`billing_failures`,
    :attr:`errors` (failures of its own background work: a test may assert it stays empty),
    :meth:`sandbox`, :meth:`pids`, :meth:`usage`, :meth:`open_services`, :meth:`wait_for`.

    Examples
    --------
    >>> provider = YagnaTestProvider("http://127.0.0.1:7465", "key", "0xAbC", "erc20-hoodi-tglm", "s1")
    >>> provider.properties["golem.node.debug.subnet"], provider.pricing.price_per_second
    ('s1', Decimal('0.0001'))
    >>> provider.close()  # never started: nothing to release

    With a daemon::

        with YagnaTestProvider(url, key, provider_id, platform, subnet, workdir=tmp_path) as provider:
            ...  # a requestor in `subnet` rents it
            provider.wait_for(lambda: provider.invoices, 30, "an invoice")
    """

    def __init__(self, api_url: str, app_key: str, provider_id: str, platform: str, subnet: str,
                 name: str = "yagna-test-provider", *, threads: int = 2, mem_gib: float = 4.0,
                 storage_gib: float = 10.0, price_per_second: Decimal = Decimal("0.0001"),
                 price_per_cpu_second: Decimal = Decimal("0.0002"), start_price: Decimal = Decimal(0),
                 debit_note_interval_s: float = 2, invoice_markup: Decimal = Decimal(1),
                 workdir: Path | str | None = None, close_timeout_s: float = 20.0,
                 gsb_url: str | None = None) -> None:
        self.api_url = api_url
        self._gsb_url = gsb_url
        self.provider_id = provider_id.lower()
        self.platform = platform
        self.subnet = subnet
        self.name = name
        self.properties = offer_properties(
            provider_id=provider_id, platform=platform, subnet=subnet, name=name, threads=threads, mem_gib=mem_gib,
            storage_gib=storage_gib, price_per_second=price_per_second, price_per_cpu_second=price_per_cpu_second,
            start_price=start_price, debit_note_interval_s=max(1, round(debit_note_interval_s)))
        #: What the requestor computes costs with: the coefficients as published.
        self.pricing = LinearPricing.from_properties(self.properties)
        self.errors: list[str] = []
        self._app_key = app_key
        self._debit_note_interval_s = debit_note_interval_s
        self._markup = Decimal(invoice_markup)
        self._own_workdir = workdir is None
        # made by start(), removed by close() when it is the provider's own
        self._workdir = Path(workdir) if workdir is not None else (
            Path(tempfile.gettempdir()) / f"yagna-provider-{uuid.uuid4().hex[:12]}")
        self._close_timeout_s = close_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._parts: _Parts | None = None
        self._endings: dict[str, asyncio.Task] = {}
        self._ending_tasks = _Tasks(self.errors)
        self._closed = False

    # lifecycle

    def start(self, timeout_s: float = 30.0) -> YagnaTestProvider:
        """Publish the offer and serve; returns once the offer is on the market."""
        if self._thread is not None or self._closed:
            raise RuntimeError("a provider starts once")
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"yagna provider {self.name}",
                                        daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    async def _start(self) -> None:
        session = aiohttp.ClientSession()
        api = _Api(session, self.api_url, self._app_key)
        billing = _Billing(api, self.pricing, self._debit_note_interval_s, self._markup, self.errors)
        market = _Market(api, self.properties, self.subnet, self.provider_id, self.platform,
                         self._on_terminated, self.errors)
        vms = _Vms(self._gsb_url, self.provider_id) if self._gsb_url else None
        activities = _Activities(api, session, self._workdir, market, billing, self.errors, vms)
        self._parts = _Parts(session, market, billing, activities)
        me = await api.call("GET", "/me")
        if str(me.get("identity", "")).lower() != self.provider_id:
            raise RuntimeError(f"the app key belongs to {me.get('identity')}, not to provider {self.provider_id}")
        billing.start()
        activities.start()
        await market.publish()
        logger.info("offer %s published in subnet %s", market.offer_id, self.subnet)

    @property
    def _running(self) -> _Parts:
        if self._parts is None:
            raise RuntimeError("the provider is not started")
        return self._parts

    def _on_terminated(self, agreement_id: str, terminator: str | None) -> None:
        agreement = self._running.market.agreements[agreement_id]
        agreement["state"], agreement["terminator"] = "Terminated", terminator
        self._end(agreement_id, terminate=False)

    def _end(self, agreement_id: str, terminate: bool) -> asyncio.Task:
        task = self._endings.get(agreement_id)
        if task is None:
            task = self._endings[agreement_id] = self._ending_tasks.spawn(
                self._end_agreement(agreement_id, terminate), f"end {agreement_id}")
        return task

    async def _end_agreement(self, agreement_id: str, terminate: bool) -> None:
        parts = self._running
        units = parts.activities.of(agreement_id)
        await asyncio.gather(*(parts.activities.retire(u.activity_id) for u in units), return_exceptions=True)
        if terminate:
            agreement = parts.market.agreements[agreement_id]
            agreement["state"], agreement["terminator"] = "Terminated", "Provider"
            try:
                await parts.market.terminate(agreement_id, "the provider is closing")
            except (TimeoutError, YagnaApiError, aiohttp.ClientError) as e:
                # the requestor may have ended it first; what was used is invoiced all the same
                logger.warning("terminating agreement %s: %s", agreement_id, e)
        await parts.billing.invoice(agreement_id, units)

    def close(self) -> None:
        """Kill every process started, end open agreements (invoiced), unbind, delete the offer.

        Safe to call twice; never waits more than ``close_timeout_s`` for the daemon.
        """
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        try:
            if loop is not None and thread is not None and thread.is_alive():
                try:
                    asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(self._close_timeout_s)
                except Exception as e:  # whatever went wrong, the processes still die below
                    logger.error("provider %s did not close cleanly: %r", self.name, e)
                    self.errors.append(f"close: {e!r}")
                finally:
                    if self._parts is not None:
                        self._parts.activities.kill_all()  # no process outlives close()
                    loop.call_soon_threadsafe(loop.stop)
                    thread.join(10)
            if loop is not None and not loop.is_running():
                loop.close()
        finally:
            if self._own_workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)

    async def _shutdown(self) -> None:
        parts = self._parts
        try:
            if parts is None:
                return
            parts.activities.kill_all()  # first, whatever fails next
            await parts.activities.stop_watching()
            try:
                await parts.market.unpublish()
            except (TimeoutError, YagnaApiError, aiohttp.ClientError) as e:
                self.errors.append(f"offer {parts.market.offer_id} not deleted: {e!r}")
            for agreement_id, agreement in list(parts.market.agreements.items()):
                if agreement["state"] in ("Approving", "Approved"):
                    self._end(agreement_id, terminate=True)
            await asyncio.gather(*self._endings.values(), return_exceptions=True)
            await parts.activities.retire_all()
            if parts.activities.vms is not None:
                await parts.activities.vms.close()
            await parts.billing.stop()
        finally:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if parts is not None:
                await parts.session.close()

    def __enter__(self) -> YagnaTestProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # views for tests

    def _snapshot(self, fn: Callable[[_Parts], Any], default: Any) -> Any:
        """``fn(parts)`` run on the provider's loop (a consistent view), or here once it stopped."""
        parts, loop = self._parts, self._loop
        if parts is None:
            return default
        if loop is not None and loop.is_running() and threading.current_thread() is not self._thread:
            async def view() -> Any:
                return fn(parts)
            return asyncio.run_coroutine_threadsafe(view(), loop).result(10)
        return fn(parts)

    @property
    def offer_id(self) -> str | None:
        return self._parts.market.offer_id if self._parts is not None else None

    @property
    def agreements(self) -> dict[str, dict[str, Any]]:
        """Approved agreements: ``{id: {"state", "terminator", "activities", "demand", "offer"}}``."""
        return self._snapshot(lambda parts: {k: {**v, "activities": list(v["activities"])}
                                             for k, v in parts.market.agreements.items()}, {})

    @property
    def activities(self) -> dict[str, dict[str, Any]]:
        """``{id: {"agreement_id", "state", "sandbox", "pids", "running"}}``."""
        return self._snapshot(lambda parts: {
            k: {"agreement_id": u.agreement_id, "state": u.state, "sandbox": u.sandbox.golem,
                "pids": list(u.processes.pids), "running": u.processes.running}
            for k, u in parts.activities.units.items()}, {})

    @property
    def debit_notes(self) -> list[dict[str, Any]]:
        """Debit notes sent: ``{"id", "agreement_id", "activity_id", "amount", "usage", "status"}``."""
        return self._snapshot(lambda parts: [dict(d) for d in parts.billing.debit_notes], [])

    @property
    def invoices(self) -> list[dict[str, Any]]:
        """Invoices sent: ``{"id", "agreement_id", "activity_ids", "amount", "usage", "status"}``."""
        return self._snapshot(lambda parts: [dict(d) for d in parts.billing.invoices], [])

    @property
    def refused(self) -> list[dict[str, str]]:
        """Proposals and agreements refused, each with its reason."""
        return self._snapshot(lambda parts: list(parts.market.refused), [])

    @property
    def billing_failures(self) -> list[str]:
        """Debit notes and invoices the daemon would not take."""
        return self._snapshot(lambda parts: list(parts.billing.failures), [])

    def sandbox(self, activity_id: str) -> Path:
        """The directory standing for the activity's ``/golem``."""
        return Sandbox(self._workdir / activity_id).golem

    def pids(self, activity_id: str | None = None) -> list[int]:
        """Processes started (for one activity, or all), whether or not they still run."""
        return [pid for k, a in self.activities.items() if activity_id in (None, k) for pid in a["pids"]]

    def usage(self, activity_id: str) -> tuple[float, float]:
        """``(duration_sec, cpu_sec)`` of an activity, as its next debit note would carry it."""
        return self._snapshot(lambda parts: parts.activities.units[activity_id].meter.usage(), (0.0, 0.0))

    def open_services(self) -> int:
        """GSB services whose websocket is still open."""
        return self._snapshot(lambda parts: sum(s.is_open for s in parts.activities.services.values()), 0)

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
        """Poll ``predicate`` until it returns something true; that value, or TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout_s} s (provider errors: {self.errors})")
            time.sleep(interval_s)
