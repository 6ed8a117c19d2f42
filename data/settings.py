"""Where things live: the database, the shared datasets, the model directory, the session policy.

Every path is resolved here, once, from (in order) an explicit argument, an environment
variable, then a default under the project's ignored ``var/`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VAR_DIR = PROJECT_ROOT / "var"

MIMIC_DEMO_URL = "https://physionet.org/content/mimic-iv-demo/2.2/"
MODEL_SERVER_HOST = "127.0.0.1"  # labtrend serve-model listens here unless --host says otherwise
MODEL_SERVER_PORT = 8700


def db_path(explicit: str | os.PathLike | None = None) -> Path:
    """The DuckDB file: ``--db`` if given, else ``$LABTREND_DB``, else ``var/labtrend.duckdb``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("LABTREND_DB")
    if env:
        return Path(env)
    return VAR_DIR / "labtrend.duckdb"


#: DuckDB's memory limit when nothing else is configured: on a shared server one import, the
#: dashboard or a training run must not take the whole machine (DuckDB's own default is 80 % of RAM);
#: beyond it DuckDB spills to :func:`duckdb_temp_dir` (benchmarks/ingest.py --memory-limit).
DUCKDB_MEMORY_LIMIT = "2GB"


def duckdb_memory_limit(explicit: str | None = None) -> str:
    """DuckDB ``memory_limit`` for every store this process opens (imports, dashboard, training):
    explicit, else ``$LABTREND_DUCKDB_MEMORY_LIMIT`` (e.g. ``4GB``, ``512MB``), else :data:`DUCKDB_MEMORY_LIMIT`."""
    return (explicit or os.environ.get("LABTREND_DUCKDB_MEMORY_LIMIT", "").strip() or DUCKDB_MEMORY_LIMIT)


