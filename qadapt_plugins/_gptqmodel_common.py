"""Shared plumbing for the backends driven by GPT-QModel (``gptq`` and ``awq``).

GPT-QModel (``pip install gptqmodel``) quantizes with GPTQ or AWQ and ships pure-PyTorch kernels that run on CPU and
CUDA (``TorchLinear`` for GPTQ, ``AwqTorchLinear`` for AWQ). Things worth knowing, all handled here:

* importing it prints a large banner through its ``logbar`` logger: :func:`import_gptqmodel` lowers that logger to
  warnings and swallows what the import prints;
* its CPU thread pool needs at least 2 workers ("requests 2 workers but parent 'cpu' only has 1" on a 2-core machine):
  ``GPTQMODEL_CPU_WORKERS`` is set to 2 unless the user set it;
* its default CPU packer JIT-compiles a C++ extension on first use (about 40 s): qadapt asks for the
  pure-Python packer (``pack_impl="original"``), which takes milliseconds on small layers;
* ``GPTQModel.load`` insists on a tokenizer in the model folder, even when calibration comes as token ids: a folder
  without one gets a small stand-in tokenizer (a copy of the folder, never the user's own files);
* its kernel auto-selection picks Machete on Hopper GPUs, which downloads CUTLASS at first use (fails offline): qadapt
  always names the kernel.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile

from qadapt.capabilities import no

# Attribute set on a model that qadapt loaded with gptqmodel: the folder its quantized base came from (None for a
# model quantized in this process).
SOURCE_ATTR = "_qadapt_gptqmodel_source"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@contextlib.contextmanager
def quiet(verbose: bool = False):
    """Swallow gptqmodel's progress bars, tables and prints (its warnings go to the logging system as usual)."""
    if verbose or os.environ.get("QADAPT_VERBOSE"):
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def logs_elsewhere():
    """gptqmodel writes a log file per quantization into ./logs of the current directory: send it to a temporary
    folder instead, so quantizing never writes into the user's working directory."""
    import importlib
    from pathlib import Path

    try:
        loop_processor = importlib.import_module("gptqmodel.looper.loop_processor")
    except ImportError:
        yield
        return
    original = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    with tempfile.TemporaryDirectory(prefix="qadapt-gptqmodel-logs-") as folder:
        loop_processor._PROJECT_LOG_DIR = Path(folder)
        try:
            yield
        finally:
            loop_processor._PROJECT_LOG_DIR = original


