"""Checkpointed decoder layers replayed as CUDA graphs.

torch.compile's CUDA graphs (mode ``"reduce-overhead"``) cannot replay a checkpointed layer: it runs once without
gradients and again, with them, in the backward. Here each such layer gets two graphs per batch shape, recorded with
``torch.cuda.graph`` at its first use and replayed from then on: its forward without gradients, and its recompute
together with its backward (``torch.autograd.grad`` of the output, for the input and the trainable parameters). The
host then launches two graphs a layer and step instead of every kernel, and only the layer inputs are kept between
the passes, on the GPU (``"recompute"``) or in pinned host memory (``"offload"``).

All graphs of a model share one memory pool and one set of static tensors (the layers run one after another): a
layer's input, its output, the output's and input's gradients and the parameters' gradients. An autograd Function
copies the real tensors in, replays, and hands autograd copies of what the graph wrote, so gradients accumulate (and
hooks fire) as for any layer. A graph reads its tensors at the addresses it saw when it was recorded, so a layer
whose parameters moved or were replaced records again, and so does a new batch shape.

What it cannot replay, refused when planning (:func:`why_not`): random numbers inside the layer (dropout: the two
graphs would draw different masks, and the recompute would not be the forward), sharded parameters (FSDP2's
all-gathers run in module hooks), accelerate's offloading hooks. A training forward that asks transformers for the
layers' hidden states or attentions (collected by forward hooks, which a replay does not run) runs as eager
checkpointing instead. At the first step (a
:class:`qadapt.IncompatibleError`): a layer argument other than the hidden state that requires grad, or one that is
not a tensor or a plain value.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch.utils import _pytree as pytree

from ..errors import IncompatibleError
from .checkpointing import _to_host, offloaded_checkpoint, recompute_checkpoint

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def why_not(layer) -> str:
    """Why ``layer`` cannot be replayed as recorded graphs ("" if it can)."""
    for name, param in layer.named_parameters():
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            return (f"{name} is sharded (a DTensor): its all-gather runs in module hooks, which a recorded graph "
                    "replays without their host side")
        if type(param) is not torch.nn.Parameter and hasattr(param, "__tensor_flatten__"):
            return (f"{name} is a {type(param).__name__} (a tensor subclass, e.g. torchao's): it has no storage "
                    "address of its own for the recorder to watch, and graphs over such weights were not verified")
    for name, module in layer.named_modules():
        if hasattr(module, "_hf_hook"):
            return (f"{name or type(layer).__name__} has an accelerate hook (device_map offloading moves its weights "
                    "in each forward, to other addresses each time)")
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return (f"{name or type(layer).__name__} is a dropout with p={module.p}: the recompute's graph would draw "
                    "other masks than the forward's")
        rate = getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, (int, float)) and rate > 0:
            return f"{name} has attention_dropout={rate}: the recompute's graph would draw other masks"
    return ""


def install(patches, layers, stash: str, recorder=None) -> "LayerGraphs":
    """Replay each of ``layers`` ((name, module) pairs) as recorded graphs in training, keeping its input on the
    device (``stash="device"``) or on the host (``"host"``). Each layer runs what its call runs now (its compiled
    call where :func:`qadapt.training.compiling.compile_layers` compiled it)."""
    graphs = LayerGraphs(stash, recorder or CudaRecorder())
    for _, layer in layers:
        inner = layer._compiled_call_impl or layer._call_impl
        patches.set(layer, "_compiled_call_impl", functools.partial(_call, graphs, layer, inner))
        if layer.__dict__.get("gradient_checkpointing"):  # transformers' own, enabled by the caller: the graphs
            patches.set(layer, "gradient_checkpointing", False)  # checkpoint instead (restored by prepare("off"))
    return graphs


class CudaRecorder:
    """Records a function as a CUDA graph in one memory pool, on the side stream the layers run on, after warm-up
    runs there (what PyTorch's documentation of ``torch.cuda.graph`` asks: lazy initialisation, autotuning and
    compilation happen outside the capture)."""

    warmups = 2

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def record(self, function):
        """Run ``function`` (it writes its results into tensors it closes over) and return what replays it; called on
        :attr:`stream` (see :func:`_call`)."""
        for _ in range(self.warmups):
            function()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            function()
        graph.replay()  # the capture ran nothing: this is the call that computes
        return graph.replay


class LayerGraphs:
    """One model's recorded layers, and the static tensors every layer's graphs share."""

    def __init__(self, stash: str, recorder) -> None:
        self.stash, self.recorder = stash, recorder
        self.layers: dict = {}  # id(layer) -> (addresses, {signature: _Recorded})
        self.statics: dict = {}
        self.recordings = 0  # graphs recorded
        self.eager_calls = 0  # training calls run as eager checkpointing (transformers collecting layer outputs)

    def static(self, role, like):
        key = (role, tuple(like.shape), like.dtype, like.device)
        if key not in self.statics:
            self.statics[key] = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        return self.statics[key]

    def recorded(self, layer, inner, spec, leaves, hidden, params) -> "_Recorded":
        addresses = tuple(t.data_ptr() for t in itertools.chain(layer.parameters(), layer.buffers()))
        known, by_signature = self.layers.get(id(layer), (None, {}))
        if known != addresses:  # moved or replaced parameters: the old graphs read the old tensors
            by_signature = {}
            self.layers[id(layer)] = (addresses, by_signature)
        signature = (_shape(hidden), tuple(_shape(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves),
                     str(spec), tuple(map(_shape, params)), torch.is_autocast_enabled(hidden.device.type),
                     torch.get_autocast_dtype(hidden.device.type))
        if signature not in by_signature:
            by_signature[signature] = _Recorded(self, inner, spec, leaves, hidden, params)
        return by_signature[signature]

    def keep(self, hidden):
        """(what the backward restores ``hidden`` from, the event to wait for first)."""
        if self.stash == "host":
            return _to_host(hidden)
        return hidden.detach(), None


def _shape(tensor):
    return tuple(tensor.shape), tensor.dtype, tensor.device


class _Recorded:
    """A layer's two recordings for one signature: its forward without gradients, its recompute and backward."""

    def __init__(self, graphs, inner, spec, leaves, hidden, params) -> None:
        self.graphs, self.inner, self.spec, self.params = graphs, inner, spec, params
        self.x = graphs.static("hidden", hidden)
        self.y = graphs.static("output", hidden)
        self.dy = graphs.static("output grad", hidden)
        self.dx = graphs.static("hidden grad", hidden)
        self.dparams = [graphs.static(("parameter grad", i), p) for i, p in enumerate(params)]
        self.inputs = [graphs.static(("argument", i), leaf) if isinstance(leaf, torch.Tensor) else leaf
                       for i, leaf in enumerate(leaves)]
        self.unused = None
        self._forward = self._backward = None

    def load(self, hidden, leaves, output_grad=None) -> None:
        self.x.copy_(hidden, non_blocking=True)
        for static, leaf in zip(self.inputs, leaves):
            if isinstance(leaf, torch.Tensor):
                static.copy_(leaf)
        if output_grad is not None:
            self.dy.copy_(output_grad)

    def _run(self, x):
        rest, kwargs = pytree.tree_unflatten(self.inputs, self.spec)
        out = self.inner(x, *rest, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # transformers < 5: tuples; the hidden state comes first
        if out.shape != x.shape or out.dtype != x.dtype:
            raise IncompatibleError("checkpointed layers replayed as CUDA graphs", f"the layer returned "
                                    f"{tuple(out.shape)} {out.dtype} for a {tuple(x.shape)} {x.dtype} input",
                                    "Pass compile='regional' (checkpointed layers compiled without CUDA graphs)")
        return out

    def _forward_pass(self) -> None:
        with torch.no_grad():
            self.y.copy_(self._run(self.x))

    def _backward_pass(self) -> None:
        with torch.enable_grad():
            x = self.x.detach().requires_grad_(True)
            out = self._run(x)
            grads = torch.autograd.grad(out, (x, *self.params), self.dy, allow_unused=True)
        self.unused = [g is None for g in grads[1:]]
        self.dx.copy_(grads[0])
        for static, grad in zip(self.dparams, grads[1:]):
            if grad is not None:
                static.copy_(grad)

    def forward(self) -> None:
        if self._forward is None:
            self._forward = self._record(self._forward_pass)
        else:
            self._forward()

    def backward(self) -> None:
        if self._backward is None:
            self._backward = self._record(self._backward_pass)
        else:
            self._backward()

    def _record(self, function):
        self.graphs.recordings += 1
        try:
            return self.graphs.recorder.record(function)
        except IncompatibleError:
            raise
        except RuntimeError as error:
            raise IncompatibleError("checkpointed layers replayed as CUDA graphs (prepare compile='graphs' under "
                                    "checkpointing)", f"recording a layer failed: {error}",
                                    "Pass compile='regional' (checkpointed layers compiled without CUDA graphs)"
                                    ) from error


class _GraphedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs, layer, inner, spec, leaves, hidden, *params):
        recorded = graphs.recorded(layer, inner, spec, leaves, hidden, params)
        recorded.load(hidden, leaves)
        recorded.forward()
        ctx.recorded, ctx.leaves = recorded, leaves
        ctx.kept, ctx.copied = graphs.keep(hidden)
        return recorded.y.clone()

    @staticmethod
    def backward(ctx, output_grad):
        recorded = ctx.recorded
        if ctx.copied is not None:
            torch.cuda.current_stream(output_grad.device).wait_event(ctx.copied)
        recorded.load(ctx.kept, ctx.leaves, output_grad)
        ctx.kept = ctx.leaves = None
        recorded.backward()
        grads = [None if unused else static.clone() for unused, static in zip(recorded.unused, recorded.dparams)]
        return (None, None, None, None, None, recorded.dx.clone(), *grads)


