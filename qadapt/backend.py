"""The contract every quantization backend implements.

A backend is a :class:`QuantBackend` subclass; a plugin hands instances to qadapt through the ``register_backends``
hook (:mod:`qadapt.hookspecs`). The whole contract is in this class, documented member by member in
``docs/plugins.md`` (a test keeps the two in step):

* **always required**: :attr:`name`, :meth:`capabilities`, :meth:`quantize`, and which layers are the backend's
  (:meth:`quantized_layer_types` or :meth:`is_quantized_layer`);
* **required by what you declare**: a ``save`` cell that says yes needs :meth:`save` and :meth:`load`; a
  ``merge_dequantized`` yes (or any :attr:`proxy_methods`) needs :meth:`dequantize`; a ``merge`` yes needs
  :meth:`requantize`; :attr:`requantize_policies` / :attr:`requantize_uses_inputs` need the matching ``policy=`` /
  ``hessian=`` keywords of :meth:`requantize`. qadapt checks these when the plugin registers (:func:`contract_problems`)
  and skips a backend that breaks them, recording why;
* **optional**: everything else has a default that says what it does;
* **not to be overridden**: :meth:`validate_options`, :meth:`peft_compatible`, :meth:`can_merge`,
  :meth:`library_version` read the declarations above.

Rules that keep qadapt light and honest: import the backend library inside methods, never at module import time
(``import qadapt`` and ``qadapt backends`` must not import it); :meth:`check_environment` never raises;
:meth:`capabilities` is a promise the conformance kit (:mod:`qadapt.testing.conformance`) checks.
"""

from __future__ import annotations

import abc
import importlib
import math
import importlib.metadata
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from .capabilities import METHODS, OPERATIONS, Support, Table, no
from .errors import InvalidOptionError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Option:
    """One option a backend accepts in ``qadapt.load(..., backend=NAME, **options)``.

    The value is checked against ``type`` (default: the type of ``default``): ``bool`` takes only True/False; ``int``
    only integers (not bools); ``float`` integers or floats, finite, returned as float; ``str`` only strings; ``tuple``
    a list or tuple whose items are all ``items`` (returned as a tuple). ``minimum`` / ``maximum`` bound numbers
    (inclusive); ``choices`` lists the only values accepted. ``default=None`` with no ``type`` accepts anything.

    ``runtime=True`` marks an option that says how the quantized weights are run (a kernel, a compute dtype), not what
    they are: an adapter trained on a base moves freely to a base that differs from it only in runtime options.
    """

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    type: type | None = None
    runtime: bool = False
    minimum: float | None = None
    maximum: float | None = None
    items: type | None = None

    def validate(self, backend: str, value: Any) -> Any:
        expected = self.type or type(self.default)
        if self.default is None and self.type is None:
            return value
        asked = f"{backend} option {self.name}={value!r}"
        if expected is bool and not isinstance(value, bool):
            raise InvalidOptionError(asked, "expected True or False", f"Pass {self.name}=True or False")
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidOptionError(asked, "expected an integer", self._choices_hint())
        if expected is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidOptionError(asked, "expected a finite number", self._choices_hint())
            value = float(value)
        if expected is str and not isinstance(value, str):
            raise InvalidOptionError(asked, "expected a string", self._choices_hint())
        if expected is tuple:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise InvalidOptionError(asked, "expected a list or tuple", self.help)
            if self.items is not None and not all(isinstance(item, self.items) and not (
                    self.items is int and isinstance(item, bool)) for item in value):
                raise InvalidOptionError(asked, f"expected a list of {self.items.__name__} values", self.help)
            value = tuple(value)
        if expected in (int, float):
            if self.minimum is not None and value < self.minimum:
                raise InvalidOptionError(asked, f"{self.name} must be at least {self.minimum}", self.help)
            if self.maximum is not None and value > self.maximum:
                raise InvalidOptionError(asked, f"{self.name} must be at most {self.maximum}", self.help)
        if self.choices is not None and not _among(value, self.choices):
            raise InvalidOptionError(
                f"backend '{backend}' with {self.name}={value!r}",
                f"{self.name} must be one of {', '.join(map(repr, self.choices))}",
                self.help,
            )
        return value

    def _choices_hint(self) -> str:
        return f"Choose one of {', '.join(map(repr, self.choices))}" if self.choices else self.help


