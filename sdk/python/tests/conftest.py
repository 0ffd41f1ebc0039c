"""Two kinds of tests. Unit tests (no marker) need nothing but the package.
Tests marked `stack` run against a real mesh that the Rust tests start
(`cargo test -p e2e --test it python_sdk::`: nats-server with the mesh's streams,
the policy worker on the shipped policies and a Rust `coder` serving
`code.search` and A2A), which passes the URLs through the environment
variables the marker names (default `AGENTMESH_NATS_URL`).

Plain `pytest` runs the unit tests and skips the `stack` tests, saying
which variable is missing (`-rs` is on); `pytest -m "not stack"` leaves
them out. With `AGENTMESH_REQUIRE_STACK=1` (the Rust harness sets it) a
missing variable fails the test instead: it never passes without a mesh."""

import asyncio
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The variable a `stack` test reads when its marker names none.
DEFAULT_STACK_ENV = ("AGENTMESH_NATS_URL",)


def stack_env(item) -> tuple:
    marker = item.get_closest_marker("stack")
    if marker is None:
        return ()
    return tuple(marker.args) or DEFAULT_STACK_ENV


def pytest_collection_modifyitems(config, items):
    for item in items:
        missing = [name for name in stack_env(item) if not os.environ.get(name)]
        if missing and not os.environ.get("AGENTMESH_REQUIRE_STACK"):
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs a running mesh ({', '.join(missing)} not set): "
                    "`cargo test -p e2e --test it python_sdk::` runs it"
                )
            )


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: these tests run against the mesh that "
            "`cargo test -p e2e --test it python_sdk::` starts",
            pytrace=False,
        )
    return value


@pytest.fixture
def nats_url() -> str:
    return env("AGENTMESH_NATS_URL")


@pytest.fixture
def run():
    """Runs a coroutine to completion on a fresh event loop."""

    def runner(coro, timeout: float = 60):
        return asyncio.run(asyncio.wait_for(coro, timeout))

    return runner
