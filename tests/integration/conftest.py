"""pytest fixtures: one PostgreSQL cluster per session, a fresh system per test module."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import kp  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    c = kp.Cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def system(cluster):
    s = kp.System(cluster)
    yield s
    s.stop()
