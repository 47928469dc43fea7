"""The ``qadapt`` command. Each verb is one module of this package with ``add_parser(commands)`` and ``run(args)``,
a thin layer over the Python API. A refusal prints qadapt's error (as JSON with ``--json``) and exits with 2; a
check that found problems exits with 1."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

#: the verbs, in the order ``qadapt --help`` lists them
VERBS = ("quantize", "inspect", "merge", "export", "plan", "backends", "matrix", "doctor", "demo")

DESCRIPTION = """Quantize a causal LM with any backend, train PEFT adapters on it, merge and ship it.

The whole job from the command line: quantize a model folder, inspect what a folder or checkpoint holds, merge a
trained checkpoint's adapter, export it for shipping, plan the memory a training run needs per GPU; and the state of
this machine: backends, the capability matrix, doctor, an offline demo. Run `qadapt VERB --help` for a verb's
options."""

#: exit status of a refusal (a QadaptError): what was asked cannot be done, and nothing was changed
REFUSED = 2


def main(argv=None) -> int:
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="qadapt", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qadapt {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show the backend libraries' own messages (same as QADAPT_VERBOSE=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    modules = {verb: importlib.import_module(f"{__name__}.{verb}") for verb in VERBS}
    for module in modules.values():
        module.add_parser(commands)
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["QADAPT_VERBOSE"] = "1"
    from ..errors import QadaptError
    from ..plugins import quiet_libraries

    quiet_libraries()
    try:
        return modules[args.command].run(args)
    except QadaptError as error:
        if getattr(args, "json", False):
            print_json(error.to_dict())
        print(f"qadapt {args.command}: {error}", file=sys.stderr)
        return REFUSED


def parse_options(pairs) -> dict:
    """``["bits=4", "quant_type=nf4"]`` -> ``{"bits": 4, "quant_type": "nf4"}``: values are read as JSON where they
    are JSON (numbers, true/false, lists), else kept as text."""
    from ..errors import InvalidOptionError

    options = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidOptionError(f"option {pair!r}", "options are NAME=VALUE", "Pass e.g. -o bits=4")
        try:
            options[name] = json.loads(value)
        except ValueError:
            options[name] = value
    return options


def check_backend_names(names) -> None:
    """Refuse names that no plugin registers (with the list), before any work."""
    if not names:
        return
    from ..plugins import get_backend

    for name in names:
        get_backend(name)


def read_calibration(path, tokenizer_from: str, samples: int = 128):
    """The paragraphs of a text file (blank-line separated, up to ``samples``) and a tokenizer for them: the model
    folder's own (local files only), which a calibrated backend needs to turn them into token ids."""
    from ..errors import InvalidOptionError

    if path is None:
        return None, None
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise InvalidOptionError(f"--calibration {path!r}", f"cannot read it ({exc})", "Pass a UTF-8 text file") from exc
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()][:samples]
    if not paragraphs:
        raise InvalidOptionError(f"--calibration {path!r}", "the file holds no text", "Pass text like the training data")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from, local_files_only=True)
    except Exception as exc:
        raise InvalidOptionError(f"--calibration {path!r}", f"no tokenizer in {tokenizer_from!r} to read it with ({exc})",
                                 "Save the model's tokenizer in its folder") from exc
    return paragraphs, tokenizer


def print_json(data) -> None:
    try:
        json.dump(data, sys.stdout, indent=2, default=str)
        print()
    except BrokenPipeError:  # `qadapt ... --json | head`: the reader has what it wanted
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
