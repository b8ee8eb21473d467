"""What every stage does around its work: a user error prints one line naming the input and the fix."""

from __future__ import annotations

import sys
from collections.abc import Callable

from duel.errors import DuelError


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); a user error prints one line naming the input and the fix, and exits 1."""
    try:
        main()
    except DuelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
