"""Test sessions and the compatibility matrix.

    nox -s tests            the default suite (bnb, hqq, torchao, the example plugin): what README's test command runs
    nox -t ci               everything CI runs: tests + each backend alone in its own environment
    nox -t backends         each backend extra alone: nox -s "backend(gptq)"
    nox -t compat           the oldest and newest supported PEFT x transformers pairs
    nox -s distributed      the heavier multi-process runs (torchrun, DeepSpeed ZeRO-3, accelerate, memory per rank)
    nox -s demo             set up and run `qadapt demo` (bnb, hqq, torchao); nox -s demo-all: every backend
    nox -s matrix           `qadapt matrix --verify` per backend environment -> docs/compatibility.md
    nox -t panel            the architecture panel per backend environment -> docs/architectures.md (not in ci)
    nox -s bench_attach     attach overhead with every backend installed vs plain PEFT with none
    nox -s properties       the property-based contract tests with the long hypothesis profile (not in CI)

Every environment installs the tested torch (constraints.txt) before anything else: unpinned, pip pulls a CUDA build.
"""

from __future__ import annotations

import os

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: nox itself depends on tomli there
    import tomli as tomllib

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

CONSTRAINTS = ("-c", "constraints.txt")
TORCH = "torch==2.13.0"
EXAMPLE_PLUGIN = "examples/qadapt-rowwise-int8"
with open(os.path.join(os.path.dirname(__file__), "pyproject.toml"), "rb") as _handle:
    _PROJECT = tomllib.load(_handle)["project"]
#: the built-in backends: pyproject's entry points, each installed by the extra of its own name
BACKENDS = list(_PROJECT["entry-points"]["qadapt"])
#: what the default suite installs besides the core (the other backends run in their own sessions)
DEFAULT_SUITE = ("bnb", "hqq", "torchao")
#: (peft, transformers): the oldest supported pair (pyproject's lower bounds) and the newest tested.
COMPAT = [("0.19.0", "5.4.0"), ("0.21.2", "5.23.0")]
ENV = {"GPTQMODEL_CPU_WORKERS": "2", "TOKENIZERS_PARALLELISM": "false"}


def install(session, *extras, constraints=True):
    session.install(TORCH)
    spec = f".[{','.join(('test',) + extras)}]"
    session.install("-e", spec, *(CONSTRAINTS if constraints else ()))


def pytest(session, *args):
    # -rs: every skip with its reason (a backend that cannot run here says why); --durations: where the time goes
    session.run("pytest", "-q", "-rs", "--durations=15", "-p", "no:cacheprovider", *args, *session.posargs, env=ENV)
    _drop_environment_on_ci(session)


def _drop_environment_on_ci(session):
    """On CI (.ci/run sets QADAPT_DROP_ENVIRONMENTS=1) every environment is new and used once: remove it when its
    session is done, so the disk holds one at a time (about 1.5 GB with torch) rather than all of them (14 GB seen)."""
    if os.environ.get("QADAPT_DROP_ENVIRONMENTS") and os.path.isdir(session.virtualenv.location or ""):
        import shutil

        shutil.rmtree(session.virtualenv.location, ignore_errors=True)


@nox.session(tags=["ci"])
def tests(session):
    """The default suite: core, bnb, hqq, torchao and the example third-party plugin."""
    install(session, *DEFAULT_SUITE)
    session.install("-e", EXAMPLE_PLUGIN, "--no-deps")
    others = [f"--ignore-glob=tests/test_{name}.py" for name in BACKENDS if name not in DEFAULT_SUITE]
    pytest(session, "tests", "-m", "not gpu and not distributed", *others)


@nox.session(tags=["distributed"])
def distributed(session):
    """The heavier multi-process runs (torchrun, DeepSpeed ZeRO-3, accelerate, memory per rank): tests marked
    `distributed`, with bnb, hqq and torchao; DeepSpeed comes from the `deepspeed` extra (it builds its communication
    op with ninja once)."""
    install(session, "bnb", "hqq", "torchao", "deepspeed")
    pytest(session, "tests", "-m", "distributed and not gpu")


@nox.session(tags=["backends", "ci"])
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def backend(session, backend):
    """One backend's extra alone in its own environment: its tests and its capability table."""
    install(session, backend)
    tests_file = f"tests/test_{backend}.py"
    selection = [tests_file] if os.path.exists(tests_file) else []
    pytest(session, *selection, "tests/test_capabilities.py", "-k", backend, "-m", "not gpu")


