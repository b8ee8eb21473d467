"""The errors a user can cause, one class per concern under one base: a stage catches DuelError and prints its
one-line message. Kept free of heavy imports, so that catching them costs a stage nothing."""


class DuelError(Exception):
    """A problem with the user's input or machine; the message names the input and the fix."""


class ParamsError(DuelError, ValueError):
    """A bad value in params.yaml; the message names the key and the fix."""


class DataError(DuelError, ValueError):
    """A data source that cannot be used; the message names it and the fix."""


class ModelError(DuelError, ValueError):
    """A model that cannot be resolved or loaded; the message names it and the fix."""


class PromptError(DuelError, ValueError):
    """A prompt or verbalizer that cannot work with a tokenizer."""


class TrainingError(DuelError, RuntimeError):
    """Training cannot go on; the message says what happened and what to change."""


class EvaluationError(DuelError, RuntimeError):
    """Scoring cannot go on; the message says what happened and what to change."""
