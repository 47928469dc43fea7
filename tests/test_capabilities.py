"""Every cell each backend declares is performed and checked (qadapt.conformance), for each option set the matrix
shows. A declared "yes" must work and be measured; a declared "no" must raise qadapt's error before any change."""

from __future__ import annotations

import pytest

from qadapt.capabilities import METHODS, OPERATIONS
from qadapt.conformance import check_backend
from qadapt.matrix import VARIANTS

from .conftest import backend_ready

CASES = [
    ("bnb", {"bits": 4}),
    ("bnb", {"bits": 4, "quant_type": "fp4", "double_quant": False}),
    ("bnb", {"bits": 8}),
    ("hqq", {"bits": 4, "group_size": 64}),
    ("torchao", {"scheme": "int8_weight_only"}),
    ("inc", {"algorithm": "rtn", "bits": 4}),
    ("eetq", {}),
    ("aqlm", {"num_codebooks": 2, "nbits_per_codebook": 8}),
    ("aqlm", {"num_codebooks": 1, "nbits_per_codebook": 16}),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend,options", CASES, ids=[f"{b}-{'-'.join(map(str, o.values()))}" for b, o in CASES])
def test_declared_capabilities_hold(backend, options, method):
    backend_ready(backend)
    results = check_backend(backend, options, methods=[method])
    assert {r.operation for r in results} == set(OPERATIONS)
    failures = [str(r) for r in results if not r.ok]
    assert not failures, failures


def test_every_cell_is_declared_with_a_reason():
    import qadapt

    for name, backend in qadapt.backends().items():
        for options in VARIANTS.get(name, [{}]):
            table = backend.capabilities(backend.validate_options(options))
            assert set(table) == {(m, o) for m in METHODS for o in OPERATIONS}, name
            for cell, support in table.items():
                assert support.reason, f"{name} {cell} has no reason"
                if not support:
                    assert support.hint or "cannot be trained" in support.reason, f"{name} {cell}: a refusal needs a hint"


def test_torchao_int4_refuses_training_before_any_work():
    backend_ready("torchao")
    import qadapt

    backend = qadapt.get_backend("torchao")
    support = backend.peft_compatible("lora", backend.validate_options({"scheme": "int4_weight_only"}))
    assert not support and "int8" in support.reason