def _collecting_outputs() -> bool:
    """Is transformers collecting per-layer outputs (``output_hidden_states``/``output_attentions``)? Its forward
    hooks on the layers do that, and a replayed graph runs no hook."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers return them from the layers' outputs
        return False
    collecting = _active_collector.get()  # {} in every forward; a key per output asked for
    return bool(collecting) and any(not key.startswith("_") for key in collecting)


def _call(graphs, layer, inner, *args, **kwargs):
    """A decoder layer's call: replayed in training with gradients on; as before otherwise (evaluation, generate)."""
    if not (layer.training and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor)):
        return inner(*args, **kwargs)
    if _collecting_outputs():  # eager checkpointing, so that the hooks run (once: the recompute collects nothing)
        graphs.eager_calls += 1
        if graphs.stash == "host":
            return offloaded_checkpoint(inner, *args, **kwargs)
        return recompute_checkpoint()(inner, *args, **kwargs)
    hidden = args[0]
    for name in ("past_key_values", "layer_past"):  # what transformers' checkpointing drops too: a cache would be
        if kwargs.get(name) is not None:           # written again by the recompute
            kwargs[name] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    leaves, spec = pytree.tree_flatten((args[1:], kwargs))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            raise IncompatibleError("checkpointed layers replayed as CUDA graphs", f"{type(layer).__name__} was "
                                    "called with an argument besides the hidden state that requires grad (the "
                                    "graphs give gradients to the hidden state and the parameters only)",
                                    "Pass compile='regional'")
        if not isinstance(leaf, (torch.Tensor, *_PLAIN)):
            raise IncompatibleError("checkpointed layers replayed as CUDA graphs", f"{type(layer).__name__} was "
                                    f"called with a {type(leaf).__name__}, which a recorded graph cannot take",
                                    "Pass compile='regional'")
    if not hidden.requires_grad:  # layer 0 reads the frozen embeddings: the Function needs a differentiable input
        hidden = hidden.detach().requires_grad_(True)
    params = tuple(p for p in layer.parameters() if p.requires_grad)
    stream = getattr(graphs.recorder, "stream", None) if hidden.is_cuda else None
    if stream is None:
        return _GraphedLayer.apply(graphs, layer, inner, spec, leaves, hidden, *params)
    # The layer runs on the recorder's side stream, so the parameters' AccumulateGrad nodes, made here, belong to
    # the stream the backward graph is captured on: a node of the default stream makes autograd synchronise with it
    # inside the capture, which invalidates it (H200, torch 2.11)
    current = torch.cuda.current_stream(hidden.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        out = _GraphedLayer.apply(graphs, layer, inner, spec, leaves, hidden, *params)
    current.wait_stream(stream)
    out.record_stream(current)  # made on the side stream, read on this one: not reused before that is done
    return out
