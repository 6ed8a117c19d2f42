"""Compatibility name for :mod:`data.settings` (the settings moved to the data layer, so that
``model/`` and ``train.py`` read them without importing the CLI package).

``labtrend.settings`` is the very same module object as ``data.settings``: an attribute set on
one (a test's ``monkeypatch.setattr(settings, "VAR_DIR", ...)``) is seen through the other.
"""

import sys

from data import settings as _settings

sys.modules[__name__] = _settings
