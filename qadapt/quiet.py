"""Silencing the known harmless messages the libraries print when qadapt drives them.

Each filter matches one message, seen with the versions named, that says nothing a qadapt user can act on; any
other warning still shows. The backends name their libraries' messages (``QuantBackend.harmless_messages``); the
ones below come from PEFT and transformers. ``QADAPT_VERBOSE=1`` (or ``qadapt --verbose``) turns every filter off.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from contextlib import contextmanager

#: (warning category, message pattern, why it is harmless)
WARNING_MESSAGES = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "PEFT 0.21 reads transformers' old attribute name on every attach (transformers 5.23)"),
)

_installed = False
_log_filters: set = set()


class _DropKnown(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # a record that cannot be formatted is not ours to judge
            return True


def verbose() -> bool:
    return os.environ.get("QADAPT_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def known_warnings():
    """Within the block, the known harmless warnings (``WARNING_MESSAGES``) are not shown: wrap the library calls
    that emit them (PEFT's attach)."""
    with warnings.catch_warnings():
        if not verbose():
            for category, pattern, _why in WARNING_MESSAGES:
                warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
        yield


def install(log_messages=()) -> None:
    """Install the log filters (no-op with ``QADAPT_VERBOSE=1``): ``(logger name, message pattern, why)``
    triples, each once per process; and the known warnings for the process (the API also scopes them to its own
    calls with :func:`known_warnings`, which survives test runners resetting warning filters)."""
    global _installed
    if verbose():
        return
    if not _installed:
        _installed = True
        for category, pattern, _why in WARNING_MESSAGES:
            warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
    for name, pattern, _why in log_messages:
        if (name, pattern) not in _log_filters:
            _log_filters.add((name, pattern))
            logging.getLogger(name).addFilter(_DropKnown(pattern))
