"""The project's error types that several layers raise, with no imports of their own.

A module raises `ConfigError` without importing the config (and everything the config imports to check
itself); `gpg_vl.config.ConfigError` is this same class, re-exported where users have always found it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override with an unknown key, a wrong type or a value out of its range.

    `key` is the dotted key at fault (when there is one), so the message can name the file that set it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
