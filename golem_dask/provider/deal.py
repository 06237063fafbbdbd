"""One agreement on the provider's side: its slice, its activity, its meter and its bill.

A :class:`Deal` runs the agreement's one activity through the exe-script (``deploy``,
``start``, ``transfer``, ``run``, ``terminate``), reports its states, watches the worker,
sends debit notes while it runs, ends the agreement when accepted debit notes are not paid
within the agreed payment timeout, and stops it (always, also after a failure).  The
:class:`~golem_dask.provider.agent.ProviderAgent` owns the deals; a deal knows only its
own agreement and how to send a message to its requestor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any

from golem_dask import config
from golem_dask.errors import ActivityError
from golem_dask.protocol.messages import Activity, ActivityState, Agreement, DebitNote, ExeCommand, Invoice
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.protocol.sealing import activity_aad, open_command
from golem_dask.protocol import properties as P
from golem_dask.protocol.properties import Resources
from golem_dask.provider.metering import UsageMeter
from golem_dask.provider.runtime.base import RuntimeActivity
from golem_dask.tasks import Tasks
from golem_dask.transfer import scrub_urls

logger = logging.getLogger(__name__)

Send = Callable[[Activity | DebitNote | Invoice], Awaitable[None]]


class Deal:
    """The provider's state for one agreement.

    Parameters
    ----------
    agreement:
        As approved.
    resources:
        The slice it rents.
    send:
        Delivers an activity state or a debit note to the requestor.
    debit_note_interval_s:
        How often a running activity's usage is billed.
    unseal:
        Opens what the requestor sealed to the provider (its wallet's ``unseal``).
    on_end:
        Called with the reason when the worker exits on its own: an agreement buys one
        activity, so the provider ends the agreement (and invoices it) then, rather than
        hold its slice, unbilled, until it expires.
    """

    def __init__(self, agreement: Agreement, resources: Resources, send: Send, debit_note_interval_s: float,
                 unseal: Callable[[bytes, bytes], bytes],
                 on_end: Callable[[str], Awaitable[Any]] | None = None) -> None:
        self.agreement = agreement
        self.resources = resources
        self.activity: RuntimeActivity | None = None
        self.meter = UsageMeter()
        self.ending = False  # terminate() began: the slice is free again
        self.stopped = False  # the activity was stopped
        self.deployed = False  # the image passed its checks: only then may the activity start
        self._exec_lock = asyncio.Lock()  # one exe-script at a time: a requestor cannot hog the transfer threads
        self.invoice: Invoice | None = None
        self._send = send
        self._interval_s = debit_note_interval_s
        self._unseal = unseal
        self._on_end = on_end
        self._tasks = Tasks()
        self._discard_at: asyncio.TimerHandle | None = None  # a stopped activity's files are kept
        self.paid = Decimal(0)  # what the requestor paid for this agreement (checked on chain by a daemon)
        self._notes: dict[str, Decimal] = {}  # debit notes sent and not yet accepted: id -> total due
        self._dues: list[tuple[float, Decimal]] = []  # accepted notes: (loop-time deadline, amount)

    def __repr__(self) -> str:
        return f"<Deal {self.agreement.id[:8]} {self.resources}>"

    @property
    def pricing(self) -> LinearPricing:
        return LinearPricing.from_properties(self.agreement.offer.properties)

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` for as long as the deal lives (cancelled by :meth:`cancel_tasks`)."""
        self._tasks.spawn(coro)

    def cancel_tasks(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def state(self, state: ActivityState, reason: str | None = None) -> None:
        if self.activity is not None:
            await self._send(Activity(self.activity.activity_id, self.agreement.id, state, reason))

    async def exec(self, commands: Sequence[ExeCommand]) -> list[str]:
        """Run an exe-script; the first failing command fails the activity."""
        act = self.activity
        assert act is not None
        outputs: list[str] = []
        async with self._exec_lock:
            for index, cmd in enumerate(commands):
                try:
                    outputs.append(await self._command(act, cmd))
                except Exception as e:  # the reason crosses the hub in clear: no signed URL in it
                    reason = scrub_urls(f"command {index} ({cmd.command}) failed: {e}")
                    logger.warning("activity %s: %s", act.activity_id, reason)
                    await self.stop(ActivityState.FAILED, reason)
                    raise ActivityError(reason) from e
        return outputs

    async def _command(self, act: RuntimeActivity, cmd: ExeCommand) -> str:
        if cmd.command == "deploy":
            output = await act.deploy()
            self.deployed = True
            await self.state(ActivityState.DEPLOYED)
        elif cmd.command == "start":
            if not self.deployed:
                raise ActivityError("start before deploy: the exe-script must deploy its image first, which checks "
                                    "that this provider runs it")
            output = await act.start()
            await self.state(ActivityState.READY)
        elif cmd.command == "run":
            output = await act.run(cmd.args["entry_point"], list(cmd.args.get("args", ())),
                                   dict(cmd.args.get("env", {})))
            self.meter.start()
            self.spawn(self._watch())
            self.spawn(self._debit_notes())
            await self.state(ActivityState.RUNNING)
        elif cmd.command == "transfer":
            args = open_command(cmd.args, self._unseal, activity_aad(self.agreement.id, act.activity_id))
            options = args.get("options")
            output = await act.transfer(args["from"], args["to"], dict(options) if options else None)
        else:  # "terminate": ExeCommand admits no other
            await self.stop(ActivityState.TERMINATED, "exe-script terminate")
            output = "terminated"
        return output

    async def _watch(self) -> None:
        """Report a command that exits on its own as a failed activity."""
        act = self.activity
        assert act is not None
        code = await act.wait()
        if not self.ending and not self.stopped:
            tail = "\n".join(act.logs().splitlines()[-20:])
            await self.stop(ActivityState.FAILED, f"worker exited with code {code}\n{tail}", keep_sandbox=True)
            if self._on_end is not None:
                await self._on_end(f"its worker exited with code {code}")

    async def _debit_notes(self) -> None:
        pricing = self.pricing
        act = self.activity
        assert act is not None
        while True:
            await asyncio.sleep(self._interval_s)
            if self.stopped:
                return
            self.meter.record_cpu(await act.cpu_seconds())
            usage = self.meter.usage()
            note = DebitNote(
                agreement_id=self.agreement.id,
                activity_id=act.activity_id,
                usage=usage,
                total_amount_due=pricing.cost(usage),
                issuer_id=self.agreement.provider_id,
                recipient_id=self.agreement.requestor_id,
            )
            self._notes[note.id] = note.total_amount_due
            await self._send(note)

    # -- paid as it goes --------------------------------------------------------------

    @property
    def payment_timeout_s(self) -> float | None:
        """The agreed time to pay an accepted debit note (``golem.com.scheme.payu.payment-timeout-sec?``
        in the demand); ``None``: everything is paid after the invoice."""
        raw = self.agreement.demand.properties.get(P.PAYMENT_TIMEOUT)
        try:
            return float(raw) if raw else None
        except (TypeError, ValueError):
            return None

    def accepted(self, note_id: str, amount: Decimal) -> bool:
        """The requestor accepted one of this deal's debit notes (False: not one of ours).
        Under pay-as-you-go terms, ``amount`` (at most what the note asked) is then due within
        the payment timeout, plus ``golem.provider.payment-grace`` for the chain."""
        asked = self._notes.pop(note_id, None)
        if asked is None:
            return False
        timeout = self.payment_timeout_s
        if timeout is not None and not self.ending:
            deadline = asyncio.get_running_loop().time() + timeout + config.seconds("provider.payment-grace")
            first = not self._dues
            self._dues.append((deadline, min(amount, asked)))
            if first:
                self.spawn(self._enforce_payment())
        return True

    def credit(self, paid: Decimal) -> None:
        """The requestor's payments for this agreement now total ``paid``."""
        self.paid = max(self.paid, paid)

    def overdue(self) -> Decimal | None:
        """The largest accepted amount whose time to pay passed and that is not paid."""
        now = asyncio.get_running_loop().time()
        due = max((amount for deadline, amount in self._dues if deadline <= now), default=Decimal(0))
        self._dues = [(d, a) for d, a in self._dues if a > self.paid]
        return due if due > self.paid else None

    async def _enforce_payment(self) -> None:
        """End the agreement when the requestor does not pay what it accepted in time: a
        provider is not obliged to run on credit past the terms it agreed to."""
        loop = asyncio.get_running_loop()
        while self._dues and not self.ending:
            await asyncio.sleep(max(0.05, min(d for d, _ in self._dues) - loop.time()))
            owed = self.overdue()
            if owed is not None and self._on_end is not None:
                await self._on_end(f"not paid on time: {owed} GLM of accepted debit notes was due within "
                                   f"{self.payment_timeout_s:g}s (golem.com.scheme.payu.payment-timeout-sec) "
                                   f"and {self.paid} GLM was paid")
                return

    async def stop(self, state: ActivityState, reason: str, keep_sandbox: bool = False) -> None:
        """Stop the activity (once), with its last CPU reading, and report ``state``.

        With ``keep_sandbox`` its files stay for the requestor to collect its outputs
        (:meth:`collect`) until it destroys the activity or ``golem.provider.output-grace``
        passes.
        """
        act = self.activity
        if act is None or self.stopped:
            return
        self.stopped = True
        try:
            self.meter.record_cpu(await act.cpu_seconds())
            await act.terminate(keep_sandbox=keep_sandbox)
            self.meter.record_cpu(await act.cpu_seconds())
        finally:
            self.meter.stop()
            await self.state(state, reason)
        if keep_sandbox:
            self._discard_at = asyncio.get_running_loop().call_later(
                config.seconds("provider.output-grace"), lambda: asyncio.ensure_future(self.discard()))

    async def collect(self, commands: Sequence[ExeCommand]) -> list[str]:
        """Run the output transfers of a stopped activity whose sandbox is kept."""
        act = self.activity
        if act is None or self._discard_at is None:
            raise ActivityError("the activity is stopped and its files are gone")
        outputs = []
        for cmd in commands:
            args = open_command(cmd.args, self._unseal, activity_aad(self.agreement.id, act.activity_id)) \
                if cmd.command == "transfer" else {}
            if cmd.command != "transfer" or not str(args.get("from", "")).startswith("/golem/"):
                raise ActivityError("the activity is stopped: only its outputs (transfers out of /golem) can "
                                    f"be collected, for golem.provider.output-grace; not {cmd.command}")
            options = args.get("options")
            outputs.append(await act.transfer(args["from"], args["to"], dict(options) if options else None))
        return outputs

    async def discard(self) -> None:
        """Remove the files of a stopped activity (once)."""
        handle, self._discard_at = self._discard_at, None
        if handle is not None:
            handle.cancel()
            if self.activity is not None:
                await self.activity.discard()
