"""Shared fixtures: a tiny Llama and a tokenizer built offline, once per session."""

from __future__ import annotations

import importlib.util

import pytest

from qadapt.capabilities import ENGINES
from qadapt.testing import toy

#: the kit's sharded-training cells: passed, refused as declared or unavailable (its `ok` checks that), never failed;
#: tests asserting every one-process cell passed leave them out
ENGINE_CELLS = tuple(ENGINES.values())


@pytest.fixture(scope="session")
def tokenizer():
    return toy.build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny full-precision Llama saved as a transformers folder (safetensors)."""
    return toy.save_model(toy.build_model(), tmp_path_factory.mktemp("tiny") / "llama", tokenizer)


@pytest.fixture(scope="session")
def batches(tokenizer):
    return toy.token_batches(tokenizer, batch_size=2, seq_len=32, count=4)


def train_steps(model, batches, lr=1e-2):
    """AdamW on ``model``'s trainable parameters, one step per batch (labels = the inputs); the losses."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def backend_ready(name: str):
    """Skip unless backend ``name`` is registered and can run here; the skip says why."""
    import qadapt
    if name not in qadapt.backends():
        pytest.skip(f"backend '{name}' is not registered (its plugin failed to load, see `qadapt doctor`)")
    env = qadapt.get_backend(name).check_environment()
    if not env.ok:
        pytest.skip(f"backend '{name}' cannot run here: {env.reason}")


def builtin_backends() -> list[str]:
    """The backends qadapt's own distribution ships (its ``qadapt`` entry points), whatever is registered."""
    from importlib.metadata import distribution

    from qadapt.plugins import DISTRIBUTION, GROUP

    return sorted({ep.name for ep in distribution(DISTRIBUTION).entry_points if ep.group == GROUP})


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; results of the last GPU run are in docs/gpu-runs.md")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
