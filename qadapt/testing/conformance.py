"""The conformance kit: drive every cell a backend declares and check that reality agrees.

For plugin authors and maintainers::

    from qadapt.testing import check_backend
    results = check_backend("mybackend", {"bits": 4})
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]

or ``qadapt matrix --verify --backend mybackend``. Each declared ``yes`` is performed and measured; each ``no`` must
raise qadapt's error before any weight changes. Checks, per method:

* ``load``: every matmul weight is quantized or accounted for (``qadapt.load`` checks it: the load report); a model
  part the backend declares it cannot quantize refuses the load before any work (``ArchitectureError``): every cell of
  the method is then "refused for this architecture".
* ``train``: attach, two optimizer steps; the loss is finite, adapter weights change, no base weight changes, and
  every quantized matmul weight got an adapter (``target_modules="all-linear"``: nothing is silently left out). An
  ``ArchitectureError`` from attach (an adapter method PEFT cannot put on this architecture's layers) refuses the
  method's cells the same way.
* ``merge`` (requantize): the merged model's output error against the unquantized merge (the unmerged adapter model)
  is below 0.8 x that of the base model without the adapter: the merge keeps a real part of what the adapter does
  (how much is the backend's rounding; the merge report gives the figure, and ``max_error=`` refuses).
* ``merge_dequantized``: the merged model matches the unquantized merge to float precision (relative error < 1e-4,
  or the backend's declared ``forward_tolerance`` where its forward rounds activations too, as LLM.int8 does).
* ``unmerge``: after either merge, the outputs are bit-for-bit those of before the merge.
* ``save``: save, reload, same outputs.
* ``train_fsdp2`` / ``train_zero3``: a fresh model sharded by the engine in a process group of one (the code path of
  every world size), verified by qadapt (payload bytes gathered bit for bit, quantization state unchanged); its loss
  equals the unsharded model's, two optimizer steps change the adapter with finite losses. A declared ``no`` must be
  refused by ``qadapt.distributed.shard`` before the model changes. A backend whose
  :meth:`~qadapt.QuantBackend.sharding_problems` rule out one process (torchao's NF4) must be refused there the same
  way; the cell is then "skipped" here and its multi-process test (``nox -s distributed``) performs it.
"""

from __future__ import annotations

import contextlib

import os
import tempfile
import warnings
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..capabilities import METHODS, OPERATIONS
from ..errors import ArchitectureError, BackendUnavailableError, QadaptError
from . import panel, toy

#: the outcome of every cell of a method when the backend or the adapter method declares it cannot handle the model
ARCHITECTURE_REFUSED = "refused for this architecture"


@dataclass
class CellResult:
    backend: str
    method: str
    operation: str
    declared: bool
    outcome: str  # "passed", "refused as declared", "refused for this architecture", "failed...", "skipped", "unavailable"
    detail: str = ""
    architecture: str | None = None  # the panel architecture it ran on (None: a model_factory of the caller's)

    @property
    def ok(self) -> bool:
        return self.outcome in ("passed", "refused as declared", ARCHITECTURE_REFUSED, "skipped", "unavailable")

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.backend} {self.method} {self.operation}: {self.outcome} {self.detail}".rstrip()


#: adapter options that start training from a non-zero adapter, so that a merge has something to keep
STRONG_INIT = {
    "lora": {"init_lora_weights": False},
    "dora": {"init_lora_weights": False},
    "vera": {"init_weights": False},
    "adalora": {"init_lora_weights": False, "total_step": 4},
    "ia3": {"init_ia3_weights": False},
}


def check_backend(
    backend: str,
    options: dict[str, Any] | None = None,
    *,
    methods=METHODS,
    model_factory: Callable | None = None,
    architecture: str | None = None,
    calibration=None,
    seed: int = 0,
) -> list[CellResult]:
    """Check every declared cell of ``backend`` (with ``options``) for ``methods``. Never raises for a cell.

    :param model_factory: builds the full-precision model (or returns a folder) to quantize; default: the toy Llama.
    :param architecture: a name of the architecture panel (:mod:`qadapt.testing.panel`: ``"gpt2"``, ``"mixtral"``,
        ...) to run on instead of ``model_factory``.
    :param calibration: token-id batches for backends that need them.
    """
    if architecture is not None:
        if model_factory is not None:
            from ..errors import InvalidOptionError

            raise InvalidOptionError("check_backend", "both architecture and model_factory given", "Pass one of them")
        model_factory = panel.factory(architecture)
    import torch

    from ..plugins import get_backend

    options = options or {}
    quant = get_backend(backend)
    resolved = quant.validate_options(options)
    table = quant.capabilities(resolved)
    results: list[CellResult] = []
    generator = torch.Generator().manual_seed(seed)
    for method in methods:
        cells = _Cells(backend, method, table, results, architecture)
        _check_method(cells, quant, resolved, options, model_factory or toy.build_model, calibration, generator)
    return results


