"""The ``qadapt`` command. Each verb is one module of this package with ``add_parser(commands)`` and ``run(args)``,
a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib
import sys

#: the verbs, in the order ``qadapt --help`` lists them
VERBS = ("backends", "matrix", "doctor", "demo")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qadapt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {verb: importlib.import_module(f"{__name__}.{verb}") for verb in VERBS}
    for module in modules.values():
        module.add_parser(commands)
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
