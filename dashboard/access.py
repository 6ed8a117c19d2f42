"""Who may open what: roles and the page registry.

No Streamlit here, so plain tests can use it. Accounts (with their roles) live in the store
(:mod:`data.users`); sessions too (:mod:`data.sessions`).

**Roles.** Each role opens the pages listed in :data:`PAGES`; a user with several roles
gets the union. ``clinician``: patients and timelines; ``expert``: those plus expert
review; ``analyst``: upload, model and local test codes; ``admin``: everything, plus audit log and users.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.users import MIN_PASSWORD_LENGTH, ROLES

__all__ = ["ROLES", "MIN_PASSWORD_LENGTH", "PAGES", "PageSpec", "pages_for_roles", "can_open", "page"]


@dataclass(frozen=True)
class PageSpec:
    key: str  # stable id, also the URL path
    path: str  # file, relative to dashboard/
    title: str
    icon: str
    section: str
    roles: frozenset[str]
    default: bool = False


_CLINICAL = frozenset({"clinician", "expert", "admin"})
PAGES: tuple[PageSpec, ...] = (
    PageSpec("patients", "app_pages/patients.py", "Patients", ":material/groups:", "Patients", _CLINICAL, default=True),
    PageSpec("timeline", "app_pages/timeline.py", "Patient timeline", ":material/monitoring:", "Patients", _CLINICAL),
    PageSpec("review", "app_pages/review.py", "Review", ":material/fact_check:", "Expert", frozenset({"expert", "admin"})),
    PageSpec("upload", "app_pages/upload.py", "Upload", ":material/upload_file:", "Data and model",
             frozenset({"analyst", "admin"})),
    PageSpec("model", "app_pages/model.py", "Model", ":material/model_training:", "Data and model",
             frozenset({"analyst", "admin"})),
    PageSpec("codes", "app_pages/codes.py", "Local codes", ":material/link:", "Data and model",
             frozenset({"analyst", "admin"})),
    PageSpec("audit", "app_pages/audit.py", "Audit", ":material/policy:", "Admin", frozenset({"admin"})),
    PageSpec("users", "app_pages/users.py", "Users", ":material/manage_accounts:", "Admin", frozenset({"admin"})),
)
_BY_KEY = {p.key: p for p in PAGES}


def pages_for_roles(roles) -> list[PageSpec]:
    """The pages the roles may open, in menu order."""
    roles = set(roles or ())
    return [p for p in PAGES if p.roles & roles]


def can_open(roles, page_key: str) -> bool:
    """True when any of ``roles`` may open the page ``page_key``."""
    page = _BY_KEY.get(page_key)
    return page is not None and bool(page.roles & set(roles or ()))


def page(page_key: str) -> PageSpec:
    return _BY_KEY[page_key]
