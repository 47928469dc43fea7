"""Which backend a quantized folder is in, and with which options: each registered backend is asked
(:meth:`qadapt.QuantBackend.folder_options`), exactly one may claim the folder, and what the folder holds is what
qadapt loads and records. A caller's ``backend=`` or option that contradicts the folder is refused with the
difference; runtime options (kernels, compute dtypes) may differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, IncompatibleError, InvalidOptionError, QadaptError
from .hf import folder_quantization_config, qadapt_only_backend
from .plugins import registrations


@dataclass(frozen=True)
class Claim:
    """A backend that recognises a folder as its format, and the options the folder holds."""

    backend: Any  # the QuantBackend
    options: dict


def claims(path: str) -> list[Claim]:
    """Every registered backend that recognises ``path`` as its format."""
    found = []
    for name, registration in registrations().items():
        try:
            options = registration.backend.folder_options(path)
        except QadaptError:
            raise
        except Exception as exc:  # a plugin's bug must not pass for "not my format"
            raise CheckpointError(
                f"load {path!r}",
                f"backend '{name}' (plugin '{registration.plugin}') failed while reading the folder "
                f"({type(exc).__name__}: {exc})",
                "Report it to the plugin's authors; QADAPT_LOAD_PLUGINS=<other plugins> leaves it out",
            ) from exc
        if options is not None:
            found.append(Claim(registration.backend, dict(options)))
    return found


def detect(path: str, asked: str | None = None) -> Claim | None:
    """The backend whose format ``path`` is in, with the folder's options; None for a full-precision folder.

    :param asked: the ``backend=`` the caller passed (chooses between several backends that claim the folder).
    Refuses a folder that is quantized in a format no registered backend reads, and one that several backends claim
    when ``asked`` does not choose among them.
    """
    found = claims(path)
    if len(found) > 1:
        names = [claim.backend.name for claim in found]
        chosen = [claim for claim in found if claim.backend.name == asked]
        if chosen:
            return chosen[0]
        raise InvalidOptionError(
            f"load {path!r}", f"backends {', '.join(map(repr, names))} all read this folder's format",
            f"Pass backend= one of {', '.join(map(repr, names))}",
        )
    if found:
        return found[0]
    marked = qadapt_only_backend(path)
    if marked is not None:
        raise CheckpointError(
            f"load {path!r}", f"it holds weights in the layout of qadapt backend {marked!r}, which is not registered here",
            f"Install the plugin of backend {marked!r} (`qadapt backends` lists what is registered)",
        )
    quantization = folder_quantization_config(path)
    if quantization is not None:
        method = quantization.get("quant_method") or quantization.get("method") or "unknown"
        raise IncompatibleError(
            f"load {path!r}",
            f"its config.json says the weights are quantized (quant_method={method!r}) and no registered backend "
            "reads that format: quantizing them again would quantize packed values",
            f"Load it with transformers directly, or start from the full-precision model (registered backends: "
            f"{', '.join(registrations()) or 'none'})",
        )
    return None


def resolve(path: str, claim: Claim, asked: str | None, options: dict) -> dict:
    """The validated options to load ``path`` with: the folder's, plus the caller's runtime options. Refuses a
    ``backend=`` other than the claiming one, and options that contradict the folder or that only mean something
    when quantizing."""
    backend = claim.backend
    source = f"the folder holds {backend.name} weights with {listing(claim.options) or 'no options of their own'}"
    if asked is not None and asked != backend.name:
        raise InvalidOptionError(
            f"load {path!r} with backend={asked!r}",
            f"{source}; loading it as {asked} would quantize packed values",
            f"Leave backend out (qadapt reads it from the folder), or start from the full-precision model to use {asked!r}",
        )
    try:
        held = backend.validate_options(claim.options)
    except QadaptError as exc:
        raise IncompatibleError(f"load {path!r}", f"{source}, which backend '{backend.name}' cannot represent: "
                                f"{exc.reason}", exc.hint) from exc
    runtime = {option.name for option in backend.options if option.runtime}
    wanted = backend.validate_options({**claim.options, **options})
    differences = []
    for key in sorted(options):
        if key in runtime:
            continue
        if key not in claim.options:
            differences.append(f"{key} is chosen when quantizing, and this folder is quantized already")
        elif wanted[key] != held[key]:
            differences.append(f"{key}={wanted[key]!r} asked, {held[key]!r} in the folder")
    if differences:
        raise InvalidOptionError(
            f"load {path!r} with {listing(options)}", f"{source}: " + "; ".join(differences),
            "Leave those options out: they are read from the folder"
            + (f" (options you may choose here: {', '.join(sorted(runtime))})" if runtime else ""),
        )
    return wanted


def listing(options: dict) -> str:
    """``options`` as the caller wrote them: ``key=value``, sorted by key."""
    return ", ".join(f"{key}={value!r}" for key, value in sorted(options.items()))
