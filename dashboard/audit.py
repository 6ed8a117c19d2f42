"""Compatibility name for :mod:`data.audit` (the audit log lives in the data layer beside users
and sessions). ``dashboard.audit`` is the very same module object as ``data.audit``."""

import sys

from data import audit as _audit

sys.modules[__name__] = _audit
