"""Container tests: the compose stacks of deploy/ built and started for real with podman-compose.

They skip, saying why, where no container engine exists. Where podman exists they prepare it with
deploy/podman/setup.sh (idempotent) and build the brain's image from this working tree once per
session. Compose and container logs of each stack are kept under the session's tmp dir, and the
path is printed when a stack fails.
"""

from __future__ import annotations

import pytest

from support.compose_stack import build_image, prepare_engine, why_no_engine


@pytest.fixture(scope="session")
def image() -> str:
    reason = why_no_engine()
    if reason:
        pytest.skip(reason)
    reason = prepare_engine()
    if reason:
        pytest.skip(reason)
    return build_image()


@pytest.fixture
def log_dir(tmp_path):
    path = tmp_path / "stack-logs"
    path.mkdir()
    return path
