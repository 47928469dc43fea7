"""A user sees qadapt's messages, not the libraries' known harmless ones: the same run with QADAPT_VERBOSE=1 shows
what was filtered, and nothing else is hidden."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import backend_ready

RUN = """
import warnings
warnings.simplefilter("default")
import qadapt
from qadapt.testing import toy
model = qadapt.attach(qadapt.load(toy.build_model(), backend="torchao"), "lora")
print("done")
"""
HARMLESS = ("Failed to load", "Enum subclass", "is_gradient_checkpointing", "Detected no triton")


def _stderr(verbose: bool) -> str:
    env = {**os.environ, "QADAPT_VERBOSE": "1" if verbose else "0"}
    result = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr
    return result.stderr


def test_known_harmless_library_messages_are_filtered_and_verbose_shows_them():
    backend_ready("torchao")
    loud, quiet = _stderr(verbose=True), _stderr(verbose=False)
    shown = [message for message in HARMLESS if message in loud]
    if not shown:
        pytest.skip("these library versions print none of the known harmless messages here")
    assert not [message for message in HARMLESS if message in quiet], quiet


def test_only_the_known_message_is_filtered_a_real_warning_still_shows(monkeypatch):
    import warnings

    from qadapt import quiet

    monkeypatch.setenv("QADAPT_VERBOSE", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a user's interpreter does with FutureWarning
        monkeypatch.setattr(quiet, "_installed", False)
        quiet.install()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something the user must see", FutureWarning)
    assert [str(w.message) for w in caught] == ["something the user must see"]
