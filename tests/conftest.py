"""Shared fixtures: the real datasets and cases (read in place), fresh stores."""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb
import pytest

from data import settings


def pytest_report_header(config):
    return f"duckdb {duckdb.__version__}; shared data: {settings.shared_data_dir()}"


@pytest.fixture(scope="session")
def cases() -> Path:
    c = settings.cases_dir()
    if c is None:
        pytest.skip("shared cases folder not found (set LABTREND_DATA_DIR)")
    return c


@pytest.fixture(scope="session")
def mimic_dir() -> Path:
    d = settings.mimic_demo_dir()
    if d is None:
        pytest.skip("MIMIC-IV demo not found (set LABTREND_DEMO_DATA or LABTREND_DATA_DIR)")
    return d


@pytest.fixture
def store(tmp_path):
    from data.db import open_store

    return open_store(tmp_path / "lab.duckdb")


@pytest.fixture
def db(store):
    """The same fresh store, under the name the importer tests use."""
    return store


@pytest.fixture(scope="session")
def mimic_store(tmp_path_factory, mimic_dir):
    """A store with MIMIC-IV demo imported once per test session (read-only use!)."""
    from data.db import open_store
    from data.importers import run_import

    path = tmp_path_factory.mktemp("mimic") / "mimic.duckdb"
    s = open_store(path)
    summary = run_import(s, mimic_dir)
    s.mimic_summary = summary
    return s


@pytest.fixture(autouse=True)
def _keep_the_main_module():
    """Streamlit's script runner (AppTest) installs the app as ``sys.modules['__main__']`` and leaves it there; a
    process pool started later in the same test process (``labtrend score``) would then re-run the app in each
    spawned worker. Every test starts and ends with the interpreter's own ``__main__``."""
    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main
