"""The progress a user sees while workers come up: counted from the cluster's events,
printed in place on a terminal, and the hint when nothing matches."""

from __future__ import annotations

import io
import time

import dask
import pytest

from golem_dask import GolemCluster
from golem_dask.errors import NoOffersError
from golem_dask.events import EventLog
from golem_dask.progress import Progress, TerminalProgress

LIVE = "\r\x1b[Kgolem: "


def test_on_a_terminal_one_line_is_rewritten_and_ended_once_every_worker_runs() -> None:
    log, out = EventLog(), io.StringIO()
    progress = Progress(log, wanted=lambda: 1)
    TerminalProgress(progress, log, stream=out, live=True, min_interval_s=0)
    log.emit("rejected", "offer from a refused", reason="golem.inf.mem.gib>=4 (offer has 1)")
    log.emit("offer", "offer from b")
    log.emit("agreement", "agreement with b", worker="golem-0")
    log.emit("hint", "nothing matched for 10s: ...")
    log.emit("activity", "golem-0: transfer: ok", worker="golem-0", command="transfer")
    log.emit("worker", "worker golem-0 ready", worker="golem-0", state="running")
    log.emit("payment", "paid 1 GLM")  # not progress: nothing printed
    assert out.getvalue() == (
        f"{LIVE}1 offer (1 refused: 1 short of memory); 0 agreements; workers 0/1 running"
        f"{LIVE}2 offers (1 refused: 1 short of memory); 0 agreements; workers 0/1 running"
        f"{LIVE}2 offers (1 refused: 1 short of memory); 1 agreement; workers 0/1 running, 1 deploying"
        "\ngolem: nothing matched for 10s: ...\n"
        f"{LIVE}2 offers (1 refused: 1 short of memory); 1 agreement; workers 0/1 running, 1 starting"
        f"{LIVE}2 offers (1 refused: 1 short of memory); 1 agreement; workers 1/1 running\n")


def test_a_cluster_nothing_matches_says_what_is_refused_and_what_to_relax(capsys: pytest.CaptureFixture[str]) -> None:
    dear = [{"name": f"dear-{i}", "cpu": 1, "memory": "4GiB", "storage": "10GiB", "runtime": "process",
             "price-per-cpu-hour": "0.9", "price-per-hour": "0.02", "start-price": "0"} for i in range(2)]
    settings = {"golem.provider.local": dear, "golem.market.negotiation-timeout": "4s",
                "golem.market.hint-after": "2s", "golem.cluster.progress": True}
    started = time.monotonic()
    with dask.config.set(settings), pytest.raises(NoOffersError) as info:
        GolemCluster(n_workers=1, budget="1", max_price_per_cpu_hour="0.1")
    assert time.monotonic() - started < 20
    relax = "2 offers were rejected: 2 over max_price_per_cpu_hour=0.1; to match more: raise max_price_per_cpu_hour (0.1)"
    assert str(info.value).endswith(relax)
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("golem: ")]
    hints = [line for line in printed if "nothing matched for 2s" in line]
    assert len(hints) == 1 and hints[0].endswith(relax), printed


def test_only_a_python_patch_release_difference_is_kept_out_of_the_users_warnings() -> None:
    import sys
    import warnings

    from distributed.utils import asciitable
    from distributed.versions import VersionMismatchWarning

    from golem_dask.events import quiet_expected_noise

    here = f"{sys.version_info.major}.{sys.version_info.minor}"

    def table(*rows: list[str]) -> str:
        return "Mismatched versions found\n\n" + asciitable(["Package", "Client", "Scheduler", "Workers"], list(rows))

    patch = table(["python", f"{here}.7.final.0", f"{here}.7.final.0", f"{here}.2.final.0"])
    minor = table(["python", f"{here}.7.final.0", f"{here}.7.final.0", "3.99.0.final.0"])
    more = table(["python", f"{here}.7.final.0", f"{here}.7.final.0", f"{here}.2.final.0"], ["numpy", "2.0", "2.0", "1.0"])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_expected_noise()
        for message in (patch, minor, more):
            warnings.warn(VersionMismatchWarning(message))
    assert [str(w.message) for w in shown] == [minor, more]


def test_a_terminal_that_went_away_ends_the_printing_without_an_error() -> None:
    log, out = EventLog(), io.StringIO()
    progress = Progress(log, wanted=lambda: 2)
    progress.terminal = TerminalProgress(progress, log, stream=out, live=True, min_interval_s=0)
    log.emit("agreement", "agreement with b", worker="golem-0")
    out.close()  # the line is open; the terminal is gone
    log.emit("agreement", "agreement with c", worker="golem-1")
    progress.close()  # as the cluster closes: no ValueError
    assert progress.agreements == 2
