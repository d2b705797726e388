"""The one error type of the web UI: a user mistake, shown as a message without a traceback."""

from __future__ import annotations


class UiError(Exception):
    """A mistake the user can fix (bad flag, missing image, wrong upload): the message says how."""