def _among(value, choices) -> bool:
    """``value in choices``, where 1 is not True and 1.0 is not 1 (``in`` alone compares by ``==``)."""
    return any(type(value) is type(choice) and value == choice for choice in choices)


@dataclass(frozen=True)
class MemoryProfile:
    """What one of a backend's quantized layers costs in memory, for :func:`qadapt.memory_model.predict` (``qadapt
    plan``). Every figure is per weight of the layer (``in_features x out_features``) unless it says otherwise."""

    #: bits per weight of the quantized payload: the tensor a distributed engine shards
    payload_bits: float
    #: bits per weight of the quantization state held beside the payload (bitsandbytes' ``quant_state``, HQQ's
    #: ``meta``): every rank keeps it whole under FSDP2
    state_bits: float = 0.0
    #: bytes per output row of state (row scales: LLM.int8's SCB, torchao int8's scale), kept whole on every rank
    row_bytes: float = 0.0
    #: activations the layers keep for the backward beyond a plain ``nn.Linear``'s, per token and decoder layer:
    #: (copies of a hidden-size vector, copies of an intermediate-size vector), in the compute dtype
    saved_inputs: tuple[float, float] = (0.0, 0.0)
    #: the layer keeps its de-quantized weight for the backward (torchao's int8 linear)
    saves_dequantized_weight: bool = False


#: ``qadapt.load`` keywords that place a model the way transformers' ``from_pretrained`` does
PLACEMENTS = ("device_map", "max_memory", "cpu_offload")


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


