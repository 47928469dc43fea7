"""Render ``docs/compatibility.md`` from recorded runs.

    python tools/compat_docs.py docs/matrix docs/compatibility.md

Reads, from the folder given:

* ``<backend>-cpu.json`` / ``<backend>-gpu.json``: what ``qadapt matrix --verify --backend <backend> --output FILE``
  recorded (``nox -s "matrix(<backend>)"`` on the CPU machine; the GPU runs of docs/gpu-runs.md). Each holds the
  machine, the versions, the declared table with its reasons and every cell's outcome.
* ``compat-*.json``: one PEFT x transformers pair's suite result, written by ``nox -t compat`` through
  ``python tools/compat_docs.py --record-pair JUNIT_XML OUT.json``.

For every backend x option set the page shows one row per method x operation: the declared level and reason, and what
happened on the CPU and on the GPU. A declaration contradicted by a run (a declared ``yes`` that failed, a declared
``no`` that worked or broke the wrong way) is marked **CONTRADICTED** and listed at the top. When the live declaration
(the installed plugins) differs from the one recorded with a run, the row says so: that run must be repeated.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from qadapt.capabilities import METHODS, OPERATIONS

MACHINES = ("cpu", "gpu")
RECORD = re.compile(r"^(?P<backend>[A-Za-z0-9_.]+)-(?P<machine>cpu|gpu)\.json$")


# --------------------------------------------------------------------------- reading
def load_records(folder: str) -> dict:
    """``{backend: {"cpu": record, "gpu": record}}`` from ``<backend>-<machine>.json`` files in ``folder``."""
    records: dict = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        match = RECORD.match(os.path.basename(path))
        if not match:
            continue
        with open(path) as handle:
            record = json.load(handle)
        record["_file"] = os.path.basename(path)
        records.setdefault(match["backend"], {})[match["machine"]] = record
    return records


def load_pairs(folder: str) -> list[dict]:
    pairs = []
    for path in sorted(glob.glob(os.path.join(folder, "compat-*.json"))):
        with open(path) as handle:
            pairs.append(json.load(handle))
    return sorted(pairs, key=lambda p: (_version_key(p["versions"].get("peft", "")),
                                        _version_key(p["versions"].get("transformers", ""))))


def live_declaration(backends) -> dict:
    """The installed plugins' tables, ``{(backend, options_key, method, operation): row}``; empty where unavailable."""
    try:
        from qadapt.testing.matrix import declared_rows
    except Exception:
        return {}
    rows = {}
    for backend in backends:
        try:
            found = declared_rows([backend])
        except Exception:  # a plugin that cannot even declare here: the recorded declaration is all there is
            continue
        for row in found:
            rows[(backend, _options_key(row["options"]), row["method"], row["operation"])] = row
    return rows


def _not_run(backend: str, machine: str) -> str:
    reason = _not_run_reasons(backend).get(machine)
    return f"not run on {machine.upper()}: {reason}" if reason else f"not yet run on {machine.upper()}"


def _not_run_reasons(backend: str) -> dict:
    """The installed backend's ``not_run_on`` (machines it is not verified on by design, and why); {} if not installed."""
    try:
        import qadapt

        return dict(qadapt.get_backend(backend).not_run_on)
    except Exception:
        return {}


# --------------------------------------------------------------------------- judging
def classify(declared: bool | None, outcome: str | None) -> str:
    """One of: passed, refused, skipped, unavailable, contradicted, not run."""
    if outcome is None:
        return "not run"
    if outcome == "passed":
        return "passed" if declared in (True, None) else "contradicted"
    if outcome == "refused as declared":
        return "refused" if declared in (False, None) else "contradicted"
    if outcome in ("skipped", "unavailable"):
        return outcome
    return "contradicted"  # "failed ...": a declared yes that failed, or a declared no that worked or raised the wrong error


def describe(result: dict | None, missing: str) -> str:
    if result is None:
        return missing
    kind = classify(result.get("declared"), result["outcome"])
    detail = _cell(result.get("detail", ""))
    if kind == "passed":
        return "passed" + (f" ({detail})" if detail else "")
    if kind == "refused":
        return "refused as declared"
    if kind == "skipped":
        return f"skipped: {detail}" if detail else "skipped"
    if kind == "unavailable":
        return f"unavailable: {detail}" if detail else "unavailable"
    outcome = result["outcome"]
    if outcome == "failed" and detail:
        outcome = f"failed: {detail}"
    elif detail:
        outcome = f"{outcome} ({detail})"
    return f"**CONTRADICTED**: {_cell(outcome)}"


