"""What a load must quantize: the check against the backend's declared scope before any work, and the load report
after it.

The scope of a backend on a model is every matmul weight (:func:`qadapt.inventory.matmul_weights`) except those its
recipe keeps in full precision by design (:meth:`qadapt.QuantBackend.full_precision`: output head, routers). A weight
in scope that the backend says it cannot quantize refuses the load before the backend runs, naming the layers, unless
the user allowed it (``qadapt.load(..., allow_unquantized=[names or patterns])``). After the load, every matmul weight
is either quantized or accounted for; a weight the backend left in full precision without saying so is refused too.
"""

from __future__ import annotations

import logging

from .errors import ArchitectureError, IncompatibleError
from .inventory import LoadReport, WeightReport, matches, matmul_weights

LOG = logging.getLogger("qadapt")
ALLOWED = "kept, allowed by allow_unquantized"


def check_before(model, backend, options, allow, asked: str) -> dict:
    """The backend's ``full_precision`` answer for ``model``; :class:`ArchitectureError` naming every weight it cannot
    quantize that ``allow`` does not list. Nothing has been changed when it raises."""
    kept = backend.full_precision(model, options)
    refused = {name: keep for name, keep in kept.items() if not keep.by_design and not matches(name, allow)}
    if refused:
        raise ArchitectureError(asked, _listing(refused, len(matmul_weights(model))),
                                "Pass allow_unquantized=[names or patterns] to keep them in full precision knowingly "
                                "(the load report lists them), or use a backend that quantizes them")
    return kept


def report(model, backend, options, *, kept=None, allow=(), from_checkpoint=False, asked="load") -> LoadReport:
    """The load report of a loaded ``model``, stored nowhere (see :func:`record_report`). A matmul weight left in full
    precision that neither ``kept`` (the backend's declaration) nor ``allow`` accounts for is refused, unless the
    weights came from a checkpoint as they are (``from_checkpoint``: what it holds is the checkpoint's choice)."""
    from .hf import conversions
    from .memory import storage_bytes

    if kept is None:
        kept = backend.full_precision(model, options)
    rows, undeclared = [], {}
    modules = _modules_by_name(model)
    for weight in matmul_weights(model, backend.is_quantized_layer):
        status, reason = "quantized", ""
        if not weight.quantized:
            keep = kept.get(weight.name)
            if keep is not None and keep.by_design:
                status, reason = "kept by design", keep.reason
            elif keep is not None or matches(weight.name, allow):
                status, reason = ALLOWED, keep.reason if keep is not None else "listed by the user"
            elif from_checkpoint:
                status, reason = "kept in the checkpoint", "the loaded folder holds it in full precision"
            else:
                undeclared[weight.name] = weight
        rows.append(WeightReport(weight.name, weight.kind, weight.shape, weight.elements, weight.quantized, status,
                                 reason, _bytes(modules, weight, storage_bytes), weight.role))
    if undeclared:
        names = ", ".join(list(undeclared)[:6]) + (" ..." if len(undeclared) > 6 else "")
        # not an ArchitectureError: the backend broke its own declaration (a bug to fix there, not a declared refusal)
        raise IncompatibleError(asked, f"backend '{backend.name}' left {len(undeclared)} matmul weight(s) in full precision "
                                f"without declaring it: {names}",
                                "Report this to the backend's authors; pass allow_unquantized=[...] to accept it")
    return LoadReport(None if backend.name == "none" else backend.name, rows, conversions(model))


def record_report(model, load_report: LoadReport) -> None:
    """Keep the report on the model's qadapt record (``qadapt.load_report(model)``) and log it once."""
    from .record import get_record

    get_record(model).load_report = load_report
    LOG.info("%s", load_report)


def _listing(refused: dict, total: int) -> str:
    by_reason: dict = {}
    for name, keep in refused.items():
        by_reason.setdefault(keep.reason, []).append(name)
    parts = [f"{', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''} ({reason})"
             for reason, names in by_reason.items()]
    return f"{len(refused)} of {total} matmul weights would stay in full precision: " + "; ".join(parts) + \
        " (nothing was changed)"


def _bytes(modules, weight, storage_bytes) -> int:
    module_name, _, parameter = weight.name.rpartition(".") if weight.kind == "experts" else (weight.name, "", "")
    module = modules.get(module_name)
    if module is None:
        return 0
    if weight.kind != "experts":
        return storage_bytes(module)
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and parameter in parametrizations:
        return storage_bytes(parametrizations[parameter])
    tensor = module._parameters[parameter]
    return tensor.numel() * tensor.element_size()


def _modules_by_name(model) -> dict:
    """``{name as the unwrapped model knows it: module}``; behind a PEFT wrapper or qadapt's proxy, the layer it wraps
    (named_modules() lists wrappers before what they wrap, so the innermost one wins)."""
    from .inventory import clean_name

    return {clean_name(raw): module for raw, module in model.named_modules()}