class QuantBackend(abc.ABC):
    """Base class for a quantization backend: set the class attributes, implement the abstract methods and the ones
    your capability table promises.

    Capabilities are per options (torchao int4 trains differently from int8), so most methods take the validated
    ``options`` dict that :meth:`validate_options` returned.
    """

    # ------------------------------------------------------------------ who it is
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
    #: accepted options
    options: tuple[Option, ...] = ()

    # ------------------------------------------------------------------ what it needs and offers
    #: True if :meth:`quantize` needs calibration data (per options: override :meth:`needs_calibration`)
    requires_calibration: bool = False
    #: adapter methods PEFT has no layer for on this backend, for which qadapt presents the quantized layers as
    #: ``nn.Linear`` (see :mod:`qadapt.proxy`); declare them trainable in :meth:`capabilities` only once verified
    proxy_methods: tuple[str, ...] = ()
    #: the re-quantization policies :meth:`requantize` accepts as ``policy=`` (see :mod:`qadapt.merging.requant`);
    #: empty: it has one way to re-quantize and takes no ``policy``
    requantize_policies: tuple[str, ...] = ()
    #: True if :meth:`requantize` takes ``hessian=`` (the layer's input statistics) to round with them
    requantize_uses_inputs: bool = False
    #: True once the layers of :meth:`training_dequantizer` were seen, on a GPU, to train the same inside
    #: ``torch.compile(fullgraph=True)`` with CUDA graphs (qadapt's GPU tests): ``qadapt.prepare``'s
    #: ``compile="auto"`` then compiles each decoder layer with CUDA graphs; False: "auto" leaves it off and says so
    #: (``compile="graphs"`` or ``"regional"`` still try, and stop at the first step if dynamo cannot trace the route)
    training_route_compiles: bool = False
    #: the PEFT LoRA dispatchers (``peft.tuners.lora.model.dispatch_*``) this backend's layers need; qadapt stubs the
    #: others while attaching, because PEFT imports every installed backend library on every attach (seconds).
    #: ``()``: PEFT's default ``nn.Linear`` dispatch (or :meth:`peft_layer_types`) is enough; ``None``: full dispatch
    peft_dispatchers: tuple[str, ...] | None = None

    #: ``(logger name, message pattern, why)``: messages its library logs that say nothing a user can act on
    #: (seen with the versions named in ``why``); qadapt filters them unless ``QADAPT_VERBOSE=1``
    harmless_messages: tuple[tuple[str, str, str], ...] = ()

    # ------------------------------------------------------------------ how it is shown and verified
    #: option sets ``qadapt matrix`` shows and verifies (and the conformance tests run)
    matrix_variants: tuple[Mapping[str, Any], ...] = ({},)
    #: option sets verified only where a CUDA GPU is present (shown in the declared table where they validate)
    gpu_variants: tuple[Mapping[str, Any], ...] = ()
    #: the options ``qadapt demo`` runs this backend with
    demo_options: Mapping[str, Any] = {}
    #: a quantized folder made elsewhere, verified instead where :meth:`quantize` cannot run here (None: none)
    verification_checkpoint: str | None = None
    #: machines ("cpu", "gpu") this backend is not verified on by design, with the reason (docs/compatibility.md)
    not_run_on: Mapping[str, str] = {}

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

    def install_problems(self) -> list[tuple[str, str]]:
        """Installs of this backend's library seen to break more than this backend (``qadapt doctor`` lists them):
        ``(problem, fix)`` pairs for what is wrong here, found without importing the library. Default: none."""
        return []

    def library_version(self) -> str | None:
        """The installed version of :attr:`distribution` (None where it is not installed). Not to be overridden."""
        if not self.distribution:
            return None
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    # ----------------------------------------------------------------- options
    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The full, normalised options (defaults filled in), or :class:`InvalidOptionError`. Not to be overridden:
        override :meth:`check_option_combination` for rules across options."""
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
        """Refuse combinations that single options cannot express (raise :class:`InvalidOptionError`); return the
        options. Default: every combination is fine."""
        return options

    def needs_calibration(self, options: dict[str, Any]) -> bool:
        """Does :meth:`quantize` need calibration data with these options? Default: :attr:`requires_calibration`."""
        return self.requires_calibration

    # ----------------------------------------------------------------- capabilities
    @abc.abstractmethod
    def capabilities(self, options: dict[str, Any]) -> Table:
        """The full ``{(method, operation): Support}`` table for these options (see :func:`qadapt.capabilities.declare`).
        Pure: imports no backend library."""

    def peft_compatible(self, method: str, options: dict[str, Any]) -> Support:
        """Can adapter ``method`` be attached and trained on a model quantized with ``options``? Not to be overridden."""
        return self.capabilities(options)[(method, "train")]

    def can_merge(self, method: str, options: dict[str, Any], strategy: str = "requantize") -> Support:
        """Can a ``method`` adapter be merged with ``strategy`` (``"requantize"`` / ``"dequantize"``)?
        Not to be overridden."""
        from .capabilities import MERGE_STRATEGIES

        return self.capabilities(options)[(method, MERGE_STRATEGIES[strategy])]

    def forward_tolerance(self, options: dict[str, Any]) -> float:
        """How far (relative output error) this backend's own forward may be from ``x @ dequantize(W).T``.

        Merges are measured against the unmerged adapter model, which computes ``deq(W) x + adapter(x)`` through the
        backend's forward. A backend whose forward also rounds activations (LLM.int8) declares that here, and the
        conformance kit allows a de-quantized merge that much difference. Default: 1e-4."""
        return 1e-4

    # ----------------------------------------------------------------- heavy work
    @abc.abstractmethod
    def quantize(self, model: Any, options: dict[str, Any], calibration: Any = None) -> "torch.nn.Module":
        """Quantize ``model`` (a ``PreTrainedModel`` in full precision, or a path to one saved with safetensors).

        Return the quantized model; it may be the same object, changed in place. ``calibration``: a list of token-id
        tensors, or None."""

    def load(self, path: str, options: dict[str, Any]) -> "torch.nn.Module":
        """Load a folder already quantized in this backend's format (one :meth:`folder_options` claims: from
        :meth:`save` or elsewhere). ``options`` are the folder's, with the caller's runtime options. Required when a
        ``save`` cell says yes."""
        raise NotImplementedError(f"backend '{self.name}' cannot load quantized folders")

    def save(self, model: "torch.nn.Module", path: str, options: dict[str, Any]) -> None:
        """Write the quantized ``model`` (no adapter) into the existing, empty folder ``path``, with safetensors.
        Required when a ``save`` cell says yes."""
        raise NotImplementedError(f"backend '{self.name}' cannot save")

    def folder_options(self, path: str) -> dict[str, Any] | None:
        """The options of the transformers folder ``path`` if its weights are already in this backend's format, read
        from the folder itself (``config.json``'s ``quantization_config``, the backend's own layout files): the
        options that say what the weights are, and runtime options only where the folder records them. None if the
        folder is not in this format.

        ``qadapt.load(path)`` asks every registered backend; the one that claims the folder loads it (:meth:`load`)
        and these options are recorded, so a conflicting ``backend=`` or option from the caller is refused with the
        difference. Raise a :class:`qadapt.QadaptError` for a folder in this format that the backend cannot
        represent (its reason is shown). Pure: reads files, imports no backend library. Default: None (the backend
        has no folder format to recognise; its folders then load only as full precision)."""
        return None

    def quantized_layer_types(self) -> tuple[type, ...]:
        """The module classes this backend puts in place of ``nn.Linear`` (they become adapter targets). Implement
        this or :meth:`is_quantized_layer`."""
        return ()

    def is_quantized_layer(self, module: "torch.nn.Module") -> bool:
        """Is ``module`` one of this backend's quantized layers? Default: an instance of :meth:`quantized_layer_types`.
        Override where the layer class says nothing (torchao keeps ``nn.Linear``)."""
        types = self.quantized_layer_types()
        return bool(types) and isinstance(module, types)

    def dequantize(self, module: "torch.nn.Module") -> "torch.Tensor":
        """The full-precision (float32) weight of one quantized layer, shaped ``(out_features, in_features)``.
        Required when a ``merge_dequantized`` cell says yes, or :attr:`proxy_methods` is not empty."""
        raise NotImplementedError(f"backend '{self.name}' cannot de-quantize")

    def training_dequantizer(self, module: "torch.nn.Module"):
        """A function ``weight(dtype)`` returning ``module``'s weight ``(out_features, in_features)``, freshly
        de-quantized, in the dtype the layer's own forward computes an input of ``dtype`` in (bitsandbytes' and HQQ's
        ``compute_dtype``; most layers: ``dtype`` itself), cheap enough to run in every training forward and again in
        the backward; or None where this layer has none. ``qadapt.prepare`` runs its fused LoRA layers and frozen
        layers through it (the input cast to that dtype), so that no de-quantized weight lives across the step. It
        must give the weight the layer's own forward multiplies with (the fused paths are tested against the plain
        one), and read the module's tensors when called, not when made (the model may have moved). Default: None
        (the layers keep the backend's own forward, and ``qadapt.prepare`` says so)."""
        return None

    def requantize(self, module: "torch.nn.Module", weight: "torch.Tensor") -> "torch.nn.Module":
        """A new layer in ``module``'s format and options holding ``weight`` (same bias); ``module`` is not changed.
        Required when a ``merge`` cell says yes. Backends that declare :attr:`requantize_policies` also take
        ``policy=`` (one of them), and with :attr:`requantize_uses_inputs` ``hessian=`` (``X^T X`` of the layer's
        inputs, or None)."""
        raise NotImplementedError(f"backend '{self.name}' cannot re-quantize")

    def full_precision(self, model: "torch.nn.Module", options: dict[str, Any]) -> dict[str, Any]:
        """The matmul weights of ``model`` that :meth:`quantize` will leave in full precision, decided before any work:
        ``{name: qadapt.inventory.by_design(reason)}`` for what the backend's recipe keeps (its scope ends there),
        ``{name: qadapt.inventory.cannot(reason)}`` for what it cannot quantize on this architecture. Names are those
        of :func:`qadapt.inventory.matmul_weights`. ``qadapt.load`` refuses a load that would leave a ``cannot`` weight
        in full precision (before :meth:`quantize` runs) unless the user allows it with ``allow_unquantized=``; then
        :meth:`quantize` must leave exactly these in full precision (call this method there). After the load,
        a weight left in full precision that this method did not name is refused too.

        ``model`` may be on the meta device (a folder is checked from its config). Default: the output head and MoE
        routers, by design."""
        from .inventory import by_design, matmul_weights

        kept = {}
        for weight in matmul_weights(model):
            if weight.role == "head":
                kept[weight.name] = by_design("output head: kept in full precision, as transformers' quantizers do")
            elif weight.role == "router":
                kept[weight.name] = by_design("MoE router: kept in full precision (gptqmodel's and transformers' "
                                              "MoE recipes; under 0.5% of the weights)")
        return kept

    def requantize_parameters(self, module: "torch.nn.Module", weights: dict) -> "torch.nn.Module":
        """A copy of ``module`` (a fused-experts module whose 3-D parameters this backend quantized in place, e.g.
        with a ``torch.nn.utils.parametrize`` parametrization) holding ``weights`` (``{parameter name: float32
        tensor}``) quantized the same way; ``module`` is not changed. Needed to merge an adapter on such parameters
        with ``strategy="requantize"`` (de-quantizing them is reading the parametrized attribute)."""
        raise NotImplementedError(f"backend '{self.name}' cannot re-quantize fused expert parameters")

    def loftq_support(self, options: dict[str, Any]) -> Support:
        """Can ``qadapt.attach(model, "lora", init_lora_weights="loftq")`` start LoRA from LoftQ on a model quantized
        with ``options``? LoftQ sets each LoRA pair to the best rank-r approximation of the layer's quantization error
        (PEFT's ``replace_lora_weights_loftq``, reading the full-precision weights from the folder the model was
        quantized from). Pure. Default: no (PEFT's LoftQ for an already-quantized base handles bitsandbytes 4-bit
        layers only)."""
        return no(
            "PEFT's LoftQ for an already-quantized base (replace_lora_weights_loftq) handles bitsandbytes 4-bit layers "
            f"only, not backend '{self.name}'s",
            "Drop init_lora_weights='loftq' (LoRA starts from zero), or quantize with bitsandbytes 4-bit NF4 for LoftQ",
        )

    # ----------------------------------------------------------------- placement and sharding
    def placement(self, options: dict[str, Any]) -> dict[str, Support]:
        """Which of :data:`PLACEMENTS` (``qadapt.load(..., device_map=, max_memory=, cpu_offload=)``) this backend
        honours with ``options``; a backend that honours one reads it from :func:`qadapt.hf.placement`, which
        ``qadapt.load`` sets. Default: none (the whole model goes to :func:`qadapt.hf.default_device`)."""
        refusal = no(f"backend '{self.name}' places the whole model on one device (qadapt.hf.default_device())",
                     "Leave the placement keywords out, or use a backend whose loader takes a device map "
                     "(`qadapt backends --json` lists what each honours)")
        return {placement: refusal for placement in PLACEMENTS}

    def sharded_parameters(self, module: "torch.nn.Module") -> tuple[str, ...]:
        """Names of the parameters of one quantized layer that hold its quantized payload: the tensors a distributed
        engine shards, which :mod:`qadapt.distributed` checks after sharding (same bytes, this rank's share only).
        Default: ``("weight",)``."""
        return ("weight",)

    def sharding_problems(self, model: "torch.nn.Module", options: dict[str, Any], engine: str,
                          world_size: int) -> list[str]:
        """Why this ``model`` (quantized by this backend with ``options``, adapter attached) cannot be sharded by
        ``engine`` across ``world_size`` processes, one sentence per problem; :func:`qadapt.distributed.shard` refuses
        with them before any work. For limits the capability table cannot state because they depend on the model or
        the number of processes (e.g. shapes that must split evenly). Default: none."""
        return []

    def quant_state_tensors(self, module: "torch.nn.Module") -> dict[str, "torch.Tensor"]:
        """The tensors besides the payload that one quantized layer's forward reads (scales, code tables), by name:
        the state that must survive sharding unchanged (FSDP2 keeps it whole on every rank). Default: none (tensor
        subclasses carry theirs inside the payload)."""
        return {}

    def empty_layer(self, linear: "torch.nn.Module", options: dict[str, Any], dtype: "torch.dtype") -> "torch.nn.Module":
        """A quantized layer for the ``nn.Linear`` ``linear`` (on the meta device) whose :meth:`sharded_parameters`
        are on the meta device in their packed shape: ``qadapt.distributed.load_sharded`` builds the model from these,
        shards it, then fills each rank's share with :meth:`fill_layer`. Optional: without it a backend loads whole
        (``qadapt.load``) before sharding."""
        raise NotImplementedError(f"backend '{self.name}' cannot build empty layers to load into shards")

    def fill_layer(self, layer: "torch.nn.Module", weight: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        """Quantize the full-precision ``weight`` (out, in) for ``layer`` (made by :meth:`empty_layer`): set its
        quantization state on ``layer`` and return the full payload by parameter name, exactly the bytes
        :meth:`quantize` would give this weight (every rank quantizes the whole tensor and keeps its share)."""
        raise NotImplementedError(f"backend '{self.name}' cannot build empty layers to load into shards")

    def memory_profile(self, options: dict[str, Any], dtype_bytes: int) -> MemoryProfile | None:
        """The memory cost of this backend's layers with ``options`` in a model of ``dtype_bytes`` per element (for
        ``qadapt plan``), or None where it is not known. Default: None."""
        return None


    def peft_layer_types(self) -> dict[type, Any]:
        """Extra ``{quantized layer class: LoRA layer factory}`` for layers PEFT does not know (see PEFT's
        ``LoraConfig._register_custom_module`` and :func:`qadapt.peft_layers.requantizing_lora_layer`). Default:
        none."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


#: members a backend must not override: they read its declarations
FINAL = ("validate_options", "peft_compatible", "can_merge", "library_version")


def _overrides(backend: QuantBackend, member: str) -> bool:
    return getattr(type(backend), member) is not getattr(QuantBackend, member)


def contract_problems(backend: QuantBackend) -> list[str]:
    """What ``backend`` breaks of the contract above, in words (empty: nothing). Imports no backend library: it reads
    the class and the capability table of the default options."""
    problems = []
    if not isinstance(backend.name, str) or not backend.name:
        return [f"{type(backend).__name__} has no name"]
    for member in FINAL:
        if _overrides(backend, member):
            problems.append(f"overrides {member}(), which reads the backend's declarations and must not be replaced")
    if not isinstance(backend.options, (tuple, list)):
        return problems + ["options must be a tuple of qadapt.Option instances"]
    names = [option.name for option in backend.options if isinstance(option, Option)]
    if len(names) != len(backend.options):
        problems.append("options must be qadapt.Option instances")
    elif not all(isinstance(name, str) and name.isidentifier() for name in names):
        problems.append("option names must be identifiers (they are keyword arguments of qadapt.load)")
    elif len(set(names)) != len(names):
        problems.append(f"declares an option twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    if hasattr(backend, "is_quantized_checkpoint"):
        problems.append("implements is_quantized_checkpoint(), which qadapt no longer calls: rename it folder_options(path) "
                        "and return the folder's options (a dict) instead of True, None instead of False")
    if not (_overrides(backend, "quantized_layer_types") or _overrides(backend, "is_quantized_layer")):
        problems.append("implements neither quantized_layer_types() nor is_quantized_layer(): qadapt cannot find its layers")
    for attribute in ("matrix_variants", "gpu_variants"):
        if not all(isinstance(variant, Mapping) for variant in getattr(backend, attribute)):
            problems.append(f"{attribute} must be a tuple of option dicts")
    unknown = [m for m in backend.proxy_methods if m not in METHODS]
    if unknown:
        problems.append(f"proxy_methods names unknown adapter methods: {', '.join(unknown)}")
    try:
        table = backend.capabilities(backend.validate_options({}))
    except Exception as exc:  # noqa: BLE001 - reported, never raised: this runs while plugins load
        return problems + [f"capabilities() of the default options raised {type(exc).__name__}: {exc}"]
    missing = [f"{m}/{o}" for m in METHODS for o in OPERATIONS if not isinstance(table.get((m, o)), Support)]
    if missing:
        return problems + [f"capabilities() leaves cells undeclared ({', '.join(missing[:4])}...); build it with "
                           "qadapt.capabilities.declare"]
    says = {operation: any(table[(m, operation)] for m in METHODS) for operation in OPERATIONS}
    needs = [("save", ("save", "load")), ("merge", ("requantize",)), ("merge_dequantized", ("dequantize",))]
    for operation, members in needs:
        for member in members:
            if says[operation] and not _overrides(backend, member):
                problems.append(f"declares '{operation}' but does not implement {member}()")
    if _overrides(backend, "empty_layer") != _overrides(backend, "fill_layer"):
        problems.append("implements only one of empty_layer() and fill_layer(): loading into shards needs both")
    if backend.proxy_methods and not _overrides(backend, "dequantize"):
        problems.append("declares proxy_methods but does not implement dequantize() (the proxy reads the weight)")
    keywords = inspect.signature(backend.requantize).parameters
    if backend.requantize_policies and "policy" not in keywords:
        problems.append("declares requantize_policies but requantize() takes no policy=")
    if backend.requantize_uses_inputs and "hessian" not in keywords:
        problems.append("declares requantize_uses_inputs but requantize() takes no hessian=")
    return problems
