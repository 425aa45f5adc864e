"""Command line: ``fastdiff info | sample | lipschitz | train | bench``.

Each subcommand is one ``_add_<name>`` function that declares its arguments and one
``_run_<name>`` function that runs it; heavy imports happen inside the run function so
``fastdiff --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys


def _add_info(sub):
    p = sub.add_parser("info", help="backends, versions, and a self-check of every op")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from .selfcheck import selfcheck
    import fastdiff
    print(json.dumps({"fastdiff": fastdiff.__version__, **fastdiff.backends()}, indent=2))
    ok = selfcheck(verbose=True)
    return 0 if ok else 1


COMMANDS = [_add_info]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        # The main job with no arguments: sample the embedded default model.
        args = parser.parse_args(["sample"] if "sample" in sub.choices else ["info"])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
