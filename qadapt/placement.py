"""Where ``qadapt.load`` puts a model: transformers' ``device_map`` (incl. ``"auto"``), ``max_memory``, and CPU offload
of parts, for the backends that honour them (:meth:`~qadapt.QuantBackend.placement`), refused for the others.

Checked before any work (the backend's declaration, the map's values), and after loading: the map the model was
actually given (transformers' ``hf_device_map``). What "auto" or a custom map puts on the CPU stays in full precision
there (bitsandbytes' ``llm_int8_enable_fp32_cpu_offload``: its linear layers are not quantized); that happens only with
``cpu_offload=True`` and is recorded (:func:`placement_of`), never silently. Disk offload is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from .errors import IncompatibleError, InvalidOptionError, QadaptError
from .hf import Placement, placed


def check(backend, options: dict, asked: str, *, device_map: Any = None, max_memory: Any = None,
          cpu_offload: bool = False) -> Placement | None:
    """The requested placement (None: the default, all on :func:`qadapt.hf.default_device`), or a refusal."""
    if device_map is None and max_memory is None and not cpu_offload:
        return None
    if not isinstance(cpu_offload, bool):
        raise InvalidOptionError(f"{asked} with cpu_offload={cpu_offload!r}", "expected True or False",
                                 "Pass cpu_offload=True or False")
    asked_for = {"device_map": device_map is not None, "max_memory": max_memory is not None, "cpu_offload": cpu_offload}
    support = backend.placement(options)
    for name, wanted in asked_for.items():
        if wanted and not support[name]:
            raise IncompatibleError(f"{asked} with {name}=...", support[name].reason, support[name].hint)
    if max_memory is not None and device_map is None:
        device_map = "auto"  # transformers applies max_memory only while it infers a map
    if isinstance(device_map, dict):
        values = {str(v) for v in device_map.values()}
        if "disk" in values:
            raise IncompatibleError(f"{asked} with a device_map that offloads to disk", "qadapt does not offload "
                                    "weights to disk (they would be re-read at every step)",
                                    "Map those modules to the CPU with cpu_offload=True, or give more max_memory")
        if "cpu" in values and _has_gpu() and not cpu_offload:
            raise InvalidOptionError(f"{asked} with a device_map that puts modules on the CPU",
                                     "modules mapped to the CPU stay in full precision there (not quantized)",
                                     "Pass cpu_offload=True to accept that, or map them to a GPU")
    if cpu_offload and device_map is None:
        raise InvalidOptionError(f"{asked} with cpu_offload=True", "nothing says which modules go to the CPU",
                                 "Pass device_map (a dict, or 'auto' with max_memory)")
    return Placement(device_map=device_map, max_memory=max_memory, cpu_offload=cpu_offload)


@contextmanager
def applied(where: Placement | None, asked: str = "load"):
    """The context in which the backend loads: :func:`qadapt.hf.placement` returns ``where`` inside it. A placement
    transformers refuses (e.g. bitsandbytes with modules mapped to the CPU and no ``cpu_offload``; with a ``max_memory``
    too small for the model) becomes a refusal saying so."""
    if where is None:
        yield
        return
    try:
        with placed(where):
            yield
    except ValueError as exc:
        if "device_map" not in str(exc) and "dispatched" not in str(exc):
            raise
        raise IncompatibleError(f"{asked} with device_map={where.device_map!r}", f"transformers refused the placement "
                                f"({str(exc).splitlines()[0][:300]})",
                                "Give the GPUs more max_memory, or pass cpu_offload=True to keep the modules that "
                                "do not fit on the CPU, in full precision") from exc


def verify(model, backend, where: Placement | None, asked: str) -> dict | None:
    """After loading: the model sits where it was asked to (an explicit map: every parameter under each entry on
    its device), nothing on disk, nothing on the CPU without ``cpu_offload``; returns what is recorded: the map, the
    modules on the CPU, the linear layers left unquantized."""
    if where is None:
        return None
    import torch

    values = {name: str(device) for name, device in (getattr(model, "hf_device_map", None) or {}).items()}
    if not values:  # transformers 5.23 records no hf_device_map when the whole model landed on one device
        values = {"": str(next(iter({p.device for p in model.parameters()})))} if _one_device(model) else {}
    if isinstance(where.device_map, dict):
        _check_explicit(model, where.device_map, backend, asked)
    on_disk = sorted(name for name, device in values.items() if device == "disk")
    if on_disk or not values:
        raise IncompatibleError(asked, f"the map put {len(on_disk)} module(s) on disk (e.g. {on_disk[:1]}): qadapt "
                                "does not offload weights to disk" if on_disk else "the model has no device map and "
                                "lies on several devices", "Give more max_memory, or map modules to the CPU with "
                                "cpu_offload=True")
    on_cpu = sorted(name for name, device in values.items() if device == "cpu") if _has_gpu() else []
    if on_cpu and not where.cpu_offload:
        raise IncompatibleError(asked, f"the map put {len(on_cpu)} module(s) on the CPU (e.g. {on_cpu[0]}), where "
                                "they stay in full precision", "Pass cpu_offload=True to accept that, or give the GPUs "
                                "more max_memory")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    unquantized = sorted(name for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and module is not output
                         and not backend.is_quantized_layer(module))
    return {"device_map": values, "on_cpu": on_cpu, "not_quantized": unquantized}


def _one_device(model) -> bool:
    return len({p.device for p in model.parameters()}) == 1


def _check_explicit(model, device_map: dict, backend, asked: str) -> None:
    import torch

    wrong = []
    for prefix, device in device_map.items():
        if str(device) == "disk":
            continue
        want = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        for name, param in model.named_parameters():
            if prefix and name != prefix and not name.startswith(prefix + "."):
                continue
            here = (param.device.type, param.device.index or 0)
            # accelerate keeps CPU-offloaded weights in its own map and leaves meta tensors in the module
            if here != (want.type, want.index or 0) and not (want.type == "cpu" and param.device.type == "meta"):
                wrong.append(f"{name} on {param.device}, not {want}")
    if wrong:
        raise QadaptError(asked, f"backend '{backend.name}' declares that it honours device_map, but {len(wrong)} "
                                 f"parameter(s) are elsewhere (e.g. {wrong[0]})",
                          "Report this to the plugin's authors; leave device_map out meanwhile")


def placement_of(model) -> dict | None:
    """What ``qadapt.load`` recorded about where ``model`` is: ``device_map`` (module -> device), ``on_cpu`` (modules
    offloaded there) and ``not_quantized`` (linear layers kept in full precision, e.g. those offloaded); None where the
    default placement was used."""
    from .record import get_record

    return get_record(model).placement


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
