"""Putting a model back exactly as it was when attaching an adapter fails half-way.

PEFT injects its layers one by one and raises at the first it cannot build (an unknown ``bias``, a rank too large to
allocate, an adapter whose shapes do not fit the base), leaving the layers before it injected, their parameters
frozen or unfrozen, and attributes such as ``peft_config`` set on the model (PEFT 0.21). :func:`restored_on_failure`
records, for every module of the tree, its attributes and the contents of each of its dicts (children, parameters,
buffers, hooks) and every parameter's ``requires_grad``; on any exception it puts all of that back before the
exception goes on. Tensors are not copied: PEFT's default initialisations do not write to base weights (the ones
that do, PiSSA-style ``init_lora_weights`` strings, are copied first, see :func:`restored_on_failure`).
"""

from __future__ import annotations

from contextlib import contextmanager


_CONTAINERS = (dict, set)


class TreeSnapshot:
    def __init__(self, root, copy_tensors: bool = False) -> None:
        self.modules = []
        for module in root.modules():
            attributes = dict(module.__dict__)
            contents = {key: (dict(value) if isinstance(value, dict) else set(value))
                        for key, value in attributes.items() if isinstance(value, _CONTAINERS)}
            self.modules.append((module, attributes, contents))
        self.flags = [(parameter, parameter.requires_grad) for parameter in root.parameters()]
        self.tensors = [(tensor, tensor.detach().clone()) for tensor in root.state_dict(keep_vars=True).values()] \
            if copy_tensors else []

    def restore(self) -> None:
        import torch

        for module, attributes, contents in self.modules:
            for key in [key for key in module.__dict__ if key not in attributes]:
                del module.__dict__[key]
            module.__dict__.update(attributes)
            for key, saved in contents.items():
                current = attributes[key]  # the same object the module had: emptied and refilled in place
                current.clear()
                current.update(saved)
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)
        with torch.no_grad():
            for tensor, saved in self.tensors:
                tensor.copy_(saved)


@contextmanager
def restored_on_failure(model, copy_tensors: bool = False):
    """Run the block; if it raises anything, put ``model``'s module tree back as it was, then let it raise.
    ``copy_tensors`` also copies every tensor first (for initialisations that rewrite base weights)."""
    snapshot = TreeSnapshot(model, copy_tensors)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
