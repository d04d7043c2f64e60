"""Fixtures for tests that need something serving a pcsc-lite socket (see targets.py).

A test taking the ``target`` fixture runs once per selected target, each time starting from
a fresh card in reader 0 and reader 1 empty. Select targets with ``--targets pcscd,emulator``
or PCSC_BRIDGE_TARGETS (default: every registered target). Targets start once per session.
"""

from __future__ import annotations

import os

import pytest
from targets import (  # noqa: F401 - helpers other test modules import from here
    FACTORIES,
    App,
    Process,
    Targets,
    cli,
    free_port,
    make_pki,
    wait_path,
    wait_port,
    write_client_config,
    write_server_config,
)


def pytest_addoption(parser):
    parser.addoption("--targets", default=os.environ.get("PCSC_BRIDGE_TARGETS", "all"),
                     help="comma-separated targets for the PC/SC API tests "
                          f"({', '.join(FACTORIES)}; default: all)")
    parser.addoption("--fail-on-skip", action="store_true",
                     help="a skipped test fails the run (CI: nothing there may be skipped)")


def selected_targets(config) -> list[str]:
    value = config.getoption("--targets")
    names = list(FACTORIES) if value == "all" else [n for n in value.split(",") if n]
    unknown = [n for n in names if n not in FACTORIES]
    if unknown:
        raise pytest.UsageError(f"--targets: unknown {unknown}; known: {list(FACTORIES)}")
    return names


def pytest_configure(config):
    selected_targets(config)


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if session.config.getoption("--fail-on-skip") and skipped and exitstatus == 0:
        names = ", ".join(r.nodeid for r in skipped[:10])
        print(f"\n--fail-on-skip: {len(skipped)} test(s) skipped: {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", selected_targets(metafunc.config), indirect=True)


@pytest.fixture(scope="session")
def targets(tmp_path_factory):
    ts = Targets(str(tmp_path_factory.mktemp("targets")))
    yield ts
    ts.stop()


@pytest.fixture
def target(request, targets):
    try:
        t = targets.get(request.param)
    except (RuntimeError, OSError, TimeoutError) as exc:
        pytest.fail(f"target {request.param} could not start: {exc}", pytrace=False)
    t.reset()
    yield t
    t.close_apps()


@pytest.fixture(scope="session")
def pcscd(targets):
    """The host pcscd's vpcd test cards (TestCard per reader), pcscd running."""
    return targets.get("pcscd").cards


@pytest.fixture
def shared_dir():
    """A fresh directory other local users can reach (pytest's own are 0700): for a
    test whose second local user (setpriv --reuid=65534) uses the agent's socket."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="pcsc-bridge-shared-")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)
