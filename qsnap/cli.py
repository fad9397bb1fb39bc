"""Command line: argument parsing and error reporting only."""
import sys


def main(argv=None):
    print("qsnap: error: not built yet", file=sys.stderr)
    return 1
