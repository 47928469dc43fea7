"""What a merge did (per layer and for the model), and what it replaced, to undo it exactly."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerMerge:
    name: str
    delta_norm: float  # ||W' - W||, the weight change the adapter asks for
    kept_error: float  # ||(deq(Q(W')) - W) - (W' - W)|| / ||W' - W||: 0 = all of it survives

    @property
    def kept(self) -> float:
        return max(0.0, 1.0 - self.kept_error)


@dataclass
class MergeReport:
    backend: str
    method: str
    strategy: str
    output_error: float  # ||y_merged - y_ref|| / ||y_ref|| on the calibration batch
    max_abs_error: float
    layers: list[LayerMerge] = field(default_factory=list)
    policy: str = ""  # the re-quantization policy kept ("fresh", "best", "best+inputs"), where there was a choice
    candidates: dict = field(default_factory=dict)  # output error of each policy tried
    seconds: dict = field(default_factory=dict)  # how long building and measuring each policy's layers took

    @property
    def mean_kept(self) -> float:
        return sum(layer.kept for layer in self.layers) / max(1, len(self.layers))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean_kept"] = self.mean_kept
        return data

    def __str__(self) -> str:
        lines = [
            f"merge {self.method!r} on {self.backend} ({self.strategy}): output error {self.output_error:.2e} "
            f"(max abs {self.max_abs_error:.2e}), {len(self.layers)} layers, mean weight change kept {self.mean_kept:.1%}"
        ]
        if self.candidates:
            tried = ", ".join(f"{name} {error:.2e}" for name, error in self.candidates.items())
            lines.append(f"  policy kept: {self.policy} (output error of each tried: {tried})")
        worst = sorted(self.layers, key=lambda layer: layer.kept_error, reverse=True)[:5]
        if worst:
            lines.append(f"  the {len(worst)} layers that kept least of the adapter's weight change"
                         + (f" (of {len(self.layers)}; report.layers has all)" if len(self.layers) > len(worst) else "")
                         + ":")
        lines += [f"    {layer.name}: kept {layer.kept:.1%} of ||dW||={layer.delta_norm:.3e}" for layer in worst]
        return "\n".join(lines)


@dataclass
class MergeState:
    """What a merge replaced, to undo it exactly."""

    strategy: str
    adapter_name: str
    originals: dict = field(default_factory=dict)  # module path -> the module (tuner or quantized layer) it replaced
    report: MergeReport | None = None
    guard: object = None  # the forward pre-hook refusing training while merged (engine.guard_training)


def relative_error(actual, expected) -> tuple[float, float]:
    diff = (actual.float() - expected.float())
    return (diff.norm() / expected.float().norm().clamp_min(1e-12)).item(), diff.abs().max().item()
