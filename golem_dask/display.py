"""What a cluster shows its user: each worker's provider, price, state, usage and cost so
far, and the money (spent, reserved, left of the budget).

:class:`ClusterDisplay` gives :class:`~golem_dask.cluster.GolemCluster` its notebook repr
(dask's cluster widget refreshes it every couple of seconds) and :func:`status_text` the
same table for a terminal.  Provider names come from strangers' offers: they are escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from golem_dask.payment.bill import EntryStatus, plain
from golem_dask.protocol import properties as P


@dataclass(frozen=True, slots=True)
class WorkerLine:
    """One agreement as the user sees it."""

    worker: str
    provider: str
    price: str
    state: str
    cpu_sec: Decimal
    duration_sec: Decimal
    cost: Decimal


def worker_lines(cluster: Any) -> list[WorkerLine]:
    """Every agreement of ``cluster`` in the order signed, running ones with their cost so
    far (the last accepted debit note, or our metering if newer), ended ones with what was accepted."""
    lines = []
    for account in list(cluster.accountant.accounts.values()):
        note, invoice = account.last_debit_note, account.invoice
        usage = invoice.usage if invoice is not None else (note.usage if note is not None else {})
        running = account.status is EntryStatus.RUNNING
        if running:
            state = "running" if account.started is not None else "starting"
            # The last debit note, or our own metering priced by the agreement when it is newer.
            metered = account.pricing.cost({P.USAGE_CPU_SEC: account.observed_cpu_sec,
                                            P.USAGE_DURATION_SEC: account.duration()}) if account.started else Decimal(0)
            cost = max(note.total_amount_due if note is not None else Decimal(0), metered)
        else:
            state = account.status.value
            cost = account.amount or account.paid
        offer = account.agreement.offer.properties
        name = str(offer.get(P.NODE_NAME) or account.agreement.provider_id)
        price = (f"{plain(account.pricing.price_per_cpu_hour)}/cpu-h + {plain(account.pricing.price_per_hour)}/h"
                 + (f" + {plain(account.pricing.start_price)} start" if account.pricing.start_price else ""))
        lines.append(WorkerLine(account.worker, f"{name} ({account.agreement.provider_id[:10]}…)", price, state,
                                Decimal(usage.get(P.USAGE_CPU_SEC, account.observed_cpu_sec)),
                                Decimal(usage.get(P.USAGE_DURATION_SEC, account.duration())), cost))
    return lines


def money_line(cluster: Any, lines: list[WorkerLine]) -> str:
    """Spent, accruing (``lines`` still running), reserved and left of the budget."""
    budget = cluster.budget
    accruing = sum((w.cost for w in lines if w.state in ("running", "starting")), Decimal(0))
    return (f"spent {plain(budget.spent)} GLM, {plain(accruing)} GLM accruing, {plain(budget.reserved)} GLM "
            f"reserved; {plain(max(Decimal(0), budget.remaining))} of {plain(budget.total)} GLM left "
            f"({cluster.spec.platform})")


HEADER = ("worker", "provider", "price GLM", "state", "CPU s", "time s", "cost GLM")


def cells(w: WorkerLine) -> tuple[str, ...]:
    return (w.worker, w.provider, w.price, w.state, f"{w.cpu_sec:.1f}", f"{w.duration_sec:.1f}", plain(w.cost))


def progress_lines(cluster: Any) -> list[str]:
    """The cluster's progress (offers, agreements, workers by stage) and its last hint."""
    progress = getattr(cluster, "progress", None)
    if progress is None:
        return []
    return [f"progress: {progress.line()}", *([f"hint: {progress.hint}"] if progress.hint else [])]


def status_text(cluster: Any) -> str:
    """The workers and the money, as a plain-text table, and the progress."""
    lines = worker_lines(cluster)
    rows = [HEADER, *(cells(w) for w in lines)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([*table, money_line(cluster, lines), *progress_lines(cluster)])


def status_html(cluster: Any) -> str:
    """The workers and the money, as an HTML table (every value escaped)."""
    lines = worker_lines(cluster)
    head = "".join(f"<th style='text-align:left'>{h}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in cells(w)) + "</tr>"
                   for w in lines)
    progress = "".join(f"<p style='margin:0'>{html.escape(line)}</p>" for line in progress_lines(cluster))
    return (f"<div><h4 style='margin-bottom:0'>Golem</h4><p>{html.escape(money_line(cluster, lines))}</p>{progress}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


class ClusterDisplay:
    """The notebook repr of a cluster: dask's, with the Golem table as its status."""

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        ours = status_html(self) if hasattr(self, "accountant") else ""
        return super()._repr_html_(cluster_status=ours + (cluster_status or ""))  # type: ignore[misc, no-any-return]