class _Cells:
    """Records the outcome of one method's cells."""

    def __init__(self, backend, method, table, results, architecture=None):
        self.backend, self.method, self.table, self.results = backend, method, table, results
        self.architecture = architecture

    def declared(self, operation) -> bool:
        return bool(self.table[(self.method, operation)])

    def record(self, operation, outcome, detail=""):
        self.results.append(CellResult(self.backend, self.method, operation, self.declared(operation), outcome, detail,
                                       self.architecture))

    def record_rest(self, operations, outcome, detail):
        for operation in operations:
            self.record(operation, outcome, detail)


def _check_method(cells, quant, resolved, options, model_factory, calibration, generator) -> None:
    from .. import api

    method = cells.method
    try:
        quantized = api.load(model_factory(), quant.name, calibration=calibration, **options)
    except BackendUnavailableError as exc:  # e.g. an option set that needs a GPU, on a CPU machine
        return cells.record_rest(OPERATIONS, "unavailable", str(exc))
    except ArchitectureError as exc:  # declared by the backend (full_precision), refused before any work
        return cells.record_rest(OPERATIONS, ARCHITECTURE_REFUSED, str(exc))
    except Exception as exc:  # quantization itself failed: every cell of this method fails
        return cells.record_rest(OPERATIONS, "failed", f"quantize: {type(exc).__name__}: {exc}")
    batch = _random_batch(quantized, generator)
    later = [op for op in OPERATIONS if op != "train"]
    if not cells.declared("train"):
        before = _snapshot(quantized)
        outcome = _expect_refusal(lambda: api.attach(quantized, method, **STRONG_INIT[method]))
        if outcome == "refused as declared" and not _same(before, _snapshot(quantized)):
            outcome = "failed"
        cells.record("train", outcome, "" if outcome != "failed" else "no QadaptError, or weights changed")
        return cells.record_rest(later, "skipped", "training is refused")
    try:
        before = _snapshot(quantized)
        model = api.attach(quantized, method, **STRONG_INIT[method])
    except ArchitectureError as exc:
        outcome = ARCHITECTURE_REFUSED if _same(before, _snapshot(quantized)) else "failed"
        cells.record("train", outcome, str(exc) if outcome != "failed" else "refused after changing weights")
        return cells.record_rest(later, "skipped", "training is refused on this architecture")
    except Exception as exc:
        cells.record("train", "failed", _describe(exc))
        return cells.record_rest(later, "skipped", "training failed")
    try:
        _coverage_check(model)
        _train_check(model, batch)
        cells.record("train", "passed")
    except Exception as exc:
        cells.record("train", "failed", _describe(exc))
        return cells.record_rest(later, "skipped", "training failed")
    model.eval()
    reference = _outputs(model, batch)
    _check_merges(cells, model, batch, reference, quant.forward_tolerance(resolved))
    _check_save(cells, model, batch, reference)
    _check_sharded(cells, model, lambda: api.load(model_factory(), quant.name, calibration=calibration, **options), batch)


def _random_batch(model, generator):
    import torch

    device = next(model.parameters()).device
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=generator).to(device)


def _outputs(model, batch):
    import torch

    with torch.no_grad():
        return model(input_ids=batch).logits


