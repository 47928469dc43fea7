"""``qadapt doctor``: what can run here, what cannot, and why."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

#: Installs seen to break more than their own backend, with what to do.
KNOWN_BAD = [
    (
        lambda: _installed("neural-compressor") and not _importable("prettytable"),
        "`neural-compressor` is installed without its torch dependencies (prettytable, ...): PEFT imports it for every "
        "LoRA attach and fails, whatever the backend",
        "pip uninstall neural-compressor && pip install neural-compressor-pt",
    ),
    (
        lambda: _installed("hqq") and not _importable("termcolor"),
        "`hqq` is installed without `termcolor`: `import transformers` itself fails",
        "pip install termcolor",
    ),
    (
        lambda: _installed("gptqmodel") and not _importable("optimum"),
        "`gptqmodel` is installed without `optimum`: PEFT refuses to attach adapters to GPTQ layers",
        "pip install 'optimum>=1.24'",
    ),
]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def findings() -> dict:
    report = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        report["torch"] = torch.__version__
        report["cuda"] = torch.cuda.is_available()
        if report["cuda"]:
            report["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # torch itself broken
        report["torch"] = f"not importable ({exc})"
    for package in ("transformers", "peft", "accelerate", "safetensors"):
        report[package] = importlib.metadata.version(package) if _installed(package) else None
    report["known_bad_installs"] = [{"problem": problem, "fix": fix} for check, problem, fix in KNOWN_BAD if check()]
    from .cli import backend_rows

    report["backends"] = backend_rows(check=True)
    return report


def run() -> int:
    report = findings()
    print(f"python {report['python']} on {report['platform']}")
    print(f"torch {report['torch']}, CUDA {'yes: ' + report.get('gpu', '') if report.get('cuda') else 'no'}")
    print(", ".join(f"{p} {report[p]}" for p in ("transformers", "peft", "accelerate", "safetensors")))
    print()
    for row in report["backends"]:
        status = row.get("status")
        mark = {"ok": "ok  ", "unavailable": "no  ", "failed": "FAIL"}.get(status, "?   ")
        version = f" {row.get('library')} {row.get('library_version')}" if row.get("library_version") else ""
        print(f"[{mark}] {row['name']}{version}")
        if row.get("reason"):
            print(f"       {row.get('reason')}")
            if row.get("hint"):
                print(f"       {row['hint']}")
    if report["known_bad_installs"]:
        print("\nKnown bad installs:")
        for item in report["known_bad_installs"]:
            print(f"  - {item['problem']}\n    fix: {item['fix']}")
    return 0
