"""The matmul weights of a model, and the report of what a load did with each of them.

A *matmul weight* is every weight a forward multiplies activations with: ``nn.Linear`` (and its subclasses),
transformers' ``Conv1D`` (GPT-2), the fused 3-D expert parameters of transformers-5 MoE models
(``mlp.experts.gate_up_proj``), MoE routers, and the quantized layers a backend put in their place. Embeddings are
lookups, not matmuls, and are not listed (a tied output head is: it is a matmul).

:func:`matmul_weights` lists them (for backend authors too: a backend's :meth:`~qadapt.QuantBackend.full_precision`
names weights the way it does); :class:`LoadReport` is what ``qadapt.load`` found after loading, read with
``qadapt.load_report(model)``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field

#: names of the linear modules transformers' MoE blocks use as gates (routers) when they are plain ``nn.Linear``
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


@dataclass(frozen=True)
class Kept:
    """Why a backend leaves one matmul weight in full precision (what :meth:`QuantBackend.full_precision` returns).

    ``by_design``: the backend's recipe keeps it (output head, routers); anything else is a limitation, and
    ``qadapt.load`` refuses to leave it in full precision unless the user allows it (``allow_unquantized=``).
    """

    reason: str
    by_design: bool = True


def by_design(reason: str) -> Kept:
    """The backend's recipe keeps this weight in full precision (it is outside the backend's scope)."""
    return Kept(reason, True)


def cannot(reason: str) -> Kept:
    """The backend cannot quantize this weight: ``qadapt.load`` refuses it before any work unless allowed."""
    return Kept(reason, False)


@dataclass(frozen=True)
class MatmulWeight:
    """One matmul weight. ``name`` is the module's name (``model.layers.0.self_attn.q_proj``), or
    ``module.parameter`` for a fused expert parameter (``model.layers.0.mlp.experts.gate_up_proj``)."""

    name: str
    kind: str  # "linear" | "conv1d" | "experts" | "router" | "quantized"
    shape: tuple  # (out, in) for a layer, the parameter's own shape for experts
    layer_class: str
    role: str | None = None  # "head" | "router" | None
    quantized: bool = False

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def matmul_weights(model, is_quantized_layer=None) -> list[MatmulWeight]:
    """Every matmul weight of ``model`` (a transformers model, possibly quantized and wrapped by PEFT), in module
    order. ``is_quantized_layer``: the backend's predicate; such layers are listed as quantized, their children not.

    A fused expert parameter counts as quantized when it is stored as something else than a plain float tensor
    (bitsandbytes' parametrization: packed uint8 plus a ``QuantState``).
    """
    import torch
    import torch.nn.utils.parametrize as parametrize

    conv1d = _conv1d_class()
    heads = _head_modules(model)
    found: list[MatmulWeight] = []
    skip_below = None  # named_modules() walks depth first: a skipped subtree is one run of names
    experts = _num_experts(getattr(model, "config", None))
    for raw_name, module in model.named_modules():
        if not raw_name or (skip_below is not None and raw_name.startswith(skip_below)):
            continue
        if _is_wrapper(module) or _is_adapter_part(raw_name):
            continue  # PEFT's tuner layers and qadapt's proxy: their base layer is listed under its own name
        name = clean_name(raw_name)
        if is_quantized_layer is not None and is_quantized_layer(module):
            found.append(MatmulWeight(name, "quantized", _layer_shape(module), type(module).__name__,
                                      _role(name, module, heads, experts), quantized=True))
            skip_below = raw_name + "."
            continue
        if isinstance(module, torch.nn.Linear):
            shape = (module.out_features, module.in_features)
            found.append(MatmulWeight(name, "linear", shape, type(module).__name__, _role(name, module, heads, experts),
                                      quantized=_tensor_quantized(module.weight)))
            skip_below = raw_name + "."
            continue
        if conv1d is not None and isinstance(module, conv1d):
            shape = tuple(module.weight.shape[::-1])  # Conv1D stores (in, out)
            found.append(MatmulWeight(name, "conv1d", shape, type(module).__name__, _role(name, module, heads, experts),
                                      quantized=_tensor_quantized(module.weight)))
            skip_below = raw_name + "."
            continue
        if _is_router_module(module):
            found.append(MatmulWeight(name, "router", tuple(module.weight.shape), type(module).__name__, "router"))
            skip_below = raw_name + "."
            continue
        for param_name in expert_parameters(module):
            original = _stored(module, param_name)
            tensor = getattr(module, param_name)
            found.append(MatmulWeight(f"{name}.{param_name}", "experts", tuple(tensor.shape), type(module).__name__,
                                      quantized=parametrize.is_parametrized(module, param_name)
                                      or _tensor_quantized(original)))
    return found


def expert_parameters(module) -> list[str]:
    """Names of the fused 3-D expert parameters ``module`` holds itself (quantized by a parametrization or not).

    transformers 5 marks its experts classes with ``use_experts_implementation``, which sets ``is_concatenated`` on
    the instance: a bare "any 3-D parameter" test would also catch quantized layers' own tensors (AQLM's ``codes``).
    """
    if not hasattr(module, "is_concatenated") or isinstance(module, _ModuleTypes.wrapper()):
        return []
    names = [name for name, tensor in module.named_parameters(recurse=False) if tensor.dim() == 3]
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None:
        names += [name for name in parametrizations.keys() if getattr(module, name).dim() == 3 and name not in names]
    return names


def clean_name(name: str) -> str:
    """A module name as the unwrapped model knows it (PEFT's ``base_model.model.`` and ``.base_layer`` removed)."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer", "").replace(".quantized", "")


def is_router(name: str, module) -> bool:
    """A MoE router (gate): transformers 5's ``*TopKRouter`` modules (a 2-D ``weight``, not an ``nn.Linear``), or an
    ``nn.Linear`` named ``gate`` / ``router`` / ``shared_expert_gate`` inside a block that also holds experts."""
    if _is_router_module(module):
        return True
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES and getattr(module, "out_features", 2) <= 256 and (
        "expert" in name or ".mlp.gate" in name or "moe" in name.lower())


def matches(name: str, patterns) -> bool:
    """Is ``name`` one of ``patterns``: a full name, a dot-bounded name suffix (``"shared_expert_gate"``), or an
    ``fnmatch`` pattern (``"*.experts.*"``)?"""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------------------------------------------- the report
@dataclass
class WeightReport:
    name: str
    kind: str
    shape: tuple
    elements: int
    quantized: bool
    status: str  # "quantized" | "kept by design" | "kept, allowed" | "kept in the checkpoint"
    reason: str = ""
    bytes: int = 0
    role: str | None = None  # "head" | "router" | None


@dataclass
class LoadReport:
    """What ``qadapt.load`` did: every matmul weight, quantized or not, each unquantized one with its reason.

    ``str(report)`` is what the load logged; :attr:`bits_per_weight` is over all matmul weights (storage of the layers
    holding them, biases and scales included, over their weight count)."""

    backend: str | None
    weights: list[WeightReport] = field(default_factory=list)
    conversions: dict = field(default_factory=dict)  # e.g. {"defused": [...], "linearized": {...}} (see qadapt.hf)

    @property
    def quantized(self) -> list[WeightReport]:
        return [w for w in self.weights if w.quantized]

    @property
    def full_precision(self) -> list[WeightReport]:
        return [w for w in self.weights if not w.quantized]

    @property
    def quantized_share(self) -> float:
        """Share of matmul weight *elements* that are quantized."""
        total = sum(w.elements for w in self.weights)
        return sum(w.elements for w in self.quantized) / total if total else 0.0

    @property
    def weight_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    @property
    def bits_per_weight(self) -> float:
        total = sum(w.elements for w in self.weights)
        return 8 * self.weight_bytes / total if total else 0.0

    def summary(self) -> str:
        return (f"load with {self.backend or 'no backend'}: {len(self.quantized)} of {len(self.weights)} matmul weights "
                f"quantized ({self.quantized_share:.1%} of their elements), {self.weight_bytes / 2**20:.3f} MiB, "
                f"{self.bits_per_weight:.2f} bits per weight")

    def __str__(self) -> str:
        lines = [self.summary()]
        groups: dict = {}
        for weight in self.full_precision:
            groups.setdefault((weight.status, weight.reason), []).append(weight.name)
        for (status, reason), names in groups.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"  {status}: {shown} ({reason})")
        for kind, value in self.conversions.items():
            modules = value.get("modules", value) if isinstance(value, dict) else value
            lines.append(f"  converted before quantizing ({kind}): {len(modules)} module(s), e.g. {next(iter(modules), '')}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "quantized": len(self.quantized), "weights": len(self.weights),
                "quantized_share": self.quantized_share, "weight_bytes": self.weight_bytes,
                "bits_per_weight": self.bits_per_weight, "conversions": self.conversions,
                "full_precision": [asdict(w) for w in self.full_precision]}


