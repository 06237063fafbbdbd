"""The Golem page of the Dask dashboard: each worker's provider, price, state, usage and
cost so far, the money line, and a chart of the spend over time per provider.

The scheduler of a :class:`~golem_dask.cluster.GolemCluster` serves it with the rest of
its dashboard (``/golem``, linked from the dashboard's top bar; ``/golem.json`` gives
the same data to a program).  The dashboard listens on the requestor's loopback only.
The spend is sampled once a second while the scheduler runs; provider names come from
strangers' offers and are escaped.

Each running cluster is listed in ``<golem.payment.data-dir>/clusters/`` (its process,
name and dashboard) until its scheduler closes: ``golem-dask status`` reads that list
and each cluster's ``/golem.json``.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import os
import time
import weakref
from pathlib import Path
from decimal import Decimal
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web
from tornado.ioloop import PeriodicCallback

from golem_dask import config
from golem_dask.display import HEADER, cells, money_line, worker_lines
from golem_dask.payment.bill import plain

logger = logging.getLogger(__name__)

#: Samples kept; when full, every other one is dropped (the chart keeps its whole span).
HISTORY_LIMIT = 1800
#: Line colours of the chart, one per provider in the order they first appear.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


class SpendHistory:
    """The cost so far of each provider's workers, sampled over time.

    Examples
    --------
    >>> h = SpendHistory()
    >>> h.add(0.0, {"a": Decimal("0"), "b": Decimal("1")})
    >>> h.add(10.0, {"a": Decimal("2"), "b": Decimal("1")})
    >>> h.series()["a"]
    [(0.0, Decimal('0')), (10.0, Decimal('2'))]
    """

    def __init__(self, limit: int = HISTORY_LIMIT) -> None:
        self.limit = limit
        self.samples: list[tuple[float, dict[str, Decimal]]] = []

    def add(self, t: float, costs: dict[str, Decimal]) -> None:
        self.samples.append((t, dict(costs)))
        if len(self.samples) > self.limit:
            self.samples = self.samples[::2]

    def series(self) -> dict[str, list[tuple[float, Decimal]]]:
        """Per provider, its (time, cost) points, in the order providers first appear."""
        out: dict[str, list[tuple[float, Decimal]]] = {}
        for t, costs in self.samples:
            for provider, cost in costs.items():
                out.setdefault(provider, []).append((t, cost))
        return out

    def svg(self, width: int = 760, height: int = 280) -> str:
        """The spend over time as an inline SVG chart, one polyline per provider."""
        series = self.series()
        left, right, top, bottom = 70, 190, 20, 40
        plot_w, plot_h = width - left - right, height - top - bottom
        points = [p for s in series.values() for p in s]
        t0 = min((t for t, _ in points), default=0.0)
        span = max((t for t, _ in points), default=0.0) - t0 or 1.0
        peak = max((c for _, c in points), default=Decimal(0)) or Decimal(1)
        parts = [f"<svg id='golem-spend' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
                 f"role='img' aria-label='spend over time per provider'>",
                 f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' stroke='#999'/>",
                 f"<text x='{left}' y='{height - 10}' font-size='12'>0 s</text>",
                 f"<text x='{left + plot_w}' y='{height - 10}' font-size='12' text-anchor='end'>{span:.0f} s</text>",
                 f"<text x='{left - 6}' y='{top + 12}' font-size='12' text-anchor='end'>{peak:.3g}</text>",
                 f"<text x='{left - 6}' y='{top + plot_h}' font-size='12' text-anchor='end'>0</text>",
                 f"<text x='{left + plot_w / 2}' y='{height - 10}' font-size='12' text-anchor='middle'>"
                 "time; GLM per provider so far</text>"]
        for i, (provider, s) in enumerate(series.items()):
            colour = PALETTE[i % len(PALETTE)]
            xy = " ".join(f"{left + (t - t0) / span * plot_w:.1f},{top + plot_h - float(c / peak) * plot_h:.1f}"
                          for t, c in s)
            if len(s) == 1:  # one sample: a dot, so it shows
                xy += f" {left + (s[0][0] - t0) / span * plot_w + 2:.1f},{xy.split(',')[1]}"
            name = html.escape(provider)
            parts.append(f"<polyline class='golem-provider' data-provider='{name}' fill='none' stroke='{colour}' "
                         f"stroke-width='3' points='{xy}'/>")
            y = top + 14 + 18 * i
            parts.append(f"<rect x='{left + plot_w + 12}' y='{y - 10}' width='12' height='12' fill='{colour}'/>"
                         f"<text x='{left + plot_w + 30}' y='{y}' font-size='12'>{html.escape(provider[:22])}</text>")
        parts.append("</svg>")
        return "".join(parts)


class GolemView:
    """What the page shows of one cluster (held weakly: the page outlives no cluster)."""

    def __init__(self, cluster: Any) -> None:
        self._cluster = weakref.ref(cluster)
        self.history = SpendHistory()
        self.started = time.time()

    def lines(self) -> list[Any]:
        cluster = self._cluster()
        return worker_lines(cluster) if cluster is not None else []

    def sample(self, lines: list[Any] | None = None) -> None:
        """Record each provider's cost so far (from ``lines``, if the caller has them)."""
        costs: dict[str, Decimal] = {}
        for line in self.lines() if lines is None else lines:
            costs[line.provider] = costs.get(line.provider, Decimal(0)) + line.cost
        if costs:
            self.history.add(time.time() - self.started, costs)

    def data(self) -> dict[str, Any]:
        cluster, lines = self._cluster(), self.lines()
        return {
            "workers": [dict(zip(HEADER, cells(w), strict=True)) for w in lines],
            "money": money_line(cluster, lines) if cluster is not None else "the cluster is closed",
            "spend": {p: [[t, str(c)] for t, c in s] for p, s in self.history.series().items()},
        }

    def page(self) -> str:
        cluster, lines = self._cluster(), self.lines()
        self.sample(lines)
        head = "".join(f"<th>{h}</th>" for h in HEADER)
        body = "".join("<tr class='golem-worker'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(w))
                       + "</tr>" for w in lines)
        money = html.escape(money_line(cluster, lines)) if cluster is not None else "the cluster is closed"
        return ("<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
                "<title>Golem</title><style>body{font-family:sans-serif;margin:1.5em}"
                "table{border-collapse:collapse}td,th{text-align:left;padding:3px 10px;border-bottom:1px solid #ddd}"
                "</style></head><body><p><a href='status'>&larr; dashboard</a></p><h2>Golem</h2>"
                f"<p id='golem-money'>{money}</p><table id='golem-workers'><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table><h3>Spend over time</h3>{self.history.svg()}</body></html>")


