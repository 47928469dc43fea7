"""``qadapt.prepare``: plan every part (what runs where, what falls back and why), refuse under ``strict`` before any
change, then apply; a second call replaces the first, ``mode="off"`` undoes it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IncompatibleError, InvalidOptionError
from ..plugins import backend_of
from ..proxy import unwrap
from ..record import base_model, get_record
from . import checkpointing, compiling, dequant, dtypes, graphed, lora, loss, mlp, norm
from .patching import Patches
from .report import PartReport, PrepareReport
from .settings import resolve

STATE = "_qadapt_training"


@dataclass
class _State:
    settings: object
    patches: Patches
    report: PrepareReport


def prepare(model, mode: str = "default", *, checkpoint=None, input_grads=None, upcast=None, lora=None, mlp=None,
            norm=None, loss=None, compile=None, dequant=None, loss_chunk=None, checkpoint_layers=None,
            mlp_layers=None, strict: bool = False) -> PrepareReport:
    """Put ``model`` (any backend or full precision; a ``peft.PeftModel`` from :func:`qadapt.attach`, or a base model
    before an adapter is attached) in its training configuration, in place; returns what was done.

    ``mode``: ``"default"`` is PEFT's ``prepare_model_for_kbit_training`` for every backend: each decoder layer
    recomputed in the backward (``checkpoint="recompute"``), input gradients on, float16 norms/embeddings/head upcast;
    a model without an adapter is frozen. ``"fast"``: the fastest low-memory configuration: no recompute, fused LoRA
    layers that de-quantize again in the backward (``lora="fused"``, ``dequant="recompute"``), a fused SwiGLU MLP
    (``mlp="fused"``), a lean RMSNorm (``norm="lean"``, Liger's kernel on CUDA), a loss that never materialises the
    logits (``loss="auto"``: Liger's fused linear cross-entropy on CUDA, else cut-cross-entropy, else qadapt's
    chunked torch loss), and on CUDA each decoder layer compiled with CUDA graphs (``compile="auto"``). ``"lean"``:
    ``"fast"`` with the layer inputs offloaded to host memory (``checkpoint="offload"``; on CUDA each layer's forward
    and its recompute with backward replayed as CUDA graphs).
    ``"off"``: undo a previous call.

    Every part can be set on its own (``None``: the mode's choice): ``checkpoint`` ("off", "recompute", "offload" or
    a bool), ``input_grads`` (bool), ``upcast`` ("auto", "all", "none"), ``lora`` ("peft", "fused"), ``mlp`` ("off",
    "fused", "recompute": gate and up recomputed in the backward instead of kept, 3.2 GiB less at Llama-3-8B),
    ``norm`` ("off", "lean", "recompute": qadapt's torch norm whose output the fused layers after it
    recompute instead of keeping, 1 GiB less at Llama-3-8B, without checkpointing only), ``loss`` ("off", "auto",
    "liger", "cce", "torch"), ``compile`` ("off", "regional": each decoder layer compiled, "graphs": that with CUDA
    graphs (under checkpointing, each checkpointed layer's forward and its recompute with backward recorded by
    qadapt), "auto": on CUDA "graphs" ("regional" with ``checkpoint_layers``) where the backend declares its route
    compiles, else "off"), ``dequant`` ("backend", "recompute", "cache": keep the de-quantized weight from the
    forward for the backward, faster, at bf16 weight memory), ``loss_chunk`` (rows per loss chunk),
    ``checkpoint_layers`` (checkpoint only that many decoder layers, spread evenly: a memory/speed dial between
    ``checkpoint="off"`` and every layer), ``mlp_layers`` (with ``mlp="recompute"``: that many MLPs, spread evenly,
    recompute gate and up in the backward, the others keep them; the dial that keeps CUDA graphs).

    A part that cannot apply somewhere (an architecture whose module computes something else, a layer whose backend
    has no training route, a library not installed) falls back to the plain path there and the report says so;
    ``strict=True`` refuses instead, with :class:`qadapt.IncompatibleError`, before anything is changed.
    """
    parts = dict(checkpoint=checkpoint, input_grads=input_grads, upcast=upcast, lora=lora, mlp=mlp, norm=norm,
                 loss=loss, compile=compile, dequant=dequant)
    inner = base_model(model)
    if mode == "off":
        extra = {"loss_chunk": loss_chunk, "checkpoint_layers": checkpoint_layers, "mlp_layers": mlp_layers}
        given = sorted(k for k, v in {**parts, **extra}.items() if v is not None)
        if given:
            raise InvalidOptionError(f"prepare(mode='off', {given[0]}=...)", "mode='off' undoes a previous prepare",
                                     "Leave the other options out")
        unprepare(model)
        return PrepareReport(mode="off", backend=get_record(model).backend or "none (full precision)",
                             model=type(inner).__name__)
    settings = resolve(mode, parts, loss_chunk, checkpoint_layers, mlp_layers)
    previous = inner.__dict__.pop(STATE, None)
    if previous is not None:
        previous.patches.undo()
    try:
        report, steps = plan(model, settings)
        if strict and report.fallbacks:
            raise _refusal(mode, report)
    except Exception:
        if previous is not None:  # refused: the model goes back to how the previous call left it
            _apply(inner, previous.settings, *plan(model, previous.settings))
        raise
    _apply(inner, settings, report, steps)
    return report


def unprepare(model) -> None:
    """Undo :func:`prepare` (every forward, hook, dtype and flag it changed); nothing to do if it was not called."""
    state = base_model(model).__dict__.pop(STATE, None)
    if state is not None:
        state.patches.undo()


def report_of(model) -> PrepareReport | None:
    """The report of the :func:`prepare` call in force on ``model`` (None if there is none)."""
    state = base_model(model).__dict__.get(STATE)
    return None if state is None else state.report


def _apply(inner, settings, report, steps) -> None:
    patches = Patches()
    for step in steps:
        step(patches)
    inner.__dict__[STATE] = _State(settings, patches, report)


def _refusal(mode, report) -> IncompatibleError:
    found = report.fallbacks
    shown = "; ".join(f"{part}: {module or 'the whole part'}: {reason}" for part, module, reason in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return IncompatibleError(f"prepare(mode={mode!r}, strict=True) on {report.model} (backend {report.backend!r})",
                             f"{len(found)} part(s) would fall back: {shown}{more}",
                             "Pass strict=False to accept the fallbacks (the report lists each), or switch those "
                             "parts off")


def plan(model, settings):
    """(report, steps): what each part will do, and the functions that do it (each takes the Patches)."""
    import peft

    inner = base_model(model)
    record = get_record(model)
    backend = backend_of(record)
    report = PrepareReport(mode=settings.mode, backend=record.backend or "none (full precision)",
                           model=type(inner).__name__)
    on_cuda = getattr(inner, "device", None) is not None and inner.device.type == "cuda"
    # each step binds what it applies as a default argument: the names (chosen, found, ...) are reused by later
    # parts, and a closure would read the last part's list (the fused MLP patched the norms, then nothing)
    steps = []
    # inside compiled layers the torch paths run (inductor fuses them), not Liger's kernels
    compiled, compile_note = _compile_choice(settings, on_cuda, backend, _without_route(inner, backend))
    has_adapter = isinstance(model, peft.PeftModel) or bool(getattr(inner, "peft_config", None))

    # dtypes and freezing (PEFT's kbit preparation)
    part = report.add(PartReport("upcast", settings.upcast))
    params = dtypes.to_upcast(inner, backend, settings.upcast, has_adapter)
    if params:
        part.how = "float32 for the half-precision parameters outside quantized layers (norms, embeddings, head)"
        part.modules = [name for name, _ in params]
        part.notes.append("a checkpoint saved from this model stores them in float32")
        steps.append(lambda p, params=params: dtypes.upcast(p, params))
    elif settings.upcast == "auto":
        part.notes.append(f"nothing to upcast: the model is {inner.dtype} ('all' would cast bfloat16 too)")
    if not has_adapter:
        part = report.add(PartReport("freeze", "on", how="every base parameter frozen (no adapter attached yet)"))
        steps.append(lambda p: dtypes.freeze(p, inner))

    # checkpointing and input gradients
    part = report.add(PartReport("checkpoint", settings.checkpoint))
    checkpointed, graph_fallback = [], ""
    if settings.checkpoint != "off":
        why = checkpointing.supports(inner)
        if why:
            part.fallbacks[""] = why
        else:
            checkpointed = checkpointing.chosen_layers(compiling.layers(inner), settings.checkpoint_layers)
            offload = settings.checkpoint == "offload"
            if compiled == "graphs":
                compiled, graph_problem = _graphed_or_regional(inner, checkpointed)
                if graph_problem and settings.compile == "graphs":
                    graph_fallback = graph_problem
                elif graph_problem:
                    compile_note = f"auto: compiled without CUDA graphs under checkpointing: {graph_problem}"
            if compiled == "graphs":  # qadapt's graphs do the checkpointing: not transformers' hook
                kept = {"recompute": "on the device",
                        "offload": "in pinned host memory (copied on a side CUDA stream)"}[settings.checkpoint]
                part.how = (f"each decoder layer recomputed in the backward from its input kept {kept}; its forward "
                            "and its recompute with backward replayed as CUDA graphs (see compile)")
            else:
                part.how = {"recompute": "each decoder layer recomputed in the backward (torch.utils.checkpoint, "
                                         "non-reentrant)",
                            "offload": "each decoder layer recomputed in the backward from its input kept in pinned "
                                       "host memory (copied on a side CUDA stream)"}[settings.checkpoint]
                steps.append(lambda p, how=settings.checkpoint, names=checkpointed:
                             checkpointing.enable(p, inner, how, names))
            part.modules = checkpointed
            if settings.checkpoint_layers is not None and settings.checkpoint_layers > len(checkpointed):
                part.notes.append(f"checkpoint_layers={settings.checkpoint_layers}: the model has "
                                  f"{len(checkpointed)} decoder layers; every one is checkpointed")
            if offload and not on_cuda:
                part.notes.append("not on CUDA: the host copy is a plain copy in the same memory")
    part = report.add(PartReport("input_grads", "on" if settings.input_grads else "off"))
    if settings.input_grads:
        if inner.get_input_embeddings() is None:
            part.fallbacks[""] = "the model has no input embeddings"
        else:
            part.how = "the input embeddings' output requires grad (PEFT's convention for reentrant checkpointing)"
            steps.append(lambda p: checkpointing.input_grads(p, inner))

    # fused LoRA layers, then quantized layers left to their backend's forward
    part = report.add(PartReport("lora", settings.lora))
    keep = settings.dequant == "cache"
    fused = []
    if settings.lora == "fused":
        fused = _eligible(part, lora.lora_layers(inner), lambda layer: lora.eligible(layer, backend),
                          "no LoRA layers (attach a 'lora' adapter first: qadapt.attach(model, 'lora'); the model's "
                          f"adapter method is {record.method!r})")
        if fused:
            part.how = "qadapt LoRALinearFn (base + adapter in one Function), weight " + (
                "kept from the forward for the backward" if keep else "de-quantized again in the backward")
            part.modules = [n for n, _ in fused]
            steps.append(lambda p, fused=fused, keep=keep: [lora.fuse(p, layer, backend, keep) for _, layer in fused])
    part = report.add(PartReport("dequant", settings.dequant))
    if settings.dequant != "backend":
        under_fused = {id(unwrap(layer.get_base_layer())) for _, layer in fused}
        routed = []
        for name, module in inner.named_modules():
            if not backend.is_quantized_layer(module) or id(module) in under_fused:
                continue
            if backend.training_dequantizer(module) is None:
                part.fallbacks[name] = "kept the backend's own forward: " + dequant.why_not(backend, module)
            else:
                routed.append((name, module))
        if routed:
            part.how = "qadapt FrozenLinearFn through the backend's training route, weight " + (
                "kept for the backward" if keep else "de-quantized again in the backward")
            part.modules = [n for n, _ in routed]
            steps.append(lambda p, routed=routed, keep=keep: [dequant.route(p, m, backend, keep) for _, m in routed])
        elif fused and not part.fallbacks:
            part.notes.append("every quantized layer runs inside a fused LoRA layer")

    # fused SwiGLU MLP
    part = report.add(PartReport("mlp", settings.mlp))
    if settings.mlp != "off":
        fused_layers = {layer for _, layer in fused}  # modules hash by identity
        chosen = _eligible(part, mlp.candidates(inner), lambda module: mlp.eligible(module, fused_layers),
                           "no module with gate_proj, up_proj, down_proj and act_fn (not a SwiGLU MLP model)")
        if chosen:
            recomputing = set()
            if settings.mlp == "recompute":
                recomputing = set(checkpointing.chosen_layers(chosen, settings.mlp_layers))
            liger, why = mlp.liger_swiglu() if on_cuda and not compiled else (None, "")
            if why:
                part.notes.append(f"the backward's SwiGLU in torch instead of Liger's kernels: {why}")
            part.how = "qadapt LoRASwiGLUFn (saves x, gate and up; silu(gate) * up recomputed in the backward" + (
                ", Liger's SwiGLU kernels there)" if liger else ")")
            if recomputing:
                part.how += (f"; in {len(recomputing)} of the {len(chosen)} MLPs only x is saved, gate and up "
                             "recomputed in the backward")
            part.modules = [n for n, _ in chosen]
            steps.append(lambda p, chosen=chosen, recomputing=recomputing:
                         [mlp.fuse(p, m, n in recomputing) for n, m in chosen])

    # lean RMSNorm
    part = report.add(PartReport("norm", settings.norm))
    if settings.norm != "off":
        chosen = _eligible(part, norm.candidates(inner), norm.eligible, "no RMSNorm module in the model")
        liger, recomputable = None, settings.norm == "recompute" and settings.checkpoint == "off"
        if settings.norm == "recompute" and settings.checkpoint != "off":
            part.fallbacks[""] = (f"norm='recompute' needs checkpoint='off' (under checkpoint={settings.checkpoint!r} "
                                  "the norm keeps its output; the layer inputs are all that is kept anyway)")
        if on_cuda and settings.norm == "lean" and compiled:
            part.notes.append("qadapt's torch RMSNormFn, fused by inductor inside each compiled layer (Liger's kernel "
                              "is not traced by torch.compile)")
        elif on_cuda and settings.norm == "lean":
            liger, why = norm.liger_rms_norm()
            if liger is None:
                part.notes.append(f"qadapt's torch RMSNormFn instead of Liger's kernel: {why}")
        if chosen:
            part.how = "Liger's RMSNorm kernel (casting mode 'llama')" if liger else "qadapt RMSNormFn (torch)" + (
                ", its output recomputed by the fused layers after it instead of kept" if recomputable else "")
            part.modules = [n for n, _ in chosen]
            steps.append(lambda p, chosen=chosen, liger=liger, recomputable=recomputable:
                         [norm.lean(p, m, liger, recomputable) for _, m in chosen])

    # the loss
    part = report.add(PartReport("loss", settings.loss))
    if settings.loss != "off":
        if loss.trl_fused_head(inner):
            part.how = "left to TRL's fused LM head (SFTTrainer added it; qadapt's loss steps aside)"
        else:
            why = loss.eligible(inner)
            if why:
                part.fallbacks[""] = why
            else:
                impl, summed, notes, fallback = loss.choose(settings.loss, on_cuda)
                chunk = settings.loss_chunk or loss.auto_chunk(inner.get_output_embeddings().weight.shape[0])
                part.how = {"liger": "Liger's fused linear cross-entropy", "cce": "cut-cross-entropy (impl 'cce')",
                            "torch": f"qadapt ChunkedLinearCE ({chunk} rows a chunk)"}[impl] + \
                    "; training forwards with labels return logits=None"
                part.notes.extend(notes)
                if fallback:
                    part.fallbacks[""] = fallback + "; qadapt's chunked torch loss runs instead"
                steps.append(lambda p, summed=summed, chunk=chunk: loss.install(p, inner, report, summed, chunk))

    # regional compilation
    part = report.add(PartReport("compile", settings.compile))
    if graph_fallback:
        part.fallbacks[""] = graph_fallback
    if compile_note:
        part.notes.append(compile_note)
    if compiled:
        found = compiling.layers(inner)
        if not found:
            part.fallbacks[""] = "no decoder layers (GradientCheckpointingLayer) to compile"
        else:
            graphs = compiled == "graphs"
            if graphs and checkpointed:
                part.how = ("torch.compile(fullgraph=True) on each decoder layer, each checkpointed layer's forward "
                            "and its recompute with backward recorded as CUDA graphs by qadapt (torch.cuda.graph, "
                            "one memory pool) and replayed (the first steps compile and record)")
            else:
                part.how = ("torch.compile(fullgraph=True" + (", mode='reduce-overhead': CUDA graphs" if graphs else "")
                            + ") on each decoder layer (the first steps compile; anything dynamo cannot trace stops "
                            "the first step with its error)")
            part.modules = [n for n, _ in found]
            if graphs:
                part.notes.append("each new batch shape compiles and records again: pad or pack batches to a few "
                                  "fixed lengths")
            if graphs and checkpointed:
                stash = "host" if settings.checkpoint == "offload" else "device"
                names = set(checkpointed)
                chosen = [(n, m) for n, m in found if n in names]
                steps.append(lambda p, found=found, chosen=chosen, stash=stash: (
                    compiling.compile_layers(p, found, transformers_checkpoints=False),
                    graphed.install(p, chosen, stash)))
            else:
                steps.append(lambda p, found=found, graphs=graphs: compiling.compile_layers(p, found, graphs))
    return report, steps


def _without_route(inner, backend):
    """Names of the quantized layers that keep their backend's own forward (no training route)."""
    return [name for name, module in inner.named_modules()
            if backend.is_quantized_layer(module) and backend.training_dequantizer(module) is None]


def _compile_choice(settings, on_cuda, backend, without_route=()):
    """(what compiles: "", "regional" or "graphs"; a note on how "auto" or "graphs" resolved, or "")."""
    if settings.compile == "auto":
        if not backend.training_route_compiles:
            return "", (f"auto: not compiled: backend '{backend.name}' has not been verified under torch.compile "
                        "(QuantBackend.training_route_compiles); compile='graphs' tries it")
        if without_route:  # what was verified is the route; these layers run the library's own forward
            return "", (f"auto: not compiled: {len(without_route)} quantized layers keep the {backend.name} "
                        f"backend's own forward (no training route, e.g. {without_route[0]}), which has not "
                        "been verified under torch.compile (bitsandbytes' LLM.int8 layers failed inside inductor's "
                        "CUDA graphs: H200, torch 2.11); compile='graphs' tries it")
        if not on_cuda:
            return "", "auto: not compiled off CUDA (CUDA graphs are what pays; CPU steps are not launch-bound)"
        if settings.checkpoint != "off" and settings.checkpoint_layers is not None:
            return "regional", ("auto: compiled without CUDA graphs with checkpoint_layers (the graphs under "
                                "checkpointing replay checkpointed layers only)")
        if settings.checkpoint != "off":
            return "graphs", ("auto: CUDA graphs (the model is on CUDA; each checkpointed layer's forward and its "
                              "recompute with backward recorded by qadapt)")
        if settings.norm == "recompute":
            return "", "auto: not compiled with norm='recompute' (torch.compile cannot read the grad_fn it relies on)"
        return "graphs", "auto: CUDA graphs (the model is on CUDA and not checkpointed)"
    if settings.compile == "graphs" and not on_cuda:
        return "regional", "graphs: CUDA graphs need CUDA; compiled without them (mode 'default')"
    return ("" if settings.compile == "off" else settings.compile), ""


def _graphed_or_regional(inner, checkpointed):
    """("graphs", "") where every checkpointed layer can be replayed as recorded graphs, else ("regional", why)."""
    layers = dict(compiling.layers(inner))
    for name in checkpointed:
        why = graphed.why_not(layers[name])
        if why:
            return "regional", f"{name}: {why}; compiled without CUDA graphs"
    return "graphs", ""


def _eligible(part, found, why_not, none_found):
    """The (name, module) of ``found`` that ``why_not`` has no objection to; each objection a fallback of ``part``."""
    if not found:
        part.fallbacks[""] = none_found
    chosen = []
    for name, module in found:
        why = why_not(module)
        if why:
            part.fallbacks[name] = why
        else:
            chosen.append((name, module))
    return chosen
