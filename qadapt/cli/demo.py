"""``qadapt demo``: for every backend that can run here, on a tiny Llama built offline:
load -> attach LoRA -> a few training steps -> merge (or its refusal) -> save -> reload, as one table."""

from __future__ import annotations

import os
import sys
import tempfile
import time

from ..memory import storage_bytes


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="tiny offline run of every available backend: load, train, merge, save, "
                               "reload")
    demo.add_argument("--backend", action="append", help="only this backend (repeatable)")
    demo.add_argument("--steps", type=int, default=8)


LEGEND = """\
loss before / after: held-out loss of the tiny Llama before and after the training steps (LoRA r=8)
weights MB: true storage of the quantized model's weights (qadapt.memory.storage_bytes)
merge error: relative output error of the merged (re-quantized) model against the unmerged adapter model, on
             held-out text; 'refused' where the backend cannot re-quantize (the numbered note says why)
reload diff: largest |logit| difference after save + reload (0: identical)
s: seconds for the row (load, train, merge, save, reload)"""


def run(args) -> int:
    from . import check_backend_names

    check_backend_names(args.backend)
    return demo(args.backend, steps=args.steps)


def demo(only=None, steps: int = 8) -> int:
    import torch

    import qadapt
    from qadapt.plugins import checked_environment, registrations
    from qadapt.testing import toy

    torch.manual_seed(0)
    print("qadapt demo: building a tiny Llama and a tokenizer offline ...", flush=True)
    tokenizer = toy.build_tokenizer()
    batches = toy.token_batches(tokenizer, batch_size=4, seq_len=64, count=steps + 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qadapt-demo-") as tmp:
        base_dir = toy.save_model(toy.build_model(), os.path.join(tmp, "tiny-llama"), tokenizer)
        names = [n for n in registrations() if not only or n in only]
        for name in names:
            backend = qadapt.get_backend(name)
            env = checked_environment(backend)
            if not env.ok:
                rows.append({"backend": name, "status": f"unavailable: {env.reason}", "hint": env.hint})
                print(f"[{name}] skipped: {env.reason}", flush=True)
                continue
            options = dict(backend.demo_options)
            print(f"[{name}] quantizing ...", flush=True)
            started = time.perf_counter()
            try:
                rows.append(_one(name, options, base_dir, batches, tmp, tokenizer, steps))
            except qadapt.QadaptError as exc:
                rows.append({"backend": name, "status": f"refused: {exc}"})
            except Exception as exc:  # show it in the table; the other backends still run
                rows.append({"backend": name, "status": f"FAILED: {type(exc).__name__}: {exc}"[:160]})
            rows[-1]["seconds"] = time.perf_counter() - started
            if env.reason:  # runs, with a note (e.g. EETQ's format in torch where EETQ's own kernels cannot run)
                rows[-1]["note"] = env.reason
            print(f"[{name}] {rows[-1]['status']} ({rows[-1]['seconds']:.1f} s)", flush=True)
    print()
    print(_table(rows))
    print()
    print(LEGEND)
    missing = [r["backend"] for r in rows if r["status"].startswith("unavailable")]
    if missing:
        print(f"\nNot installed here: {', '.join(missing)}. Every backend that runs on CPU: python3 -m nox -s "
              "demo-all (or pip install -e '.[all]' and run qadapt demo).")
    return 0 if all(not r["status"].startswith("FAILED") for r in rows) else 1


def _one(name, options, base_dir, batches, tmp, tokenizer, steps):
    import torch

    import qadapt

    backend = qadapt.get_backend(name)
    calibration = batches[:2] if backend.needs_calibration(backend.validate_options(options)) else None
    model = qadapt.load(base_dir, backend=name, calibration=calibration, **options)
    memory = storage_bytes(model)
    model = qadapt.attach(model, "lora", r=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    held_out = batches[-1]
    model.eval()
    with torch.no_grad():
        loss_before = model(input_ids=held_out, labels=held_out).loss.item()
    model.train()
    for step in range(steps):
        loss = model(input_ids=batches[step], labels=batches[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"[{name}] step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        loss_after = model(input_ids=held_out, labels=held_out).loss.item()
        before_merge = model(input_ids=held_out).logits
    merge, merge_reason = "-", ""
    try:
        report = qadapt.merge(model, calibration=held_out[:2])
        merge = f"{report.output_error:.2e}"
        qadapt.unmerge(model)
    except qadapt.QadaptError as exc:
        merge, merge_reason = "refused", f"{exc.reason}. {exc.hint}"
    path = os.path.join(tmp, f"{name}-out")
    qadapt.save(model, path)
    reloaded = qadapt.load(path)
    reloaded.eval()
    with torch.no_grad():
        reload_error = (reloaded(input_ids=held_out).logits - before_merge).abs().max().item()
    return {"backend": name, "status": "ok", "loss_before": loss_before, "loss_after": loss_after,
            "weight_mb": memory / 2**20, "merge_error": merge, "merge_reason": merge_reason,
            "reload_max_diff": reload_error}


def _table(rows) -> str:
    """The rows as a table; every long text (a refusal, a note, why a backend is unavailable) as a numbered note below
    it, so the columns stay readable."""
    width = max([len("backend")] + [len(r["backend"]) for r in rows])
    header = (f"{'backend':<{width}} {'loss before':>11} {'loss after':>10} {'weights MB':>10} {'merge error':>11} "
              f"{'reload diff':>11} {'s':>5}  status")
    lines, notes = [header, "-" * len(header)], []

    def note(text: str) -> str:
        notes.append(text)
        return f"[{len(notes)}]"

    for r in rows:
        seconds = f"{r['seconds']:>5.1f}" if "seconds" in r else f"{'-':>5}"
        if r["status"] == "ok":
            merge = r["merge_error"]
            if merge.startswith("refused"):
                merge = f"refused {note(r['backend'] + ' merge: ' + r['merge_reason'])}"
            status = "ok" + (f" {note(r['backend'] + ': ' + r['note'])}" if r.get("note") else "")
            lines.append(f"{r['backend']:<{width}} {r['loss_before']:>11.3f} {r['loss_after']:>10.3f} "
                         f"{r['weight_mb']:>10.2f} {merge:>11} {r['reload_max_diff']:>11.1e} {seconds}  {status}")
        else:
            kind, _, why = r["status"].partition(": ")
            hint = f" {r['hint']}" if r.get("hint") else ""
            lines.append(f"{r['backend']:<{width}} {'':>11} {'':>10} {'':>10} {'':>11} {'':>11} {seconds}  "
                         f"{kind} {note(r['backend'] + ': ' + why + hint)}")
    return "\n".join(lines + [""] + [f"[{i}] {text}" for i, text in enumerate(notes, 1)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(demo())