def _index(record: dict | None) -> dict:
    """``{(options_key, method, operation): result}``; a whole-option-set result (no method) is keyed with ``None``."""
    index: dict = {}
    for result in (record or {}).get("results", []):
        key = _options_key(result.get("options", {}))
        if "method" in result:
            index[(key, result["method"], result["operation"])] = result
        else:
            index[(key, None, None)] = result
    return index


# --------------------------------------------------------------------------- rendering
class _Findings:
    """What rendering found that goes at the top of the page."""

    def __init__(self) -> None:
        self.contradictions: list[str] = []
        self.stale: list[str] = []


def render(records: dict, pairs: list[dict] | None = None, live: dict | None = None) -> str:
    findings = _Findings()
    sections: list[str] = []
    for backend in sorted(records):
        sections += _backend_section(backend, records[backend], live or {}, findings)
    return "\n".join(_head(records, findings) + _render_pairs(pairs or []) + sections).rstrip() + "\n"


def _backend_section(backend: str, by_machine: dict, live: dict, findings: _Findings) -> list[str]:
    indexes = {machine: _index(by_machine.get(machine)) for machine in MACHINES}
    lines = [f"## {backend}\n"] + [_run_summary(backend, machine, by_machine.get(machine)) for machine in MACHINES] + [""]
    declared = {}  # (options_key, method, operation) -> row, recorded declaration (CPU first, then GPU)
    option_sets: dict = {}
    for machine in MACHINES:
        record = by_machine.get(machine) or {}
        for row in record.get("declared", []):
            key = _options_key(row["options"])
            option_sets.setdefault(key, row["options"])
            declared.setdefault((key, row["method"], row["operation"]), row)
        for result in record.get("results", []):
            option_sets.setdefault(_options_key(result.get("options", {})), result.get("options", {}))
    for key, row in live.items():
        if key[0] == backend:
            option_sets.setdefault(key[1], row["options"])
    for key, options in option_sets.items():
        lines += _option_set_section(backend, key, options, by_machine, indexes, declared, live, findings)
    return lines


