"""Every cell each backend declares is performed and checked (qadapt.testing.conformance), for each option set the matrix
shows. A declared "yes" must work and be measured; a declared "no" must raise qadapt's error before any change."""

from __future__ import annotations

import pytest

import qadapt
from qadapt.capabilities import METHODS, OPERATIONS
from qadapt.testing import check_backend

from .conftest import backend_ready, builtin_backends

#: every option set each built-in backend's matrix shows, except those verified only on a GPU (the GPU suite runs
#: them: tests/gpu_checks.sh) and backends that need calibration (their own test files run the kit with it)
CASES = [
    (name, dict(options))
    for name, backend in qadapt.backends().items()
    if name in builtin_backends() and not backend.requires_calibration
    for options in backend.matrix_variants
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
    for name, backend in qadapt.backends().items():
        for options in backend.matrix_variants:
            table = backend.capabilities(backend.validate_options(dict(options)))
            assert set(table) == {(m, o) for m in METHODS for o in OPERATIONS}, name
            for cell, support in table.items():
                assert support.reason, f"{name} {cell} has no reason"
                if not support:
                    assert support.hint or "cannot be trained" in support.reason, f"{name} {cell}: a refusal needs a hint"


def test_torchao_int4_refuses_training_before_any_work():
    backend_ready("torchao")
    backend = qadapt.get_backend("torchao")
    support = backend.peft_compatible("lora", backend.validate_options({"scheme": "int4_weight_only"}))
    assert not support and "int8" in support.reason
