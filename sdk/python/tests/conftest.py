"""The Python SDK's tests run against a real mesh that the Rust test
`tests/tests/python_sdk.rs` starts (`cargo test -p e2e --test python_sdk`):
nats-server with the mesh's streams, the policy worker on the shipped
policies and a Rust `coder` (agents-sdk) serving `code.search` and A2A. It
passes the URLs through the environment. Run without it, a test fails and
says so: it never passes without a mesh."""

import asyncio
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: these tests run against the mesh that "
            "`cargo test -p e2e --test python_sdk` starts",
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
