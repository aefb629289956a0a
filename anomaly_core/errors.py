"""Exception types shared by every anomaly_core module.

All three subclass built-in exceptions so callers may catch either the specific
type or the generic ``ValueError`` / ``RuntimeError``.
"""

from __future__ import annotations

__all__ = ["DataError", "ConfigError", "WeightsError"]


class DataError(ValueError):
    """Input data is missing, unreadable or inconsistent (the message names the file/category)."""


class ConfigError(ValueError):
    """A configuration / parameter value is invalid."""


class WeightsError(RuntimeError):
    """Model weights cannot be found, downloaded or loaded."""
