"""Which merged layers to build and compare: one candidate per re-quantization policy worth trying."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One way to build every merged layer of a merge."""

    label: str  # how the report names it ("" where the backend offers no choice)
    policy: str | None = None  # passed to ``requantize(policy=...)``
    with_inputs: bool = False  # pass the layer's input statistics as ``requantize(hessian=...)``

    def requantize_keywords(self, hessian) -> dict:
        keywords = {} if self.policy is None else {"policy": self.policy}
        if self.with_inputs:
            keywords["hessian"] = hessian
        return keywords


def candidates(backend, strategy: str, policy: str | None, has_calibration: bool) -> list[Candidate]:
    """The candidates of a merge, in the order they are tried (on equal output error the first is kept).

    ``"dequantize"`` has one exact candidate. A backend that offers no policy has one. An asked ``policy`` is the only
    candidate. Otherwise qadapt tries ``"fresh"`` (PEFT's own arithmetic) and ``"best"``, and keeps the lower output
    error: never worse on the calibration batch than PEFT's merge. With calibration text and a backend that rounds
    with input statistics, ``"best"`` runs with them (``"best+inputs"``): per layer it keeps whichever of the fresh,
    best and GPTQ-style roundings has the lowest output error on those inputs, so ``"best"`` alone would only repeat
    its work (it was half of a bitsandbytes merge's time).
    """
    if strategy == "dequantize":
        return [Candidate("exact")]
    offered = backend.requantize_policies
    if not offered:
        return [Candidate("")]
    if policy is not None:
        return [Candidate(policy, policy)]
    found = [Candidate(name, name) for name in ("fresh", "best") if name in offered] or [Candidate(offered[0], offered[0])]
    if has_calibration and backend.requantize_uses_inputs and "best" in offered:
        found = [c for c in found if c.label != "best"] + [Candidate("best+inputs", "best", with_inputs=True)]
    return found