def import_gptqmodel():
    """Import gptqmodel without its banner; return the module. Raises what the import raises."""
    import sys

    # read when gptqmodel first builds its thread pool (lazily), so set even if someone imported it already
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(8, (os.cpu_count() or 2) // 2))))
    if "gptqmodel" in sys.modules:
        return sys.modules["gptqmodel"]
    with quiet():
        try:
            from logbar import LogBar

            LogBar.shared().setLevel("ERROR")
        except Exception:  # an older logbar: the banner shows, nothing else changes
            pass
        import gptqmodel
    return gptqmodel


def check_gptqmodel(env_cls, version, install_hint: str):
    """Environment check shared by both backends: gptqmodel importable, and PEFT able to see its layers."""
    try:
        import_gptqmodel()
    except BaseException as exc:  # noqa: BLE001 - a broken install may raise anything; check_environment never raises
        if isinstance(exc, KeyboardInterrupt):
            raise
        return env_cls(
            ok=False, version=version, reason=f"gptqmodel is not importable ({type(exc).__name__}: {exc})",
            hint=f"Install: {install_hint}",
        )
    details = {"cuda": _cuda_available(), "peft_sees_gptqmodel": False}
    try:
        from peft.import_utils import is_gptqmodel_available

        details["peft_sees_gptqmodel"] = bool(is_gptqmodel_available())
    except Exception as exc:  # PEFT raises ImportError when optimum is missing or too old
        return env_cls(
            ok=False, version=version,
            reason=f"PEFT cannot use gptqmodel layers here ({type(exc).__name__}: {exc})",
            hint="Install: pip install 'optimum>=1.24' (PEFT requires it to attach adapters to gptqmodel layers)",
            details=details,
        )
    return env_cls(ok=True, version=version, details=details)


def install_problems():
    """gptqmodel without optimum: PEFT refuses to attach adapters to its layers."""
    from qadapt.hf import is_importable, is_installed

    if is_installed("gptqmodel") and not is_importable("optimum"):
        return [("`gptqmodel` is installed without `optimum`: PEFT refuses to attach adapters to GPTQ/AWQ layers",
                 "pip install 'optimum>=1.24'")]
    return []


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_marlin_options(backend: str, options) -> None:
    """Marlin needs a CUDA GPU and computes in half precision."""
    from qadapt.errors import InvalidOptionError

    if not _cuda_available():
        raise InvalidOptionError(f"backend '{backend}' with kernel='marlin'", "Marlin kernels run only on a CUDA GPU",
                                 "Use kernel='torch' (the default), which runs on CPU and GPU")
    if options["dtype"] == "float32":
        raise InvalidOptionError(
            f"backend '{backend}' with kernel='marlin', dtype='float32'",
            "Marlin's kernels compute in float16 or bfloat16 only",
            "Pass dtype='float16' (or 'bfloat16') with kernel='marlin'",
        )


#: gptqmodel's packed layers (qweight, qzeros, scales, g_idx) under FSDP2 / ZeRO-3
NOT_SHARDED = {
    engine: no("gptqmodel keeps qweight, qzeros, scales and g_idx as buffers (register_buffer), which FSDP2 and "
               "ZeRO-3 do not shard: every rank would hold the whole model; not verified under either engine",
               "Train sharded with bnb bits=4 or hqq")
    for engine in ("fsdp2", "zero3")
}


def marlin_table():
    """The capability table of a Marlin base (measured on an H100, gptqmodel 7.7): nothing trains on it."""
    from qadapt.capabilities import METHODS, declare, no

    cell = no(
        "gptqmodel's Marlin layers refuse training mode (NotImplementedError: 'switching to training mode'); Marlin "
        "is an inference kernel",
        "Train with kernel='torch' (it runs on CUDA too), then load the saved adapter onto a kernel='marlin' base "
        "with qadapt.load_adapter to serve it",
    )
    return declare(train={method: cell for method in METHODS}, requantize=cell, dequantize=cell, save=cell)


# ------------------------------------------------------------------------------------------------ source folders
def _write_stub_tokenizer(path: str, config) -> None:
    """A word-level tokenizer whose vocabulary covers the model's special-token ids: gptqmodel only reads its pad
    and eos ids (calibration arrives as token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    ids = [getattr(config, name, None) for name in ("pad_token_id", "eos_token_id", "bos_token_id")]
    ids = [i[0] if isinstance(i, list) else i for i in ids]
    eos = ids[1] if isinstance(ids[1], int) else 0
    pad = ids[0] if isinstance(ids[0], int) else eos
    size = max(pad, eos, 1) + 1
    vocab = {f"<t{i}>": i for i in range(size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"<t{eos}>"))
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=f"<t{pad}>", eos_token=f"<t{eos}>", unk_token=f"<t{eos}>"
    ).save_pretrained(path)


def has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in _TOKENIZER_FILES)


@contextlib.contextmanager
def source_folder(model):
    """Yield a folder gptqmodel can load ``model`` from: ``model`` saved with safetensors (or the user's folder, linked
    file by file into a temporary one), with a stand-in tokenizer where the folder has none."""
    with tempfile.TemporaryDirectory(prefix="qadapt-gptqmodel-") as tmp:
        if isinstance(model, str):
            if has_tokenizer(model):
                yield model
                return
            for name in os.listdir(model):
                os.symlink(os.path.join(os.path.abspath(model), name), os.path.join(tmp, name))
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model)
        else:
            with quiet():
                model.save_pretrained(tmp)
            config = model.config
        if not has_tokenizer(tmp):
            _write_stub_tokenizer(tmp, config)
        yield tmp


def calibration_dicts(calibration):
    """qadapt's list of ``input_ids`` LongTensor batches -> gptqmodel's list of ``{input_ids, attention_mask}``."""
    import torch

    batches = []
    for ids in calibration or ():
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def _load_dtype(path: str, dtype_name: str):
    """The half dtype gptqmodel's kernels load in (they accept only float16/bfloat16) for the asked ``dtype_name``."""
    if dtype_name in ("float16", "bfloat16"):
        return dtype_name
    try:
        with open(os.path.join(path, "config.json")) as handle:
            config = json.load(handle)
        stored = config.get("dtype") or config.get("torch_dtype")
    except (OSError, ValueError):
        stored = None
    return stored if stored in ("float16", "bfloat16") else "float16"


def load_quantized(path: str, backend_enum_name: str, dtype_name: str = "float32"):
    """Load a gptqmodel-compatible quantized folder with an explicit kernel; return the transformers model.

    For ``dtype_name="float32"`` the model loads in half precision (the kernels' only choice), is cast to float32
    (exact: scales are stored in half precision) and its unquantized weights are read again from the files, so that a
    float32 checkpoint comes back bit for bit.
    """
    import torch

    from qadapt.hf import default_device

    gptqmodel = import_gptqmodel()
    from gptqmodel.utils.backend import BACKEND

    from qadapt.hf import restore_defuser_patches

    load_dtype = getattr(torch, _load_dtype(path, dtype_name))
    # gptqmodel 7.6 calls defuser.replace_fused_blocks on every load, patching transformers' MoE classes for the whole
    # process: every MoE model built afterwards, by any backend, would come out defused
    with source_folder(path) as folder, quiet(), restore_defuser_patches():
        wrapper = gptqmodel.GPTQModel.load(folder, device=default_device(), backend=getattr(BACKEND, backend_enum_name),
                                           dtype=load_dtype)
    model = wrapper.model
    if dtype_name == "float32":
        model.float()
        _reload_float_tensors(model, path)
    model.config.dtype = getattr(torch, dtype_name)
    model.eval()
    setattr(model, SOURCE_ATTR, os.path.abspath(path))
    return model


def _reload_float_tensors(model, path: str) -> None:
    """Copy the checkpoint's floating-point tensors of unquantized modules (embeddings, norms, head) into ``model``."""
    import torch
    from safetensors import safe_open

    params = dict(model.named_parameters())
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, name), framework="pt") as handle:
            for key in handle.keys():
                target = params.get(key)
                if target is None:
                    continue
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and tensor.shape == target.shape:
                    with torch.no_grad():
                        target.copy_(tensor.to(target.dtype))


