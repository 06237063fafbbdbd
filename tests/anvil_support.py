"""Helpers for tests that need a real Ethereum node (anvil).

Without an anvil binary these tests skip, pointing at ``.ci/install-anvil``; with
``GOLEM_DASK_REQUIRE_ANVIL=1`` (set by CI) a missing binary fails them instead.

Use the fixture by importing it into a test module::

    from anvil_support import anvil  # noqa: F401
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from golem_dask.chain.anvil import AnvilNode, AnvilNotFoundError, find_anvil
from golem_dask.chain.deploy import deploy_contracts

REQUIRED = os.environ.get("GOLEM_DASK_REQUIRE_ANVIL") == "1"


def anvil_binary() -> Path:
    """The anvil binary, or skip (fail with ``GOLEM_DASK_REQUIRE_ANVIL=1``) the test."""
    try:
        return find_anvil()
    except AnvilNotFoundError as e:
        if REQUIRED:
            pytest.fail(f"{e} (GOLEM_DASK_REQUIRE_ANVIL=1)")
        pytest.skip(str(e))


@contextmanager
def running_anvil(host: str = "127.0.0.1") -> Iterator[AnvilNode]:
    """A fresh anvil chain listening on ``host``, the shipped contracts deployed.

    ``node.contracts`` is ``{"token": address, "batch": address or None}``; the deployer
    (and the token's minter) is ``node.accounts[0]``.
    """
    node = AnvilNode(binary=anvil_binary(), host=host)
    try:
        node.start()
        node.contracts = deploy_contracts(node.web3(), node.accounts[0])
        yield node
    finally:
        node.close()


@pytest.fixture
def anvil() -> Iterator[AnvilNode]:
    """A fresh anvil chain on loopback (:func:`running_anvil`).

    Function scoped: a start costs about 0.1 s and every test gets its own chain, so
    tests that restart the node or move funds cannot affect each other.
    """
    with running_anvil() as node:
        yield node
