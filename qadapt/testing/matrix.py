"""The capability matrix of every registered backend: the declared table, and its verification on this machine."""

from __future__ import annotations

from ..capabilities import METHODS, OPERATIONS
from ..errors import QadaptError


def variants(backend) -> list[dict]:
    """The option sets of ``backend`` the matrix covers: its ``matrix_variants``, then its ``gpu_variants``."""
    return [dict(v) for v in backend.matrix_variants] + [dict(v) for v in backend.gpu_variants]


def _registered(names):
    from ..plugins import registrations

    return [(name, registration.backend) for name, registration in registrations().items()
            if not names or name in names]


def _option_sets(backend):
    """``(options, resolved options)`` of every option set the matrix declares for ``backend``."""
    for options in variants(backend):
        try:
            resolved = backend.validate_options(options)
        except QadaptError:
            if options in [dict(v) for v in backend.gpu_variants]:
                continue  # e.g. a GPU-only kernel on a CPU machine: declared only where it can be chosen
            raise
        yield options, resolved


def _unreadable(exc) -> str:
    return f"the backend's capability table could not be read ({type(exc).__name__}: {exc})"


def declared_rows(names=None) -> list[dict]:
    """Every declared cell of every registered backend (or those in ``names``) and option set, with its reason."""
    rows = []
    for name, backend in _registered(names):
        try:
            rows += _declared(name, backend)
        except BaseException as exc:  # noqa: BLE001 - one broken plugin's table must not hide the others'
            if isinstance(exc, KeyboardInterrupt):
                raise
            reason = _unreadable(exc)
            rows += [{"backend": name, "options": {}, "method": method, "operation": operation, "supported": False,
                      "reason": reason, "hint": "run `qadapt doctor`; report it to the plugin's authors"}
                     for method in METHODS for operation in OPERATIONS]
    return rows


def _declared(name, backend) -> list[dict]:
    rows = []
    for options, resolved in _option_sets(backend):
        table = backend.capabilities(resolved)
        for method in METHODS:
            for operation in OPERATIONS:
                cell = table[(method, operation)]
                rows.append({"backend": name, "options": options, "method": method, "operation": operation,
                             "supported": cell.supported, "reason": cell.reason, "hint": cell.hint})
    return rows


def declared_architecture_rows(names=None, architectures=None) -> list[dict]:
    """The architecture dimension of the declared table: for every backend option set and panel architecture, the
    matmul weights the backend declares it cannot quantize there (``QuantBackend.full_precision``, asked about the
    architecture's model on the meta device, before any work); ``supported`` is False when there is any, with their
    reasons. A load of such a cell is refused unless ``allow_unquantized=`` lists them."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import panel

    shapes = {}
    for arch in architectures or panel.NAMES:
        with torch.device("meta"):
            shapes[arch] = AutoModelForCausalLM.from_config(panel.config(arch))
    rows = []
    for name, backend in _registered(names):
        try:
            rows += _declared_architectures(name, backend, shapes)
        except BaseException as exc:  # noqa: BLE001 - one broken plugin's table must not hide the others'
            if isinstance(exc, KeyboardInterrupt):
                raise
            reason = _unreadable(exc)
            rows += [{"backend": name, "options": {}, "architecture": arch, "supported": False, "reason": reason}
                     for arch in shapes]
    return rows


def _declared_architectures(name, backend, shapes) -> list[dict]:
    rows = []
    for options, resolved in _option_sets(backend):
        for arch, model in shapes.items():
            try:
                kept = backend.full_precision(model, resolved)
            except Exception as exc:  # noqa: BLE001 - a declaration that fails is shown, not raised
                rows.append({"backend": name, "options": options, "architecture": arch, "supported": False,
                             "reason": f"full_precision() raised {type(exc).__name__}: {exc}"})
                continue
            refused: dict = {}
            for weight, keep in kept.items():
                if not keep.by_design:
                    refused.setdefault(keep.reason, []).append(weight)
            reason = "; ".join(f"{len(w)} weight(s) such as {w[0]}: {r}" for r, w in refused.items())
            rows.append({"backend": name, "options": options, "architecture": arch, "supported": not refused,
                         "reason": reason or "every matmul weight in the backend's scope is quantized"})
    return rows


def verify(names=None, architectures=None) -> dict:
    """Run :func:`qadapt.testing.conformance.check_backend` for every backend that can run here.

    The record holds what ``docs/compatibility.md`` is rendered from (``python tools/compat_docs.py``): the machine,
    the versions, each backend's environment check, the declared table (with reasons) and every cell's outcome.
    ``architectures``: names of the panel (:mod:`qadapt.testing.panel`) to run each option set on instead of the toy
    Llama (``docs/architectures.md`` is rendered from those records: ``python tools/panel_docs.py``); the record
    then holds the declared architecture rows too.
    """
    import datetime
    import importlib.metadata
    import os
    import platform
    import time

    import torch

    from ..plugins import checked_environment, registrations
    from .conformance import check_backend

    cuda = torch.cuda.is_available()
    started = time.monotonic()
    versions = {}
    for package in ("torch", "transformers", "peft"):
        versions[package] = importlib.metadata.version(package)
    results = []
    environments = {}
    for name, registration in registrations().items():
        if names and name not in names:
            continue
        backend = registration.backend
        versions[backend.distribution or name] = backend.library_version()
        env = checked_environment(backend)
        environments[name] = {"ok": env.ok, "version": env.version, "reason": env.reason, "hint": env.hint}
        for options in variants(backend):
            if not env.ok:
                results.append({"backend": name, "options": options, "outcome": "unavailable", "detail": env.reason})
                continue
            if options in [dict(v) for v in backend.gpu_variants] and not cuda:
                results.append({"backend": name, "options": options, "outcome": "unavailable",
                                "detail": "verified only on a CUDA GPU"})
                continue
            try:
                calibration = None
                if backend.needs_calibration(backend.validate_options(options)):
                    calibration = _calibration()
                if architectures:
                    cells, source = [], {}
                    for arch in architectures:
                        cells += check_backend(name, options, calibration=calibration, architecture=arch)
                else:
                    cells = check_backend(name, options, calibration=calibration)
                    source = {}
                checkpoint = backend.verification_checkpoint
                if (not architectures and checkpoint and os.path.isdir(checkpoint) and cells
                        and all(cell.outcome == "unavailable" for cell in cells)):
                    # quantizing cannot run here, but adapters on a checkpoint made elsewhere can be checked
                    source = {"source": f"the stored checkpoint {_shown(checkpoint)} (quantizing is unavailable "
                                        f"here: {cells[0].detail})"}
                    cells = check_backend(name, options, model_factory=lambda: checkpoint)
            except Exception as exc:
                results.append({"backend": name, "options": options, "outcome": "failed", "detail": f"{type(exc).__name__}: {exc}"})
                continue
            for cell in cells:
                row = {**cell.to_dict(), "options": options, **source}
                if not architectures:
                    row.pop("architecture", None)  # the toy Llama: records as before
                results.append(row)

    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(time.monotonic() - started, 1),
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "versions": versions, "environments": environments, "declared": declared_rows(names),
              "results": results}
    if architectures:
        record["architectures"] = list(architectures)
        record["declared_architectures"] = declared_architecture_rows(names, architectures)
    return record


def _shown(path: str) -> str:
    """``path`` relative to the working directory where it lies under it (records stay the same on every machine)."""
    import os

    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _calibration():
    """Calibration batches for backends that need them: the test suite's, cut from local text (no downloads)."""
    from . import toy

    return toy.token_batches(toy.build_tokenizer(), batch_size=2, seq_len=32, count=4)
