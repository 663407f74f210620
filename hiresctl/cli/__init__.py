"""The ``hiresctl`` command line: parse, call the library, print.

Progress and tables go to stderr (rich); ``--json`` results go to stdout. Exit codes: 0 all done,
1 some inputs failed (each named with the reason), 2 usage error.
"""

from hiresctl.cli.app import app, main

__all__ = ["app", "main"]