def save_state(model, path: str, layer_tensors) -> None:
    """Write ``model`` (a transformers model whose linear layers are gptqmodel layers holding checkpoint-layout
    tensors) into ``path`` as a standard quantized checkpoint: ``model.safetensors``, ``config.json`` with its
    ``quantization_config``, and gptqmodel's ``quantize_config.json``.

    :param layer_tensors: ``layer_tensors(module) -> dict | None``: the tensors to write for a quantized layer (None
        for a module that is not one).
    """
    from safetensors.torch import save_file

    state, seen = {}, set()
    for name, module in model.named_modules():
        tensors = layer_tensors(module)
        if tensors is None:
            continue
        seen.add(name)
        for key, value in tensors.items():
            if value is not None:
                state[f"{name}.{key}" if name else key] = value
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if any(owner == name or owner.startswith(name + ".") for name in seen):
            continue
        state[key] = value
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    state = {key: _compact(key, value.detach().to("cpu").contiguous().clone()) for key, value in state.items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.dtype = getattr(model, "dtype", None) or config.dtype
    qconfig = copy.deepcopy(getattr(config, "quantization_config", None) or {})
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    if isinstance(qconfig.get("meta"), dict):
        qconfig["meta"].pop("offload_to_disk_path", None)
    config.quantization_config = qconfig
    config.save_pretrained(path)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        try:
            generation.save_pretrained(path)
        except Exception:  # an invalid generation config is not worth failing a save over
            pass
    with open(os.path.join(path, "quantize_config.json"), "w") as handle:
        json.dump(qconfig, handle, indent=2)


def _compact(key: str, tensor):
    """Scales held in float32 (a float32 model) are written in float16 where that is exact, as GPTQ/AWQ files hold."""
    import torch

    if key.endswith(".scales") and tensor.dtype == torch.float32:
        half = tensor.half()
        if torch.equal(half.float(), tensor):
            return half
    return tensor


def save_wrapper(wrapper, path: str) -> None:
    """``wrapper.save`` (right after quantizing, while the source folder still exists), without its log file."""
    with tempfile.TemporaryDirectory(prefix="qadapt-gptqmodel-save-") as tmp, quiet():
        wrapper.save(tmp)
        for name in os.listdir(tmp):
            if name != "quant_log.csv":
                shutil.move(os.path.join(tmp, name), os.path.join(path, name))


def save_to_temporary_folder(wrapper, backend_name: str) -> str:
    """Save a model gptqmodel just quantized into a new temporary folder; see :func:`load_from_temporary_folder`."""
    folder = tempfile.mkdtemp(prefix=f"qadapt-{backend_name}-")
    try:
        save_wrapper(wrapper, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def load_from_temporary_folder(backend, folder: str, options):
    """Load the folder :func:`save_to_temporary_folder` wrote, with the asked kernel, and dispose of the folder.

    gptqmodel leaves freshly packed layers in the checkpoint's zero-point convention (v1), which its own forward does
    not expect: the quantized model is right once saved and loaded again. With ``kernel='torch'`` the layers hold the
    packed tensors and the folder is removed at once; Marlin repacks them into its own layout, so the folder stays
    beside the model (``save`` copies it) and is removed when the model is garbage-collected.
    """
    import weakref

    try:
        model = backend.load(folder, options)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if all(backend.is_packed(m) for m in model.modules() if backend.is_quantized_layer(m)):
        setattr(model, SOURCE_ATTR, None)
        shutil.rmtree(folder, ignore_errors=True)
    else:
        weakref.finalize(model, shutil.rmtree, folder, True)
    return model


def release_quantizer() -> None:
    """Let go of the quantizer's working model (a full copy of the weights) once a quantization is over.

    Measured with gptqmodel 7.6 (``gc.get_referrers`` from the ``BaseQModel`` still alive after ``gc.collect()``):
    two references outlive ``GPTQModel.quantize``. (1) ``STOP_FORWARD_EXCEPTION``, a module-level exception instance
    gptqmodel raises to stop each calibration forward, keeps the traceback of its last raise, whose frames hold the
    wrapper (``_quantize_with_calibration``'s ``self``). (2) Each worker of its device thread pool keeps the last
    task it ran (``fn, args, kwargs`` stay bound in ``_DeviceWorker._run`` until the next task), a closure over the
    module looper and its processors, which hold the wrapper. Clearing the traceback and handing every worker an
    empty task frees it: 0 wrappers alive after ``gc.collect()``, down from 1. Both are gptqmodel internals, read
    defensively: where they are not found, nothing happens (``tests/test_gptq.py`` checks that the wrapper goes)."""
    import gc
    import sys

    hooked = sys.modules.get("gptqmodel.nn_modules.hooked_linear")
    stop = getattr(hooked, "STOP_FORWARD_EXCEPTION", None)
    if isinstance(stop, BaseException):
        stop.__traceback__ = None
    gptqmodel = sys.modules.get("gptqmodel")
    get_pool = getattr(gptqmodel, "get_device_thread_pool", None)
    pool = get_pool() if callable(get_pool) else None
    workers = {id(w): w for group in (getattr(pool, "_worker_groups", None) or {}).values() for w in group}
    for worker in workers.values():
        try:
            worker.submit(_nothing).result(timeout=60)
        except Exception:  # noqa: BLE001 - freeing memory early is a courtesy; a busy or stopped worker keeps its task
            pass
    gc.collect()  # the wrapper sits in reference cycles (wrapper <-> looper <-> processors)


def _nothing():
    return None


def read_quantization_config(path: str) -> dict | None:
    """The ``quantization_config`` of a transformers folder (config.json), else gptqmodel's quantize_config.json."""
    try:
        with open(os.path.join(path, "config.json")) as handle:
            found = json.load(handle).get("quantization_config")
        if found:
            return found
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(path, "quantize_config.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def method_of(qconfig: dict | None) -> str | None:
    if not qconfig:
        return None
    return str(qconfig.get("quant_method") or qconfig.get("method") or "").lower() or None


# ------------------------------------------------------------------------------------------------ layers
def probe_weight(module):
    """The float32 weight a linear-like layer applies, read off its output on the identity matrix.

    Exact for any kernel that computes ``x @ deq(W).T + b`` (each output row is one dequantized column), whatever its
    internal packing (Marlin repacks; this needs no knowledge of it).
    """
    import torch

    in_features, out_features = module.in_features, module.out_features
    scales = getattr(module, "scales", None)
    dtype = scales.dtype if scales is not None and scales.is_floating_point() else torch.float16
    ref = next(iter(module.buffers()), None)
    dev = ref.device if ref is not None else torch.device("cpu")
    with torch.no_grad():
        eye = torch.eye(in_features, dtype=dtype, device=dev)
        out = module(eye).float()
        bias = getattr(module, "bias", None)
        if bias is not None:
            out = out - bias.float().to(out.device)
    return out.T.contiguous().reshape(out_features, in_features)


def plain_linear(weight, bias):
    """An ``nn.Linear`` holding ``weight`` (float32, (out, in)) and ``bias`` for gptqmodel's packers, on the weight's
    device."""
    import torch

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight.detach().float())
        if bias is not None:
            linear.bias.copy_(bias.detach().float())
    return linear


def fit_grid(weight, scales, zeros, g_idx, bits: int, sym: bool):
    """Scales and zero points for re-quantizing ``weight`` (float32, (out, in)) on a layer's grid.

    Each (group, output row) keeps its scale and zero point where the new weights fit in the range that grid covers
    (then the unchanged weights come back exactly); a group whose new weights overflow it gets a fresh min-max (RTN)
    scale and zero point, rounded to float16 as checkpoints store them, as gptqmodel's own quantizer computes them.

    :param scales: float32 (groups, out); :param zeros: int (groups, out); :param g_idx: (in,) group of each column.
    :return: (scales, zeros) with the same shapes, on ``scales``' device (where it computes).
    """
    import torch

    maxq = 2**bits - 1
    device = scales.device
    scales, zeros = scales.clone().float(), zeros.clone().to(device=device, dtype=torch.int32)
    weight = weight.float().to(device)
    g_idx = g_idx.long().to(device)
    for group in range(scales.shape[0]):
        columns = weight[:, g_idx == group]
        if columns.numel() == 0:
            continue
        low, high = columns.min(dim=1).values, columns.max(dim=1).values
        scale, zero = scales[group], zeros[group].float()
        fits = (low >= scale * (0 - zero) - scale / 2) & (high <= scale * (maxq - zero) + scale / 2)
        if bool(fits.all()):
            continue
        low, high = torch.clamp(low, max=0), torch.clamp(high, min=0)
        if sym:
            high = torch.maximum(low.abs(), high)
            low = torch.where(low < 0, -high, low)
        span = torch.where((high - low) == 0, torch.ones_like(high), high - low)
        new_scale = (span / maxq).half().float()
        new_zero = torch.full_like(new_scale, (maxq + 1) // 2) if sym else torch.round(-low / new_scale)
        scales[group] = torch.where(fits, scale, new_scale)
        zeros[group] = torch.where(fits, zero, new_zero.clamp(0, maxq)).to(torch.int32)
    return scales, zeros


def clone_layer(module):
    """A deep copy of a quantized layer, on CPU (the caller packs new tensors into it and moves it), with no compiled
    or cached state.

    gptqmodel's ``post_init`` replaces bound methods (``dequantize_weight``) with ``torch.compile`` wrappers stored on
    the instance; a deep copy would keep calling the original layer's. They are dropped, and ``post_init`` (called by
    the caller once the new tensors are in) compiles them again for the copy.
    """
    import torch

    clone = copy.deepcopy(module)
    for key, value in list(clone.__dict__.items()):
        if callable(value) and not isinstance(value, (torch.nn.Module, torch.Tensor, type)):
            del clone.__dict__[key]
    if hasattr(clone, "optimized"):
        clone.optimized = False
    return clone.cpu()


class PackedLayersBackend:
    """What the gptq and awq backends share: gptqmodel's layers either hold the checkpoint's packed tensors as they are
    (``kernel='torch'``: de-quantizable, re-quantizable, saved as they are) or are repacked for a faster kernel
    (Marlin: read off the kernel's output, saved by copying the checkpoint they came from). A subclass of both this
    and ``QuantBackend`` supplies ``format_name``, ``is_packed``, ``dequantize_packed``, ``requantize_packed`` and
    ``checkpoint_tensors``."""

    format_name = ""

    def install_problems(self):
        return install_problems()

    def quantize_with(self, config, model, options, calibration):
        """Quantize ``model`` (a model or a folder) with gptqmodel's ``config`` (a GPTQConfig or AWQConfig) on the
        calibration batches, then load the result with the kernel ``options`` ask for."""
        import torch

        from qadapt.errors import InvalidOptionError
        from qadapt.hf import default_device

        if not calibration:
            raise InvalidOptionError(f"quantize with backend '{self.name}'", f"{self.format_name} needs calibration data",
                                     "Pass calibration=[texts...] with tokenizer=..., or token-id tensors")
        from qadapt.hf import restore_defuser_patches

        gptqmodel = import_gptqmodel()
        half = "float16" if options["dtype"] == "float32" else options["dtype"]
        try:
            with source_folder(model) as folder:
                with quiet(), restore_defuser_patches():  # see load_quantized
                    wrapper = gptqmodel.GPTQModel.load(folder, config, device=default_device(), dtype=getattr(torch, half))
                    with logs_elsewhere():
                        wrapper.quantize(calibration_dicts(calibration))
                saved = save_to_temporary_folder(wrapper, self.name)  # while the source folder still exists
            del wrapper  # free its copy of the weights before loading the saved one
        finally:
            release_quantizer()
        return load_from_temporary_folder(self, saved, options)

    def save(self, model, path, options):
        from qadapt.errors import InvalidOptionError

        source = getattr(model, SOURCE_ATTR, None)
        layers = [m for m in model.modules() if self.is_quantized_layer(m)]
        if layers and all(self.is_packed(m) for m in layers):
            save_state(model, path, self.checkpoint_tensors)
        elif source and os.path.isdir(source):  # Marlin: the base never changes, its checkpoint is the source's
            for name in os.listdir(source):
                if name.endswith((".safetensors", ".json")) and name != "qadapt.json":
                    shutil.copy2(os.path.join(source, name), os.path.join(path, name))
        else:
            raise InvalidOptionError(
                f"save a {self.format_name} model running the Marlin kernel", "its packed tensors are in Marlin's layout",
                "Load the model with kernel='torch' to save it",
            )

    def dequantize(self, module):
        return self.dequantize_packed(module) if self.is_packed(module) else probe_weight(module)

    def training_dequantizer(self, module):
        """gptqmodel's torch kernel's own ``dequantize_weight()`` (``(in, out)``, transposed here); none for the
        repacked serving kernels (Marlin refuses training)."""
        if not self.is_packed(module) or not callable(getattr(module, "dequantize_weight", None)):
            return None
        return lambda dtype: module.dequantize_weight().t().to(dtype)  # TorchLinear casts it to the input's dtype

    def requantize(self, module, weight):
        from qadapt.errors import InvalidOptionError

        if not self.is_packed(module):
            raise InvalidOptionError(
                f"re-quantize a {type(module).__name__} layer", "its weights are repacked for that kernel",
                "Use merge(strategy='dequantize'), or load with kernel='torch'",
            )
        return self.requantize_packed(module, weight)