@nox.session(tags=["compat"])
@nox.parametrize("peft,transformers", COMPAT, ids=[f"peft{p}-tf{t}" for p, t in COMPAT])
def compat(session, peft, transformers):
    """The core suite against one PEFT x transformers pair (with bnb, hqq, torchao)."""
    session.install(TORCH)
    session.install(f"peft=={peft}", f"transformers=={transformers}", "-c", "constraints-compat.txt")
    session.install("-e", ".[test,bnb,hqq,torchao]", "-c", "constraints-compat.txt")
    session.run("python", "-c", "import peft, transformers; print('peft', peft.__version__, 'transformers', transformers.__version__)")
    # the result is recorded for docs/compatibility.md (docs/matrix/compat-*.json); the session fails if a test did
    junit = os.path.join(session.create_tmp(), "junit.xml")
    session.run("pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests/test_capabilities.py",
                "tests/test_workflow.py", "tests/test_bad_input.py", *session.posargs, env=ENV, success_codes=[0, 1])
    session.run("python", "tools/compat_docs.py", "docs/matrix", f"compat-peft{peft}-tf{transformers}.json",
                "--record-pair", junit, "--command", f'nox -s "compat(peft{peft}-tf{transformers})"')


@nox.session(tags=["properties"])
def properties(session):
    """tests/test_properties.py with hypothesis' long profile (1,500 examples a property, about 15 minutes on 2 cores);
    CI runs the bounded profile inside `tests`."""
    install(session, *DEFAULT_SUITE)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/test_properties.py", *session.posargs,
                env={**ENV, "QADAPT_HYPOTHESIS_PROFILE": "long"})


@nox.session
def demo(session):
    """Set up and run the offline demo (bnb, hqq, torchao)."""
    install(session, *DEFAULT_SUITE)
    session.run("qadapt", "demo", env=ENV)


@nox.session(name="demo-all")
def demo_all(session):
    """The offline demo with every backend that installs here."""
    install(session, "all")
    session.run("qadapt", "demo", env=ENV)


@nox.session(tags=["matrix"])
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def matrix(session, backend):
    """`qadapt matrix --verify` for one backend in its own environment; writes docs/matrix/<backend>-cpu.json."""
    install(session, backend)
    os.makedirs("docs/matrix", exist_ok=True)
    session.run("qadapt", "matrix", "--verify", "--backend", backend, "--output", f"docs/matrix/{backend}-cpu.json",
                env=ENV, success_codes=[0, 1])


@nox.session(tags=["panel"])
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def panel(session, backend):
    """The conformance kit on every architecture of the panel (qadapt.testing.panel) for one backend in its own
    environment; writes docs/matrix/panel/<backend>-cpu.json (about 2-4 minutes a backend on 2 cores; gptq far
    longer: it quantizes with calibration for every cell)."""
    install(session, backend)
    os.makedirs("docs/matrix/panel", exist_ok=True)
    session.run("qadapt", "matrix", "--verify", "--backend", backend, "--architecture", "all", "--output",
                f"docs/matrix/panel/{backend}-cpu.json", env=ENV, success_codes=[0, 1])


@nox.session(name="panel-docs")
def panel_docs(session):
    """Render docs/architectures.md from the recorded panel runs in docs/matrix/panel/."""
    session.install(TORCH)
    session.install("-e", ".", *CONSTRAINTS)
    session.run("python", "tools/panel_docs.py", "docs/matrix/panel", "docs/architectures.md")


@nox.session(name="matrix-docs")
def matrix_docs(session):
    """Render docs/compatibility.md from the recorded runs in docs/matrix/."""
    session.install(TORCH)
    session.install("-e", ".", *CONSTRAINTS)
    session.run("python", "tools/compat_docs.py", "docs/matrix", "docs/compatibility.md")


@nox.session(name="bench_attach")
def bench_attach(session):
    """Attach overhead: qadapt with every backend installed vs peft.get_peft_model with none (two environments)."""
    session.install(TORCH)
    session.install("-e", ".[all]", "optimum", *CONSTRAINTS)
    plain = os.path.join(session.create_tmp(), "plain")
    session.run("python", "-m", "venv", plain, external=True)
    pip = os.path.join(plain, "bin", "pip")
    session.run(pip, "install", "-q", TORCH, external=True)
    session.run(pip, "install", "-q", "-e", ".", *CONSTRAINTS, external=True)
    session.run("python", "bench/attach_overhead.py", "--plain-python", os.path.join(plain, "bin", "python"), env=ENV)
