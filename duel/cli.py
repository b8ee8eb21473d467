"""What every stage does around its work: one-line errors for bad input, and the models' keys."""

from __future__ import annotations

import sys
from collections.abc import Callable

from duel.data import DataError
from duel.evaluation import EvaluationError
from duel.modeling import ModelError
from duel.params import ParamsError
from duel.prompts import PromptError
from duel.training import TrainingError

USER_ERRORS = (ParamsError, DataError, ModelError, PromptError, TrainingError, EvaluationError)


def run(main: Callable[[], None]) -> None:
    """Run a stage's main(); a user error prints one line naming the input and the fix, and exits 1."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
