"""The one exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad sample data, template or data settings.

    The message names the file, the sample and the field, states the rule and, where there is one,
    the fix. `reason` is a short category ("wrong type", "empty field", ...) used to count samples
    skipped in lenient mode.
    """

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason
