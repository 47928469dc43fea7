"""README.md runs as written: every ```python block, in order, in one namespace, in a fresh folder; every command of
the command-line block that runs in seconds; and the install and test commands it gives are the ones the project
uses (noxfile, .ci/run)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from .conftest import backend_ready

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    for name in ("bnb", "hqq", "torchao"):
        backend_ready(name)
    code = blocks("python")
    assert code, "README has no python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(code):
        try:
            exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as exc:  # say which block, with the block
            raise AssertionError(f"README python block {index + 1} failed: {type(exc).__name__}: {exc}\n{block}") from exc


def _commands(block: str) -> list[list[str]]:
    found = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found.append(shlex.split(line))
    return found


def test_readme_cli_block_runs(tmp_path):
    """The listed `qadapt` commands that finish in seconds run and succeed (demo runs in test_demo.py)."""
    cli = [b for b in blocks("bash") if "qadapt backends" in b]
    assert cli, "README has no command-line block"
    quick = {"backends", "matrix", "doctor"}
    ran = 0
    for argv in _commands(cli[0]):
        if argv[0] != "qadapt" or argv[1] not in quick or "--verify" in argv:
            continue
        argv = [a for a in argv if not a.startswith("[")]
        result = subprocess.run([sys.executable, "-m", "qadapt", *argv[1:]], capture_output=True, text=True,
                                cwd=tmp_path, timeout=300, env={**os.environ, "QADAPT_PROGRESS": "0"})
        assert result.returncode == 0, (argv, result.stderr[-2000:])
        ran += 1
    assert ran >= 3


def test_readme_commands_are_the_projects_own():
    first = blocks("bash")[0]
    assert 'python3 -m nox -s demo' in first and 'python3 -m nox -t ci' in first
    assert "nox -t ci" in (ROOT / ".ci" / "run").read_text()
    assert "def demo(" in (ROOT / "noxfile.py").read_text()
    install = [b for b in blocks("bash") if "pip install -e" in b]
    assert install and "torch==2.13.0" in install[0] and "constraints.txt" in install[0]
    assert "pip install 'qadapt[" not in README and 'pip install "qadapt[' not in README  # another project's name