def duckdb_temp_dir(db_file: str | os.PathLike, explicit: str | os.PathLike | None = None) -> Path | None:
    """Where DuckDB spills what does not fit in its memory limit: explicit, else
    ``$LABTREND_DUCKDB_TEMP_DIR``, else ``<database file>.tmp`` beside the database (DuckDB's own
    default, on the disk that already holds the data); None for an in-memory store."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("LABTREND_DUCKDB_TEMP_DIR", "").strip()
    if env:
        return Path(env)
    if str(db_file) == ":memory:":
        return None
    return Path(f"{db_file}.tmp")


def legacy_users_file() -> Path:
    """Where accounts were kept before they moved into the store: ``$LABTREND_USERS``, else
    ``var/users.yaml`` (``labtrend users import --file`` copies them in)."""
    env = os.environ.get("LABTREND_USERS")
    return Path(env) if env else VAR_DIR / "users.yaml"


def shared_data_dir() -> Path | None:
    """The folder holding the open lab datasets, or None when it is not on this machine.

    ``$LABTREND_DATA_DIR`` wins; otherwise ``../shared/data`` next to the project checkout.
    """
    env = os.environ.get("LABTREND_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(PROJECT_ROOT.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def dataset_dir(name: str) -> Path | None:
    """One dataset folder under :func:`shared_data_dir` (e.g. ``mimic-iv-demo``), or None."""
    root = shared_data_dir()
    if root is None or not (root / name).is_dir():
        return None
    return root / name


def mimic_demo_dir() -> Path | None:
    """MIMIC-IV demo: ``$LABTREND_DEMO_DATA`` else the shared copy, or None."""
    env = os.environ.get("LABTREND_DEMO_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    return dataset_dir("mimic-iv-demo")


def model_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The fine-tuned model: explicit, else ``$LABTREND_MODEL``, else ``var/model``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("LABTREND_MODEL")
    return Path(env) if env else VAR_DIR / "model"


def model_url(explicit: str | None = None) -> str | None:
    """Base URL of a ``labtrend serve-model`` server: explicit, else ``$LABTREND_MODEL_URL``, else None.

    None means the dashboard runs the model in-process from :func:`model_dir`. The URL is
    returned without a trailing slash (``http://gpu-host:8700``).
    """
    url = explicit or os.environ.get("LABTREND_MODEL_URL") or ""
    url = url.strip().rstrip("/")
    return url or None


#: The pretrained checkpoint shipped with the project (``small`` preset, trained by
#: ``train.py --stage pretrain``; how, on what and for how long: its ``pretraining.json``).
SHIPPED_PRETRAINED = PROJECT_ROOT / "model" / "checkpoints" / "pretrained-small"
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "vocab.json", "scaler.json")


def is_checkpoint(path: Path) -> bool:
    """True when ``path`` holds a pretraining checkpoint (config, weights, vocabulary, scaler)."""
    return all((Path(path) / f).is_file() for f in _CHECKPOINT_FILES)


def pretrained_cache_dir() -> Path:
    """Where ``--stage pretrain`` writes by default: ``$LABTREND_PRETRAINED``, else ``var/pretrained``."""
    env = os.environ.get("LABTREND_PRETRAINED")
    return Path(env) if env else VAR_DIR / "pretrained"


def pretrained_dir() -> Path:
    """The checkpoint fine-tuning starts from: ``$LABTREND_PRETRAINED``; else one built here by
    ``--stage pretrain`` (``var/pretrained``); else the shipped one; else ``var/pretrained``
    (then ``train.py`` builds it once)."""
    cache = pretrained_cache_dir()
    if os.environ.get("LABTREND_PRETRAINED") or is_checkpoint(cache):
        return cache
    return SHIPPED_PRETRAINED if is_checkpoint(SHIPPED_PRETRAINED) else cache


def cases_dir() -> Path | None:
    """The real-world input cases (``../shared/cases``), or None when absent."""
    root = shared_data_dir()
    if root is None:
        return None
    c = root.parent / "cases"
    return c if c.is_dir() else None


# -- dashboard sessions ---------------------------------------------------------------------------
#: A signed-in session ends after this many minutes without a page interaction (a shared ward
#: computer left signed in); ``$LABTREND_SESSION_IDLE_MINUTES`` or ``labtrend dashboard --idle-minutes``.
SESSION_IDLE_MINUTES = 15.0
#: ... and in any case this many hours after the password was typed (one shift);
#: ``$LABTREND_SESSION_MAX_HOURS`` or ``labtrend dashboard --session-hours``.
SESSION_MAX_HOURS = 12.0


def _positive(name: str, explicit, default: float) -> float:
    raw = explicit if explicit is not None else os.environ.get(name)
    if raw is None or str(raw).strip() == "":
        return default
    where = f"${name}" if explicit is None else "the value"
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{where} {raw!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{where} {raw!r} must be a number of minutes or hours greater than 0")
    return value


def session_idle_minutes(explicit: float | None = None) -> float:
    """Minutes without activity after which a dashboard session ends (default 15).

    Raises ValueError when ``$LABTREND_SESSION_IDLE_MINUTES`` is not a positive number."""
    return _positive("LABTREND_SESSION_IDLE_MINUTES", explicit, SESSION_IDLE_MINUTES)


def session_max_hours(explicit: float | None = None) -> float:
    """Hours after sign-in after which a dashboard session ends whatever the activity (default 12).

    Raises ValueError when ``$LABTREND_SESSION_MAX_HOURS`` is not a positive number."""
    return _positive("LABTREND_SESSION_MAX_HOURS", explicit, SESSION_MAX_HOURS)


#: The dashboard's Streamlit settings (address, error details, usage statistics, theme...).
#: ``labtrend dashboard`` passes every one of them to Streamlit on its command line, so they hold
#: whatever folder it is started from (Streamlit itself reads ``.streamlit/`` of the working folder).
STREAMLIT_CONFIG = PROJECT_ROOT / ".streamlit" / "config.toml"
