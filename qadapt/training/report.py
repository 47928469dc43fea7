"""What :func:`qadapt.prepare` did: per part, what runs, on which modules, and what fell back and why."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PartReport:
    """One part: ``setting`` asked, ``how`` it runs ("" where nothing runs), the ``modules`` it applies to, the
    ``fallbacks`` (module name, or "" for the whole part, -> why it was not applied there) and ``notes``."""

    name: str
    setting: str
    how: str = ""
    modules: list = field(default_factory=list)
    fallbacks: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        if not self.how:
            if self.fallbacks:
                return "not applied (see the fallbacks below)"
            return self.setting if self.setting in ("off", "peft", "backend", "none") else "nothing to do"
        line = self.how
        if self.modules:
            line += f" ({len(self.modules)} modules)"
        return line

    def to_dict(self) -> dict:
        return {"setting": self.setting, "how": self.how, "modules": list(self.modules),
                "fallbacks": dict(self.fallbacks), "notes": list(self.notes)}


@dataclass
class PrepareReport:
    """Printable; ``fallbacks`` lists ``(part, module, reason)`` for everything asked that did not happen."""

    mode: str
    backend: str
    model: str
    parts: dict = field(default_factory=dict)
    #: what the training forward found later (a caller that fuses the LM head itself, a forward without labels)
    runtime: list = field(default_factory=list)

    def add(self, part: PartReport) -> PartReport:
        self.parts[part.name] = part
        return part

    @property
    def fallbacks(self) -> list:
        return [(p.name, module, reason) for p in self.parts.values() for module, reason in p.fallbacks.items()]

    def note_runtime(self, message: str) -> None:
        """Record (once) and warn about something the training forward did that the report could not know."""
        if message not in self.runtime:
            self.runtime.append(message)
            warnings.warn(f"qadapt.prepare: {message}", stacklevel=3)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "backend": self.backend, "model": self.model,
                "parts": {name: p.to_dict() for name, p in self.parts.items()}, "runtime": list(self.runtime),
                "fallbacks": [list(f) for f in self.fallbacks]}

    def __str__(self) -> str:
        lines = [f"qadapt.prepare(mode={self.mode!r}) on {self.model} (backend {self.backend!r}):"]
        for part in self.parts.values():
            lines.append(f"  {part.name:<11} {part.summary()}")
            for note in part.notes:
                lines.append(f"  {'':<11}   {note}")
        if self.fallbacks:
            lines.append("  fell back (strict=True refuses these):")
            for part in self.parts.values():
                for reason, count in Counter(part.fallbacks.values()).items():
                    where = [m for m, r in part.fallbacks.items() if r == reason]
                    target = "the whole part" if where == [""] else (
                        f"{count} modules, e.g. {where[0]}" if count > 1 else where[0])
                    lines.append(f"    {part.name}: {target}: {reason}")
        for message in self.runtime:
            lines.append(f"  at run time: {message}")
        return "\n".join(lines)
