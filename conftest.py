"""Root conftest: the platform's pytest plugin (real broker, databases) for every test tree,
and a watchdog so that a stuck run fails with every thread's stack instead of hanging CI."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

import pytest

pytest_plugins = ["fulfil.testing"]

SESSION_LIMIT_SECONDS = float(os.environ.get("FULFIL_TEST_SESSION_LIMIT", "1800"))


def _give_up() -> None:
    sys.stderr.write(f"\nmake test ran longer than {SESSION_LIMIT_SECONDS:.0f}s: stacks follow, then exit.\n")
    faulthandler.dump_traceback(all_threads=True)
    sys.stderr.flush()
    os._exit(3)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    watchdog = threading.Timer(SESSION_LIMIT_SECONDS, _give_up)
    watchdog.daemon = True
    watchdog.start()