def _check_merges(cells, model, batch, reference, tolerance) -> None:
    """Both merge strategies (or their refusals), then unmerge after each merge that succeeded."""
    import torch

    from .. import api

    with model.disable_adapter():
        adapter_effect = _rel(_outputs(model, batch), reference)
    unmerge_ok = []
    for strategy, operation in (("requantize", "merge"), ("dequantize", "merge_dequantized")):
        if not cells.declared(operation):
            before = _snapshot(model)
            outcome = _expect_refusal(lambda: api.merge(model, strategy, calibration=batch))
            if outcome == "refused as declared" and not _same(before, _snapshot(model)):
                outcome = "failed"
            cells.record(operation, outcome)
            continue
        try:
            report = api.merge(model, strategy, calibration=batch)
            error = _rel(_outputs(model, batch), reference)
            if strategy == "dequantize":
                good, bound = error < tolerance, f"< {tolerance:g}"
            else:
                bound = f"< 0.8 x the adapter's own effect ({adapter_effect:.3g})"
                good = error < 0.8 * adapter_effect
            detail = f"output error {error:.3g} {bound}; report says {report.output_error:.3g}"
            cells.record(operation, "passed" if good and abs(report.output_error - error) < 1e-3 else "failed", detail)
            api.unmerge(model)
            unmerge_ok.append(torch.equal(_outputs(model, batch), reference))
        except Exception as exc:
            cells.record(operation, "failed", _describe(exc))
            return_to_unmerged(model)
    if not cells.declared("unmerge"):
        cells.record("unmerge", "skipped", "no merge is declared")
    elif unmerge_ok and all(unmerge_ok):
        cells.record("unmerge", "passed", f"exact after {len(unmerge_ok)} merge(s)")
    else:
        cells.record("unmerge", "failed", "outputs differ after unmerge" if unmerge_ok else "no merge succeeded")


def _check_save(cells, model, batch, reference) -> None:
    from .. import api

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "saved")
        if not cells.declared("save"):
            return cells.record("save", _expect_refusal(lambda: api.save(model, path)))
        try:
            with warnings.catch_warnings():  # the kit checks weights; its toy models come from no folder
                warnings.filterwarnings("ignore", message=r"qadapt\.save\(.*no tokenizer was passed")
                api.save(model, path)
                reloaded = api.load(path)
                reloaded.eval()
                error = _rel(_outputs(reloaded, batch), reference)
                detail = f"reload output error {error:.3g}"
                if cells.method == "lora":  # a reloaded model saves again (transformers 5.x: NotImplementedError)
                    api.save(reloaded, os.path.join(tmp, "again"))
                    again = _rel(_outputs(api.load(os.path.join(tmp, "again")), batch), reference)
                    error, detail = max(error, again), f"{detail}, after saving the reloaded model again {again:.3g}"
            cells.record("save", "passed" if error < 1e-5 else "failed", detail)
        except Exception as exc:
            cells.record("save", "failed", _describe(exc))


def _check_sharded(cells, model, fresh, batch) -> None:
    """The engines' cells: performed on a fresh model (sharding cannot be undone), refusals on ``model``."""
    import torch
    import torch.distributed as dist

    from .. import api, distributed
    from ..capabilities import ENGINES
    from ..distributed.zero3 import available
    from ..plugins import backend_of
    from ..record import get_record

    for engine, operation in ENGINES.items():
        if not cells.declared(operation):
            before = _snapshot(model)
            outcome = _expect_refusal(lambda: distributed.shard(model, engine))
            if outcome == "refused as declared" and not _same(before, _snapshot(model)):
                outcome = "failed"
            cells.record(operation, outcome)
            continue
        if engine == "zero3" and available():
            cells.record(operation, "unavailable", available())
            continue
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            cells.record(operation, "skipped", "run in a process group of its own (this one has several ranks)")
            continue
        try:
            with distributed.one_process_group():
                candidate = api.attach(fresh(), cells.method, **STRONG_INIT[cells.method])
                record = get_record(candidate)
                limits = backend_of(record).sharding_problems(candidate, record.options, engine, 1)
                if limits:  # the backend shards from several processes only: refused here, before any change
                    before = _snapshot(candidate)
                    outcome = _expect_refusal(lambda: distributed.shard(candidate, engine))
                    if outcome == "refused as declared" and _same(before, _snapshot(candidate)):
                        cells.record(operation, "skipped", "needs several processes (its multi-process test runs it); "
                                     f"in one it is refused before any change: {limits[0]}")
                    else:
                        cells.record(operation, "failed", "the backend's sharding_problems were not refused by shard")
                    continue
                candidate.train()
                with _same_random_draws():  # dropout (GPT-2's, OPT's configs): the same masks in both runs
                    unsharded = candidate(input_ids=batch, labels=batch).loss.item()
                keywords = {}
                if engine == "zero3":  # DeepSpeed wraps the optimizer it steps
                    keywords["optimizer"] = torch.optim.AdamW([p for p in candidate.parameters() if p.requires_grad],
                                                              lr=1e-3)
                wrapped = distributed.shard(candidate, engine, **keywords)
                report = distributed.last_report(wrapped)
                with _same_random_draws():
                    losses = _train_sharded(wrapped, engine, batch)
            gap = abs(losses[0] - unsharded) / max(abs(unsharded), 1e-12)
            detail = (f"{report.layers} layers verified, payload gathered bit for bit ({report.payload_checked}); "
                      f"loss {losses[0]:.6g} vs unsharded {unsharded:.6g}")
            cells.record(operation, "passed" if gap < 1e-4 else "failed", detail)
        except Exception as exc:
            cells.record(operation, "failed", _describe(exc))