def _option_set_section(backend, key, options, by_machine, indexes, declared, live, findings) -> list[str]:
    label = _options_label(options)
    lines = [f"### {backend}: {label}\n"]
    whole = {m: indexes[m].get((key, None, None)) or _all_unavailable(indexes[m], key) for m in MACHINES}
    for machine in MACHINES:
        if whole[machine] is not None:
            lines.append(f"- {machine.upper()}: {describe(whole[machine], '')}")
            if classify(None, whole[machine]["outcome"]) == "contradicted":
                findings.contradictions.append(f"{backend} ({label}) on {machine.upper()}: {_cell(whole[machine]['detail'])}")
    for machine in MACHINES:
        sources = {r["source"] for (k, _, _), r in indexes[machine].items() if k == key and r.get("source")}
        for source in sorted(sources):
            lines.append(f"- {machine.upper()}: the cells were checked on {_cell(source)}")
    if any(whole.values()) or any(r.get("source") for m in MACHINES for (k, _, _), r in indexes[m].items() if k == key):
        lines.append("")
    lines += ["| method | operation | declared | reason | CPU run | GPU run |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        for operation in OPERATIONS:
            cell = (key, method, operation)
            current = live.get((backend, key, method, operation))
            lines.append(_cell_row(backend, label, cell, current or declared.get(cell), current, by_machine, indexes,
                                   whole, findings))
    return lines + [""]


def _cell_row(backend, label, cell, shown, current, by_machine, indexes, whole, findings) -> str:
    """One table row: the declaration (live where the plugin is installed, else the recorded one) and each run."""
    _, method, operation = cell
    level = "?" if shown is None else ("yes" if shown["supported"] else "no")
    reason = "" if shown is None else shown["reason"]
    if shown is not None and not shown["supported"] and shown.get("hint"):
        reason = f"{reason}. Instead: {shown['hint']}" if reason else f"Instead: {shown['hint']}"
    runs = [_run_text(backend, label, machine, cell, current, by_machine, indexes, whole, findings) for machine in MACHINES]
    mark = "**" if any("CONTRADICTED" in r for r in runs) else ""
    return f"| {mark}{method}{mark} | {mark}{operation}{mark} | {level} | {_cell(reason)} | {runs[0]} | {runs[1]} |"


def _run_text(backend, label, machine, cell, current, by_machine, indexes, whole, findings) -> str:
    """What one machine's run found for one cell."""
    _, method, operation = cell
    if by_machine.get(machine) is None:
        return _not_run(backend, machine)
    result = indexes[machine].get(cell)
    if whole[machine] is not None and (result is None or result["outcome"] == "unavailable"):
        kind = classify(None, whole[machine]["outcome"])
        return "**CONTRADICTED** (see above)" if kind == "contradicted" else f"{kind} (see above)"
    text = describe(result, "not recorded")
    if result is not None and classify(result.get("declared"), result["outcome"]) == "contradicted":
        findings.contradictions.append(f"{backend} ({label}) {method} {operation} on {machine.upper()}: "
                                       f"declared {'yes' if result.get('declared') else 'no'}, "
                                       f"{_cell(result['outcome'])} {_cell(result.get('detail', ''))}".rstrip())
    if (result is not None and current is not None and "declared" in result
            and bool(result["declared"]) != bool(current["supported"])):
        text += f"; **STALE**: recorded with declared {'yes' if result['declared'] else 'no'}, re-run this backend"
        findings.stale.append(f"{backend} ({label}) {method} {operation} ({machine.upper()} run)")
    return text


def _head(records: dict, findings: _Findings) -> list[str]:
    head = [
        "# Compatibility",
        "",
        "Generated by `python tools/compat_docs.py docs/matrix docs/compatibility.md` (`nox -s matrix-docs`) from the "
        "records in `docs/matrix/`. Do not edit by hand: re-run the backend's `nox -s \"matrix(<backend>)\"` "
        "(CPU) or the GPU run of docs/gpu-runs.md, then re-render.",
        "",
        "Each cell is the backend's declaration (`qadapt matrix`) and what `qadapt matrix --verify` found when it "
        "performed it: **passed** (a declared yes, checked: trains, merges within bounds, unmerges exactly, saves and "
        "reloads), **refused as declared** (a declared no raised qadapt's error before any weight changed), "
        "**skipped** (nothing to check: e.g. no merge once training is refused), **unavailable** (the backend or "
        "option set cannot run on that machine, with the reason) or **CONTRADICTED** (reality disagrees with the "
        "declaration: a declared yes failed, or a declared no worked or broke with the wrong error).",
        "",
        "These runs use the toy Llama. The architecture dimension (every backend on Qwen2, Gemma, GPT-2, Phi-3, "
        "Falcon, Bloom, OPT, Mixtral, Qwen3-MoE and Qwen2-MoE, with what each one refuses there and why) is "
        "[architectures.md](architectures.md).",
        "",
        "## Summary",
        "",
        "| backend | CPU run | GPU run |",
        "|---|---|---|",
    ]
    for backend in sorted(records):
        cols = []
        for machine in MACHINES:
            record = records[backend].get(machine)
            cols.append(f"{_counts(record)} ({record.get('date', '?')[:10]})" if record else _not_run(backend, machine))
        head.append(f"| {backend} | {cols[0]} | {cols[1]} |")
    head.append("")
    if findings.contradictions:
        head += ["## Declarations contradicted by a run", ""]
        head += [f"- **{line}**" for line in findings.contradictions]
        head.append("")
    else:
        head += ["No declaration is contradicted by a recorded run.", ""]
    if findings.stale:
        head += ["## Stale records (the declaration changed after the run)", ""]
        head += [f"- {line}" for line in findings.stale]
        head.append("")
    return head


def _render_pairs(pairs: list[dict]) -> list[str]:
    lines = ["## PEFT x transformers pairs", ""]
    if not pairs:
        return lines + ["No pair recorded yet: `nox -t compat`.", ""]
    lines += ["The core suite (`tests/test_capabilities.py tests/test_workflow.py tests/test_bad_input.py`, with bnb, hqq "
              "and torchao) against one pair. pyproject's lower bounds are the oldest passing pair.", "",
              "| peft | transformers | torch | result | tests | date | command |", "|---|---|---|---|---|---|---|"]
    for pair in pairs:
        v = pair["versions"]
        counts = pair["counts"]
        result = "passed" if pair["passed"] else "**failed**"
        tests = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                 f"{counts['skipped']} skipped")
        lines.append(f"| {v.get('peft')} | {v.get('transformers')} | {v.get('torch')} | {result} | {tests} | "
                     f"{pair.get('date', '')[:10]} | `{pair.get('command', '')}` |")
    for pair in pairs:
        if not pair["passed"] and pair.get("failures"):
            v = pair["versions"]
            lines += ["", f"Why peft {v.get('peft')} x transformers {v.get('transformers')} fails (the first "
                          f"{len(pair['failures'])} failures, grouped by message):", ""]
            grouped: dict = {}
            for failure in pair["failures"]:
                grouped.setdefault(_short_path(failure["message"]), []).append(failure["test"])
            for message, tests in grouped.items():
                more = f" and {len(tests) - 1} more" if len(tests) > 1 else ""
                lines.append(f"- `{tests[0]}`{more}: {_cell(message)}")
    lines.append("")
    return lines


