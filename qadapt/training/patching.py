"""Reversible changes to a model (instance attributes set, callbacks to undo), and recognising module code.

Parts replace a module's computation only where the module's class computes what qadapt's replacement computes.
Rather than a list of architectures, that is read off the code: a class whose ``forward`` compiles to the same
bytecode, names and constants as the reference class's (transformers' Llama modules) computes the same thing with the
same attributes. transformers writes most architectures from Llama's modules ("modular" files), so Mistral, Qwen2/3,
SmolLM3 and others match; Gemma's RMSNorm (``1 + weight``), Mixtral's forward (router loss) or Phi-3's fused
gate_up MLP do not, and the part falls back there, saying which class differs.
"""

from __future__ import annotations

import inspect

_MISSING = object()


class Patches:
    """Attributes set on objects (restored exactly, in reverse order, by :meth:`undo`) and other undo callbacks."""

    def __init__(self) -> None:
        self._undo: list = []

    def set(self, obj, name: str, value) -> None:
        old = obj.__dict__.get(name, _MISSING)
        self._undo.append(lambda: obj.__dict__.pop(name, None) if old is _MISSING else obj.__dict__.__setitem__(name, old))
        obj.__dict__[name] = value

    def on_undo(self, callback) -> None:
        self._undo.append(callback)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _fingerprint(function):
    code = inspect.unwrap(function).__code__
    return code.co_code, code.co_names, tuple(c for c in code.co_consts if not isinstance(c, str))


def same_code(cls, reference) -> bool:
    """Does ``cls.forward`` compute what ``reference.forward`` computes (same bytecode, names and constants)?"""
    try:
        return _fingerprint(cls.forward) == _fingerprint(reference.forward)
    except (AttributeError, TypeError):
        return False