def attach(scheduler: Any, cluster: Any) -> None:
    """Show ``cluster`` on ``scheduler``'s dashboard: sample its spend, link the page."""
    if getattr(scheduler, "golem_view", None) is not None:
        return
    view = scheduler.golem_view = GolemView(cluster)
    callback = PeriodicCallback(view.sample, 1000)
    scheduler.periodic_callbacks["golem-spend"] = callback
    callback.start()
    link = getattr(cluster, "dashboard_link", None)
    if link:
        _Registered(scheduler, cluster.name, link.rsplit("/", 1)[0])
    try:  # the dashboard's top bar (only with bokeh, which serves that bar)
        from distributed.dashboard.scheduler import template_variables

        pages = template_variables(scheduler)["pages"]
        if "golem" not in pages:
            pages.append("golem")
    except ImportError:
        pass


def registry() -> Path:
    """Where running clusters are listed (``<golem.payment.data-dir>/clusters``)."""
    return Path(config.data_dir()) / "clusters"


def running_clusters() -> list[dict[str, Any]]:
    """The clusters listed in :func:`registry` whose process still runs (stale entries go)."""
    import psutil

    found = []
    for entry in sorted(registry().glob("*.json")):
        try:
            record = json.loads(entry.read_text())
            alive = psutil.pid_exists(int(record["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive:
            found.append(record)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return found


class _Registered(SchedulerPlugin):
    """A scheduler plugin that lists its cluster in :func:`registry` until it closes."""

    name = "golem-registry"

    def __init__(self, scheduler: Any, cluster_name: str, dashboard: str) -> None:
        # Named by process and scheduler: cluster names are the user's (any text, maybe repeated).
        self.path = registry() / f"{os.getpid()}-{id(scheduler):x}.json"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"pid": os.getpid(), "name": cluster_name, "dashboard": dashboard,
                                             "scheduler": scheduler.address, "started": time.time()}))
        except OSError as e:  # a listing for 'golem-dask status' is no reason to fail a cluster
            logger.info("could not list this cluster in %s: %s", self.path.parent, e)
            return
        scheduler.add_plugin(self)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class _Handler(web.RequestHandler):
    def initialize(self, dask_server: Any = None) -> None:
        self.server = dask_server

    def view(self) -> GolemView:
        view = getattr(self.server, "golem_view", None)
        if view is None:
            raise web.HTTPError(404, "this scheduler runs no Golem cluster")
        return view


class GolemPage(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(self.view().page())


class GolemJSON(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.view().data()))


#: Served by the scheduler's HTTP server (``distributed.scheduler.http.routes``).
routes: list[tuple[str, type, dict[str, Any]]] = [("golem", GolemPage, {}), ("golem.json", GolemJSON, {})]
