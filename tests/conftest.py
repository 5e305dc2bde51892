# tests/ is on sys.path through pytest's `pythonpath` setting (pyproject.toml), so helpers such as
# servicekit and gmm import as plain modules
from __future__ import annotations

import multiprocessing.process
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

# ---- the fast tier: `pytest -m fast` ----------------------------------------------------------------
# The tests a developer runs every minute: they start no process and no Redis, and together take
# well under a minute (docs/development.md#tests). Marked here by file or folder, so a new test in
# one of these files is fast unless it opts out below; a test marked `slow` is never fast.
FAST_PATHS = (
    "tests/test_docs.py",
    "tests/test_layering.py",
    "tests/client/test_client_parity.py",
    "tests/deploy/test_deploy_files.py",
    "tests/deploy/test_healthcheck.py",
    "tests/deploy/test_k8s_schemas.py",
    "tests/model/test_format.py",
    "tests/model/test_imports.py",
    "tests/model/test_loss.py",
    "tests/model/test_schedule.py",
    "tests/model/test_unet.py",
    "tests/worker/test_batch.py",
    "tests/worker/test_scheduler.py",
    "tests/worker/test_timing.py",
)
# Tests in those files that are not fast: (path::test function, why; times measured on the busy
# 2-core machine). Checked at collection: each must name a test function that exists in its file.
# tests/model/test_solvers.py is left out whole: its convergence tests build a Gaussian-mixture
# reference (158 s of set-up there) and compare against diffusers.
NOT_FAST = (
    ("tests/model/test_format.py::test_diffusers_unet_loads_into_registry", "builds and runs diffusers UNets: 73 s"),
    ("tests/model/test_format.py::test_round_trip", "saves, loads and runs a model: 13 s"),
    ("tests/model/test_format.py::test_registry_lists_and_loads", "loads every model of a folder: 9 s"),
    ("tests/model/test_imports.py::test_model_imports_no_web_or_queue_package", "imports in a fresh Python"),
    ("tests/model/test_unet.py::test_compiles_in_one_graph", "torch.compile"),
    ("tests/worker/test_scheduler.py::test_the_scheduler_imports_no_torch", "imports in a fresh Python"),
)
# What a fast test may not start, by program name (harmless helpers that libraries run, such as
# `uname -p` or `fc-list`, are allowed): the guard below fails the test that starts one.
SERVICE_PROGRAMS = re.compile(
    r"^(python[\d.]*|arcdiff|redis-server|redis-cli|uvicorn|gunicorn|prometheus|promtool|chromium.*|chromedriver"
    r"|chrome|podman|docker)$"
)
REPO = Path(__file__).resolve().parent.parent


def _fast_selected(config: pytest.Config) -> bool:
    """Whether this run selects the fast tier (`-m fast`, `-m 'fast and ...'`)."""
    return re.search(r"(?<!not )\bfast\b", config.getoption("markexpr") or "") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    opt_out = {entry for entry, _why in NOT_FAST}
    for entry in opt_out:
        path, _, name = entry.partition("::")
        if f"def {name}(" not in (REPO / path).read_text(encoding="utf-8"):
            raise pytest.UsageError(f"tests/conftest.py NOT_FAST names {entry}, which does not exist")
    for item in items:
        path, _, rest = item.nodeid.partition("::")
        function = f"{path}::{rest.split('[')[0]}"
        if (
            any(path == p or (p.endswith("/") and path.startswith(p)) for p in FAST_PATHS)
            and function not in opt_out
            and item.get_closest_marker("slow") is None
        ):
            item.add_marker(pytest.mark.fast)


class _ProcessGuard:
    """While a fast test runs, starting a service process (Python, arcdiff, Redis, uvicorn,
    Prometheus, a browser) fails it: the tier stays what it says."""

    def __init__(self) -> None:
        self.test: str | None = None
        self.started: list[str] = []
        self._execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]
        self._process_start = multiprocessing.process.BaseProcess.start

    def install(self) -> None:
        guard = self

        def execute_child(popen, args, executable, *rest, **kw):
            argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
            program = os.fsdecode(executable or argv[0])
            guard.check(os.path.basename(program.split()[0] if isinstance(args, str) else program), argv)
            return guard._execute_child(popen, args, executable, *rest, **kw)

        def process_start(process):
            guard.check("python", [f"multiprocessing {process!r}"])
            return guard._process_start(process)

        subprocess.Popen._execute_child = execute_child  # type: ignore[attr-defined]
        multiprocessing.process.BaseProcess.start = process_start  # type: ignore[method-assign]

    def check(self, program: str, argv: list) -> None:
        if self.test is None or not SERVICE_PROGRAMS.match(program):
            return
        what = " ".join(os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv)[:200]
        if threading.current_thread() is not threading.main_thread():
            self.started.append(what)  # this failure cannot reach the test: its teardown fails it
        pytest.fail(
            f"{self.test} is marked fast but starts a process ({what}): move it out of FAST_PATHS or add it to "
            "NOT_FAST in tests/conftest.py",
            pytrace=False,
        )


_GUARD = _ProcessGuard()


def pytest_configure(config: pytest.Config) -> None:
    if _fast_selected(config):
        _GUARD.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    fast = item.get_closest_marker("fast") is not None
    _GUARD.test, _GUARD.started = (item.nodeid if fast else None), []
    try:
        yield
    finally:
        _GUARD.test = None


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process():
    """A process started on another thread, where the guard's failure cannot reach the test, still
    fails it, at teardown."""
    yield
    if _GUARD.test is not None and _GUARD.started:
        pytest.fail(f"{_GUARD.test} is marked fast but started: {'; '.join(_GUARD.started)}", pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _torch_on_one_thread():
    """Torch in the test process runs one intra-op thread (session-wide, so that module fixtures
    such as the solver tests' reference trajectory run on it too). The networks here are tiny, and on a
    busy 2-core machine two OpenMP threads spin against a core someone else holds: beside a
    training run, 40 distillation steps of the tiny model took over 300 s on two threads and the
    solver convergence tests minutes; on one thread, seconds. Services the tests start set their
    own threads."""
    if "torch" not in sys.modules:  # a run that never loads torch keeps it out
        yield
        return
    from servicekit import one_thread  # imports torch, which is loaded already

    with one_thread():
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Tiny models made on the spot: 'tiny' (dual head) and 'tiny-eps' (noise only), 8x8x1."""
    from servicekit import make_models

    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port for the whole session."""
    from servicekit import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied for this test."""
    redis_server.client.flushall()
    return redis_server.url
