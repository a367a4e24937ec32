"""``python -m clbench.perf``: the same as ``clbench perf``, with every option of the package."""
import argparse
import sys

from clbench.errors import UsageError
from clbench.perf import run_perf
from clbench.perf.options import add_arguments


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m clbench.perf",
                                                   description=__doc__.splitlines()[0]))
    try:
        return run_perf(parser.parse_args(argv))
    except UsageError as exc:
        print(f"clbench perf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
