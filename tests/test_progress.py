"""Slow steps say so, fast ones stay quiet (qadapt.progress)."""

from __future__ import annotations

import time

from qadapt import progress


def test_a_fast_step_prints_nothing(capsys, monkeypatch):
    monkeypatch.delenv("QADAPT_PROGRESS", raising=False)
    with progress.step("quick", total=3) as step:
        for i in range(3):
            step.advance(f"layer {i}")
    assert capsys.readouterr().err == ""


def test_a_slow_step_prints_updates_with_elapsed_time_and_done(capsys, monkeypatch):
    monkeypatch.delenv("QADAPT_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "AFTER_SECONDS", 0.0)
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    with progress.step("merge 'lora' (requantize)", total=2) as step:
        step.advance("model.layers.0.mlp.up_proj")
        step.advance("model.layers.1.mlp.up_proj")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("qadapt: merge 'lora' (requantize): 1/2 model.layers.0.mlp.up_proj (") and lines[0].endswith(" s)")
    assert lines[-1].startswith("qadapt: merge 'lora' (requantize): done (")


def test_heartbeat_for_steps_without_updates_and_the_off_switch(capsys, monkeypatch):
    monkeypatch.delenv("QADAPT_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "AFTER_SECONDS", 0.01)
    monkeypatch.setattr(progress, "HEARTBEAT_SECONDS", 0.01)
    with progress.step("quantize with gptq (calibrating)", heartbeat=True):
        time.sleep(0.1)
    err = capsys.readouterr().err
    assert "quantize with gptq (calibrating): still running" in err and "done" in err
    monkeypatch.setenv("QADAPT_PROGRESS", "0")
    with progress.step("quantize", heartbeat=True):
        time.sleep(0.05)
    assert capsys.readouterr().err == ""