# ---------------------------------------------------------------------------------------------------- helpers
class _ModuleTypes:
    @staticmethod
    def wrapper():
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except Exception:  # pragma: no cover - PEFT is a dependency
            return ()
        return (BaseTunerLayer,)


def _is_wrapper(module) -> bool:
    return isinstance(module, _ModuleTypes.wrapper()) or type(module).__name__ == "QuantizedLinearProxy"


def _is_adapter_part(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith(("lora_", "vera_", "ia3_", "hra_", "oft_")) for p in parts) or "parametrizations" in parts


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover
        return None
    return Conv1D


def _head_modules(model) -> set:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    found = set()
    while head is not None:
        found.add(id(head))
        head = getattr(head, "base_layer", None) or getattr(head, "quantized", None)
    return found


def _num_experts(config):
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _role(name, module, heads, experts):
    if id(module) in heads:
        return "head"
    if experts is not None and is_router(name, module):
        return "router"
    return None


def _is_router_module(module) -> bool:
    import torch

    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("Router") and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and not isinstance(module, torch.nn.Linear))


def _layer_shape(module) -> tuple:
    out_features, in_features = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_features, int) and isinstance(in_features, int):
        return (out_features, in_features)
    weight = getattr(module, "weight", None)
    return tuple(getattr(weight, "shape", ())) or (0,)


def _stored(module, name):
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and name in parametrizations:
        return parametrizations[name].original
    return module._parameters[name]


def _tensor_quantized(tensor) -> bool:
    """A weight stored as something else than a plain float tensor (a tensor subclass, integer codes)."""
    import torch

    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return type(data) is not torch.Tensor or not data.dtype.is_floating_point