@contextlib.contextmanager
def _same_random_draws():
    """Random draws (dropout masks) from the same seed inside; the caller's random state untouched outside."""
    import torch

    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        torch.manual_seed(0)
        yield


def _train_sharded(wrapped, engine, batch) -> list[float]:
    """Two steps on a sharded model (DeepSpeed's engine steps itself); the losses. Raises if nothing trains."""
    import torch

    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable] if engine != "zero3" else None  # ZeRO-3: partitioned, see losses
    optimizer = torch.optim.AdamW(trainable, lr=1e-3) if engine != "zero3" else None
    losses = []
    for _ in range(2):
        loss = wrapped(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise AssertionError(f"loss is {loss.item()}")
        if engine == "zero3":
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    if before is not None and all(torch.equal(a, p.detach()) for a, p in zip(before, trainable)):
        raise AssertionError("no adapter weight changed")
    if losses[1] == losses[0]:
        raise AssertionError("the loss did not move")
    return losses


def return_to_unmerged(model) -> None:
    from ..record import get_record

    if get_record(model).merge is not None:
        from .. import api

        api.unmerge(model)


def _train_check(model, batch) -> None:
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise AssertionError("no trainable parameters after attach")
    before = _snapshot(model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    for _ in range(2):
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise AssertionError(f"loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _snapshot(model)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    changed = {name for name in before if not _bits_equal(before[name], after[name])}
    if not changed & names:
        raise AssertionError("no adapter weight changed")
    frozen_changed = changed - names
    if frozen_changed:
        raise AssertionError(f"base weights changed: {sorted(frozen_changed)[:3]}")


def _coverage_check(model) -> None:
    """Every quantized matmul weight of the load report has an adapter (``target_modules="all-linear"``)."""
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..api import load_report
    from ..inventory import clean_name

    report = load_report(model)
    if report is None:
        return
    adapted = set()
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            adapted.add(f"{clean_name(name)}.{module.parameter_name}")
        elif isinstance(module, BaseTunerLayer):
            adapted.add(clean_name(name))
    missing = [w.name for w in report.quantized if w.name not in adapted and w.role != "router"]
    if missing:
        raise AssertionError(f"{len(missing)} quantized matmul weight(s) got no adapter: {missing[:4]}")


def _snapshot(model) -> dict:
    import torch

    snapshot = {}
    for name, param in model.named_parameters():
        data = param.detach()
        if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
            # a tensor subclass (torchao): its inner tensors, as stored (some layouts cannot de-quantize)
            for inner in data.__tensor_flatten__()[0]:
                snapshot[f"{name}:{inner}"] = getattr(data, inner).detach().clone()
            continue
        if type(data) is not torch.Tensor and hasattr(data, "dequantize"):
            data = data.dequantize()
        snapshot[name] = data.clone()
    return snapshot


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_bits_equal(a[k], b[k]) for k in a)


def _bits_equal(a, b) -> bool:
    """The same bytes: packed codes stored as floats (bitsandbytes' quant storage) hold NaN patterns, which
    ``torch.equal`` calls different from themselves."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    # a copy in the contiguous layout: ``contiguous()`` keeps the stride of a one-element view (NF4Tensor's scale
    # factor), which ``view(torch.uint8)`` then refuses
    as_bytes = lambda t: t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)  # noqa: E731
    return torch.equal(as_bytes(a), as_bytes(b))


def _expect_refusal(action) -> str:
    try:
        action()
    except QadaptError:
        return "refused as declared"
    except Exception as exc:
        return f"failed: raised {type(exc).__name__} instead of a QadaptError"
    return "failed: declared unsupported, but it worked"


def _rel(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {os.path.basename(last.filename)}:{last.lineno}" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"[:400]
