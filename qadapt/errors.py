"""The one error type qadapt raises when it refuses: what was asked, why not, what to do instead."""

from __future__ import annotations


class QadaptError(Exception):
    """A refusal, raised before any weight or file is changed.

    :param asked: what the user asked for, in their words (``"merge 'ia3' on backend 'gptq'"``).
    :param reason: why it cannot be done.
    :param hint: what to do instead (may be empty).
    """

    def __init__(self, asked: str, reason: str, hint: str = "") -> None:
        self.asked = asked
        self.reason = reason
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        message = f"{self.asked}: {self.reason.rstrip('.')}."
        if self.hint:
            message += f" {self.hint.rstrip('.')}."
        return message

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "asked": self.asked, "reason": self.reason, "hint": self.hint}


class UnknownBackendError(QadaptError, LookupError):
    """No plugin registered a backend of that name."""


class BackendUnavailableError(QadaptError):
    """The backend is registered but its library cannot run in this environment."""


class InvalidOptionError(QadaptError, ValueError):
    """An option the backend does not know, or a value it does not accept."""


class IncompatibleError(QadaptError):
    """The capability table says no to this backend x method x operation."""


class ArchitectureError(IncompatibleError):
    """The backend (or adapter method) cannot handle part of this model's architecture: layers it cannot quantize or
    adapt. Raised before any work; the message names the layers."""


class MergeRefusedError(QadaptError):
    """A merge was measured and refused (its error exceeded ``max_error``); the model is unchanged. ``report`` is the
    :class:`qadapt.merging.MergeReport` of the refused merge (which layers lost most), where one was measured."""

    def __init__(self, asked: str, reason: str, hint: str = "", report=None) -> None:
        super().__init__(asked, reason, hint)
        self.report = report

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.report is not None:
            data["report"] = self.report.to_dict()
        return data


class CheckpointError(QadaptError):
    """A saved folder is missing a file, holds a corrupt one, or would overwrite user files."""


class PluginError(QadaptError):
    """A backend's plugin broke its contract while running (returned something else than a model, say); nothing of
    the caller's was changed by qadapt."""


class ShardingError(QadaptError):
    """A model cannot be sharded as asked, or its quantized state did not survive sharding (then training is refused
    before its first step)."""
