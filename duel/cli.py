"""What every stage does around its work: a user error prints one line naming the input and the fix; an unexpected
error prints one line saying where its full trace was written."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from duel.errors import DuelError

TRACES = Path(".cache/tracebacks")


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); exit 1 with one line on stderr on any error."""
    try:
        main()
    except DuelError as err:
        _end_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # a bug, or a failure no check foresaw: the trace goes to a file, not the terminal
        _end_progress_bars()
        stage = Path(sys.argv[0]).stem
        trace = TRACES / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text("".join(traceback.format_exception(err)))
        first = (str(err).splitlines() or [""])[0]
        print(f"error: {stage} failed: {type(err).__name__}: {first}; the full trace is in {trace}", file=sys.stderr)
        sys.exit(1)


def _end_progress_bars() -> None:
    """End the line of a progress bar the failed step left open (the Trainer's), so that the error starts a line of
    its own instead of trailing the bar."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # the bars tqdm has open
            bar.close()
