"""What the hostile-input tests compare: a model's whole state and a folder tree, bit for bit."""

from __future__ import annotations

import hashlib
import os
import stat


def model_state(model) -> dict:
    """Every module (name, class, attribute names, hook counts), every tensor (bits, dtype, requires_grad) of
    ``model``: equal before and after means nothing of it changed. qadapt's own record is left out (it is created
    on first use, by design)."""
    import torch

    from qadapt.record import ATTRIBUTE

    modules = []
    for name, module in model.named_modules(remove_duplicate=False):
        attributes = tuple(sorted(key for key in vars(module) if key != ATTRIBUTE))
        hooks = tuple(len(value) for key, value in sorted(vars(module).items()) if key.endswith("hooks")
                      and isinstance(value, dict))
        modules.append((name, type(module).__name__, attributes, hooks, module.training))
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        data = tensor.detach()
        plain = type(data) is torch.Tensor and data.numel()
        raw = data.contiguous().view(-1).view(torch.uint8) if plain else data  # bits: NaN == NaN, -0.0 != 0.0
        tensors[name] = (raw.clone(), data.dtype, tuple(data.shape), bool(getattr(tensor, "requires_grad", False)))
    return {"modules": modules, "tensors": tensors}


def same_state(before: dict, after: dict) -> bool:
    import torch

    if before["modules"] != after["modules"] or before["tensors"].keys() != after["tensors"].keys():
        return False
    for name, (raw, dtype, shape, grad) in before["tensors"].items():
        other = after["tensors"][name]
        if (dtype, shape, grad) != other[1:] or not torch.equal(raw, other[0]):
            return False
    return True


def tree(root) -> dict:
    """``{relative path: (kind, sha256 or link target)}`` of everything under ``root``, symlinks not followed."""
    found = {}
    root = os.fspath(root)
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            full = os.path.join(folder, name)
            info = os.lstat(full)
            relative = os.path.relpath(full, root)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", os.readlink(full))
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = ("dir", None)
            elif stat.S_ISREG(info.st_mode):
                with open(full, "rb") as handle:
                    found[relative] = ("file", hashlib.sha256(handle.read()).hexdigest())
            else:
                found[relative] = ("special", None)
    return found
