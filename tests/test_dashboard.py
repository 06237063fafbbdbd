"""The Golem page of the Dask dashboard, opened in a real browser.

Headless chromium loads ``/golem`` from a running cluster's scheduler; the test reads
the page the browser built (``--dump-dom``) and a screenshot of it, kept as a test
artefact in ``$GOLEM_DASK_ARTEFACTS`` (default ``build/test-artefacts``).  On a machine
without chromium the browser tests skip; with ``GOLEM_DASK_REQUIRE_CHROMIUM=1`` (set by
CI) they fail instead.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client

from golem_dask import GolemCluster
from golem_dask.dashboard import PALETTE, SpendHistory
from golem_dask.payment.bill import plain
from golem_dask.protocol import properties as P

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ARTEFACTS = Path(os.environ.get("GOLEM_DASK_ARTEFACTS", Path(__file__).resolve().parent.parent / "build" /
                                "test-artefacts"))


@pytest.fixture
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("GOLEM_DASK_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed (apt-get install chromium) (GOLEM_DASK_REQUIRE_CHROMIUM=1)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def browse(chromium: str, url: str, profile: Path, *args: str) -> str:
    """What headless chromium makes of ``url`` (``--dump-dom``, or ``args`` such as a screenshot)."""
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={profile}", *(args or ("--dump-dom",)), url],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rows(dom: str) -> list[list[str]]:
    """The cells of the page's worker table, as the browser built it."""
    table = re.search(r"<table id=\"golem-workers\">(.*?)</table>", dom, re.S)
    assert table is not None, dom[:2000]
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr class=\"golem-worker\">(.*?)</tr>", table.group(1), re.S)]


def test_the_golem_page_shows_each_worker_and_the_spend_in_a_browser(chromium: str, tmp_path: Path) -> None:
    data = np.arange(1_000_000, dtype="f8")
    with GolemCluster(n_workers=2, cpu=1, memory="1GiB", budget="1") as cluster, Client(cluster) as client:
        x = da.from_array(data, chunks=100_000)
        assert float((x ** 2).sum().compute()) == float((data ** 2).sum())
        base = cluster.dashboard_link.rsplit("/", 1)[0]
        assert 'href="golem"' in urllib.request.urlopen(f"{base}/status", timeout=10).read().decode()
        time.sleep(2.5)  # a few samples of the spend
        running = rows(browse(chromium, f"{base}/golem", tmp_path / "profile"))
        accounts = {a.worker: a for a in cluster.accountant.accounts.values()}
        assert sorted(r[0] for r in running) == sorted(accounts) and len(running) == 2
        for worker, provider, price, state, _cpu, _time, cost in running:
            agreement = accounts[worker].agreement
            assert provider.startswith(str(agreement.offer.properties[P.NODE_NAME]))
            assert agreement.provider_id[:10] in provider
            assert price.startswith(f"{plain(accounts[worker].pricing.price_per_cpu_hour)}/cpu-h")
            assert state == "running" and Decimal(0) < Decimal(cost) < Decimal(1)

        cluster.scale(0)
        deadline = time.monotonic() + 60
        while any(e.status != "paid" for e in cluster.bill().entries) and time.monotonic() < deadline:
            time.sleep(0.2)
        bill = cluster.bill()
        assert [e.status for e in bill.entries] == ["paid", "paid"]
        dom = browse(chromium, f"{base}/golem", tmp_path / "profile")
        # Once paid, each row's cost is what its provider was paid.
        assert {r[0]: (r[3], Decimal(r[6])) for r in rows(dom)} == {e.worker: ("paid", e.amount) for e in bill.entries}
        assert f"spent {plain(bill.total)} GLM" in html.unescape(dom)
        spend = json.loads(urllib.request.urlopen(f"{base}/golem.json", timeout=10).read())["spend"]
        lines = re.findall(r"<polyline class=\"golem-provider\"[^>]*points=\"([^\"]+)\"", dom)
        assert len(lines) == len(spend) >= 1 and all(len(p.split()) >= 3 for p in lines)

        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTEFACTS / "dashboard-golem.png"
        shot.unlink(missing_ok=True)
        browse(chromium, f"{base}/golem", tmp_path / "profile", f"--screenshot={shot}", "--window-size=1000,760")
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(shot)
    # The chart rendered: the first provider's line colour is on the screenshot.
    colour = np.array([int(PALETTE[0][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    assert (np.abs(image[..., :3] - colour).max(axis=-1) < 0.02).sum() > 200


def test_the_spend_chart_draws_one_line_per_provider_and_escapes_names() -> None:
    history = SpendHistory(limit=4)
    for t in range(6):
        history.add(float(t), {"<b>a</b>": Decimal(t), "b": Decimal(2 * t)})
    assert len(history.samples) <= 4 and history.samples[-1][0] == 5.0  # halved when full, newest kept
    svg = history.svg()
    assert svg.count("<polyline") == 2 and "<b>" not in svg and "&lt;b&gt;a&lt;/b&gt;" in svg
    # The larger series reaches the top of the plot, the smaller one half way.
    tops = [min(float(p.split(",")[1]) for p in pts.split()) for pts in re.findall(r"points='([^']+)'", svg)]
    assert tops[1] == 20.0 and tops[0] == pytest.approx(20 + 220 / 2)


def test_status_lists_the_running_clusters_with_their_workers_and_money(tmp_path: Path) -> None:
    import sys

    env = {**os.environ, "DASK_GOLEM__PAYMENT__DATA_DIR": str(tmp_path)}
    status = [sys.executable, "-m", "golem_dask.cli", "status"]
    with dask.config.set({"golem.payment.data-dir": str(tmp_path)}), \
            GolemCluster(n_workers=1, cpu=1, memory="1GiB", budget="1") as cluster, Client(cluster):
        listed = json.loads(subprocess.run([*status, "--json"], env=env, capture_output=True, text=True,
                                           timeout=60, check=True).stdout)
        text = subprocess.run(status, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
        assert [c["name"] for c in listed] == [cluster.name] and listed[0]["pid"] == os.getpid()
        (worker,) = listed[0]["workers"]
        agreement = next(iter(cluster.accountant.accounts.values())).agreement
        assert worker["worker"] == "golem-0" and agreement.provider_id[:10] in worker["provider"]
        assert listed[0]["money"].endswith("of 1 GLM left (erc20-devnet-glm)")
        assert f"{cluster.name} (process {os.getpid()})" in text and "worker=golem-0" in text
    after = subprocess.run(status, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert after.startswith("no GolemCluster is running on this machine")


def test_the_served_page_escapes_what_strangers_name_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    from golem_dask import dashboard
    from golem_dask.display import WorkerLine

    hostile = "<script>alert(1)</script>"
    line = WorkerLine("golem-0", f"{hostile} (0xabc…)", "0.1/cpu-h + 0.02/h", "running", Decimal(1), Decimal(2),
                      Decimal("0.5"))
    monkeypatch.setattr(dashboard, "worker_lines", lambda cluster: [line])
    monkeypatch.setattr(dashboard, "money_line", lambda cluster, lines: f"spent 0 GLM {hostile}")

    class Cluster:
        pass

    cluster = Cluster()
    view = dashboard.GolemView(cluster)
    view.history.add(0.0, {line.provider: Decimal(0)})
    view.history.add(1.0, {line.provider: Decimal("0.5")})
    page = view.page()
    assert "<script>" not in page and page.count("&lt;script&gt;") >= 3  # table, money line, chart
    assert json.loads(json.dumps(view.data()))["workers"][0]["provider"] == f"{hostile} (0xabc…)"  # data stays data
