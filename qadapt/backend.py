"""The interface every quantization backend implements.

A backend is a plain object; a plugin hands instances to qadapt through the ``register_backends`` hook
(see :mod:`qadapt.hookspecs`). Rules that keep qadapt light and honest:

* import the backend library inside methods, never at module import time: ``import qadapt`` and ``qadapt backends``
  must not import it;
* :meth:`QuantBackend.check_environment` never raises: it says whether the library can run here, and if not, why and
  how to fix it;
* :meth:`QuantBackend.capabilities` is a promise that the conformance kit (:mod:`qadapt.conformance`) checks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .capabilities import Support, Table
from .errors import InvalidOptionError, QadaptError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Option:
    """One option a backend accepts in ``qadapt.load(..., backend=NAME, **options)``.

    ``runtime=True`` marks an option that says how the quantized weights are run (a kernel, a compute dtype), not what
    they are: an adapter trained on a base moves freely to a base that differs from it only in runtime options.
    """

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    type: type | None = None
    runtime: bool = False

    def validate(self, backend: str, value: Any) -> Any:
        expected = self.type or type(self.default)
        if self.default is None and self.type is None:
            return value
        if expected is bool and not isinstance(value, bool):
            raise InvalidOptionError(
                f"{backend} option {self.name}={value!r}", "expected True or False", f"Pass {self.name}=True or False"
            )
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidOptionError(f"{backend} option {self.name}={value!r}", "expected an integer", self._choices_hint())
        if self.choices is not None and value not in self.choices:
            raise InvalidOptionError(
                f"backend '{backend}' with {self.name}={value!r}",
                f"{self.name} must be one of {', '.join(map(repr, self.choices))}",
                self.help,
            )
        return value

    def _choices_hint(self) -> str:
        return f"Choose one of {', '.join(map(repr, self.choices))}" if self.choices else self.help


@dataclass
class Environment:
    """What :meth:`QuantBackend.check_environment` found."""

    ok: bool
    version: str | None = None
    reason: str = ""
    hint: str = ""
    details: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.ok else "unavailable"


class QuantBackend:
    """Base class for a quantization backend. Subclasses set the class attributes and override the methods.

    Capabilities are per options (torchao int4 trains differently from int8), so most methods take the validated
    ``options`` dict that :meth:`validate_options` returned.
    """

    #: short name used in ``qadapt.load(..., backend=name)``
    name: str = ""
    #: one line shown by ``qadapt backends``
    summary: str = ""
    #: importable module(s) the backend needs, checked by :meth:`check_environment`
    requires: tuple[str, ...] = ()
    #: the pip distribution whose version is recorded with saved models
    distribution: str = ""
    #: how to install what is missing
    install_hint: str = ""
    #: accepted options, by name
    options: tuple[Option, ...] = ()
    #: True if :meth:`quantize` needs calibration data
    requires_calibration: bool = False
    #: adapter methods PEFT has no layer for on this backend, for which qadapt presents the quantized layers as
    #: ``nn.Linear`` (see :mod:`qadapt.proxy`); declare them trainable in :meth:`capabilities` only once verified
    proxy_methods: tuple[str, ...] = ()

    # ----------------------------------------------------------------- environment
    def check_environment(self) -> Environment:
        """Can this backend run here? Never raises; imports the backend library (so call it only when asked)."""
        version = self.library_version()
        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as exc:  # an ImportError, or anything a half-installed package raises
                return Environment(
                    ok=False,
                    version=version,
                    reason=f"{module} is not importable ({type(exc).__name__}: {exc})",
                    hint=f"Install: {self.install_hint}" if self.install_hint else "",
                )
        return Environment(ok=True, version=version)

    def library_version(self) -> str | None:
        if not self.distribution:
            return None
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    # ----------------------------------------------------------------- options
    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Return the full, normalised options (defaults filled in) or raise :class:`InvalidOptionError`."""
        known = {option.name: option for option in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise InvalidOptionError(
                f"backend '{self.name}' with option {unknown[0]}={options[unknown[0]]!r}",
                f"'{self.name}' has no option '{unknown[0]}'",
                f"Valid options: {valid}",
            )
        resolved = {}
        for option_name, option in known.items():
            value = options.get(option_name, option.default)
            resolved[option_name] = option.validate(self.name, value)
        return self.check_option_combination(resolved)

    def check_option_combination(self, options: dict[str, Any]) -> dict[str, Any]:
        """Override to refuse combinations that single options cannot express. Return the options."""
        return options

    def needs_calibration(self, options: dict[str, Any]) -> bool:
        """Does :meth:`quantize` need calibration data with these options? Default: :attr:`requires_calibration`."""
        return self.requires_calibration

    # ----------------------------------------------------------------- capabilities
    def capabilities(self, options: dict[str, Any]) -> Table:
        """The full ``{(method, operation): Support}`` table for these options (see :func:`qadapt.capabilities.declare`)."""
        raise NotImplementedError

    def peft_compatible(self, method: str, options: dict[str, Any]) -> Support:
        """Can adapter ``method`` be attached and trained on a model quantized with ``options``?"""
        return self.capabilities(options)[(method, "train")]

    def can_merge(self, method: str, options: dict[str, Any], strategy: str = "requantize") -> Support:
        """Can a ``method`` adapter be merged with ``strategy`` (``"requantize"`` or ``"dequantize"``)?"""
        from .capabilities import MERGE_STRATEGIES

        return self.capabilities(options)[(method, MERGE_STRATEGIES[strategy])]

    def forward_tolerance(self, options: dict[str, Any]) -> float:
        """How far (relative output error) this backend's own forward may be from ``x @ dequantize(W).T``.

        Merges are measured against the unmerged adapter model, which computes ``deq(W) x + adapter(x)`` through the
        backend's forward. A backend whose forward also rounds activations (LLM.int8) declares that here, and the
        conformance kit allows a de-quantized merge that much difference."""
        return 1e-4

    # ----------------------------------------------------------------- heavy work
    def quantize(self, model: Any, options: dict[str, Any], calibration: Any = None) -> "torch.nn.Module":
        """Quantize ``model`` (a ``PreTrainedModel`` in full precision, or a path to one saved with safetensors).

        Return the quantized model; it may be the same object, changed in place.
        """
        raise NotImplementedError

    def load(self, path: str, options: dict[str, Any]) -> "torch.nn.Module":
        """Load a checkpoint that is already quantized in this backend's format (from :meth:`save` or elsewhere)."""
        raise NotImplementedError

    def save(self, model: "torch.nn.Module", path: str, options: dict[str, Any]) -> None:
        """Write the quantized ``model`` (no adapter) into the existing, empty folder ``path``, with safetensors."""
        raise NotImplementedError

    def is_quantized_checkpoint(self, path: str) -> bool:
        """Does the transformers folder ``path`` already hold weights in this backend's format? By default: its
        ``config.json`` has a ``quantization_config``."""
        import json
        import os

        try:
            with open(os.path.join(path, "config.json")) as handle:
                return "quantization_config" in json.load(handle)
        except (OSError, ValueError):
            return False

    def quantized_layer_types(self) -> tuple[type, ...]:
        """The module classes this backend puts in place of ``nn.Linear`` (they become adapter targets)."""
        return ()

    def is_quantized_layer(self, module: "torch.nn.Module") -> bool:
        """Is ``module`` one of this backend's quantized layers? By default: an instance of
        :meth:`quantized_layer_types`. Override where the layer class says nothing (torchao keeps ``nn.Linear``)."""
        types = self.quantized_layer_types()
        return bool(types) and isinstance(module, types)

    def dequantize(self, module: "torch.nn.Module") -> "torch.Tensor":
        """The full-precision (float32) weight of one quantized layer, shaped ``(out_features, in_features)``."""
        raise NotImplementedError

    def requantize(self, module: "torch.nn.Module", weight: "torch.Tensor") -> "torch.nn.Module":
        """A new layer in ``module``'s format and options holding ``weight`` (same bias). ``module`` is not changed."""
        raise NotImplementedError

    def peft_layer_types(self) -> dict[type, Any]:
        """Extra ``{quantized layer class: LoRA layer factory}`` for layers PEFT does not know (see PEFT's
        ``LoraConfig._register_custom_module``). Most backends need none."""
        return {}

    # ----------------------------------------------------------------- helpers for subclasses
    def refuse(self, asked: str, support: Support) -> QadaptError:
        from .errors import IncompatibleError

        return IncompatibleError(asked, support.reason, support.hint)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