def _all_unavailable(index: dict, key: str) -> dict | None:
    """The one ``unavailable`` result that stands for every cell of an option set, if that is what the run found."""
    cells = [r for (k, method, _), r in index.items() if k == key and method is not None]
    if cells and all(r["outcome"] == "unavailable" for r in cells) and len({r.get("detail", "") for r in cells}) == 1:
        return {"outcome": "unavailable", "detail": cells[0].get("detail", "")}
    return None


def _run_summary(backend: str, machine: str, record: dict | None) -> str:
    if record is None:
        return f"- {machine.upper()}: {_not_run(backend, machine)}."
    info = record.get("machine", {})
    where = info.get("gpu") if info.get("cuda") else f"CPU only ({info.get('cpus', '?')} cores)"
    versions = ", ".join(f"{k} {v or '(not installed)'}" for k, v in record.get("versions", {}).items())
    env = ""
    for name, found in record.get("environments", {}).items():
        if not found.get("ok"):
            env = f" Backend unavailable there: {_cell(found.get('reason', ''))}"
    command = record.get("command", "qadapt matrix --verify")
    date = record.get("date", "date not recorded")
    took = f", {record['seconds']:g} s" if "seconds" in record else ""
    return (f"- {machine.upper()}: {where}, Python {info.get('python', '?')}; {versions}. "
            f"`{command}` on {date}{took} ({record['_file']}): {_counts(record)}.{env}")


def _counts(record: dict) -> str:
    tally: dict = {}
    for result in record.get("results", []):
        kind = classify(result.get("declared"), result["outcome"])
        tally[kind] = tally.get(kind, 0) + 1
    order = ("passed", "refused", "skipped", "unavailable", "contradicted")
    text = ", ".join(f"{tally[k]} {'**contradicted**' if k == 'contradicted' else k}" for k in order if tally.get(k))
    return text or "no checks"


def _options_key(options: dict) -> str:
    return json.dumps(options, sort_keys=True)


def _options_label(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "default options"


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _short_path(text: str) -> str:
    """Drop environment-specific directories: ``/tmp/x/lib/python3.11/site-packages/torchao/a.py`` -> ``torchao/a.py``."""
    return re.sub(r"(?:/[^\s'\"()]*)?/site-packages/", "", text)


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", version))


# --------------------------------------------------------------------------- recording a PEFT x transformers pair
def record_pair(junit_xml: str, output: str, command: str = "") -> dict:
    """Summarise a pytest ``--junitxml`` report and the installed versions into ``output`` (JSON)."""
    import datetime
    import importlib.metadata
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag, bucket in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                counts[bucket] += 1
                if bucket != "skipped" and len(failures) < 10:
                    message = (found.get("message") or found.text or "").strip().splitlines()
                    failures.append({"test": name, "message": (message[0] if message else "")[:300]})
                break
        else:
            counts["passed"] += 1
    versions = {}
    for package in ("peft", "transformers", "torch", "bitsandbytes", "hqq", "torchao"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    record = {"versions": versions, "counts": counts, "passed": counts["failed"] == counts["errors"] == 0 and counts["passed"] > 0,
              "failures": failures, "command": command,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(output, "w") as handle:
        json.dump(record, handle, indent=2)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/compat_docs.py", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the folder of recorded runs (docs/matrix)")
    parser.add_argument("output", help="the Markdown file to write (docs/compatibility.md), or - for stdout")
    parser.add_argument("--record-pair", metavar="JUNIT_XML",
                        help="instead: record a compat session's pytest report into FOLDER/OUTPUT (a JSON file name)")
    parser.add_argument("--command", default="", help="with --record-pair: the command that ran the suite")
    parser.add_argument("--no-live", action="store_true", help="do not compare with the installed plugins' declarations")
    args = parser.parse_args(argv)
    if args.record_pair:
        os.makedirs(args.folder, exist_ok=True)
        record = record_pair(args.record_pair, os.path.join(args.folder, args.output), args.command)
        print(f"{'passed' if record['passed'] else 'FAILED'}: {record['counts']} -> {os.path.join(args.folder, args.output)}")
        return 0 if record["passed"] else 1
    records = load_records(args.folder)
    live = {} if args.no_live else live_declaration(records)
    text = render(records, load_pairs(args.folder), live)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as handle:
            handle.write(text)
        print(f"wrote {args.output}: {len(records)} backends")
    return 0


if __name__ == "__main__":
    sys.exit(main())
