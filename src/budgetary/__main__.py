"""``python -m budgetary``: the same as the ``budgetary`` command (see `budgetary.cli`)."""

import sys

from budgetary.cli import main

if __name__ == "__main__":
    sys.exit(main())
