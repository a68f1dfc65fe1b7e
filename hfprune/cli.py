"""`hfprune <command>`: one module per command in hfprune/commands/, each with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hfprune import timing
from hfprune.errors import HFPruneError

# command name -> module in hfprune.commands (adding a command = one module + one line here)
COMMANDS = {
    "validate": "validate",
    "assets": "assets",
    "score": "score",
    "plan": "plan",
    "prune": "prune",
    "recover": "recover",
    "evaluate": "evaluate",
    "report": "report",
    "compare": "compare",
    "estimate": "estimate",
    "sync": "sync",
    "ui": "ui",
    "prefetch": "prefetch",
}
# commands that compute with torch: their thread pools follow --threads (a plan job never imports torch)
TORCH_COMMANDS = ("score", "prune", "recover", "evaluate")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser. Only the command named in `argv` is imported and gets its arguments (a job imports what
    it uses); without a known command (e.g. `hfprune --help`) every command module is imported for its help."""
    parser = argparse.ArgumentParser(prog="hfprune", description=__doc__.split(":")[0] + ": structured pruning grid")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help="torch intra- and inter-op threads of score, prune, recover and "
                        "evaluate (default: the cores this process may use; a Snakemake job passes its rule's threads)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")
                   and not a.isdigit()), None)  # the command: not an option nor --threads' value
    for name, module in COMMANDS.items():
        if chosen in COMMANDS and name != chosen:
            sub.add_parser(name)  # never parsed in this process: its module is not imported
            continue
        mod = importlib.import_module(f"hfprune.commands.{module}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    timing.mark_startup()
    try:
        if args.command in TORCH_COMMANDS:
            from hfprune.resources import configure_threads

            configure_threads(args.threads)
        return args._run(args) or 0
    except HFPruneError as exc:
        print(f"hfprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
