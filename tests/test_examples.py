"""Every example in examples/ runs on the embedded default and checks its own result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def test_there_are_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {"quickstart", "dataframe_groupby", "etl_over_http", "sklearn_search",
                                          "adaptive_budget", "lightgbm_training"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_example_runs_and_checks_its_result(example: Path) -> None:
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=360,
                          cwd=example.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("OK: "), done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
