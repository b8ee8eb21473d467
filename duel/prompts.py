"""Prompt template, verbalizer and truncation: the review's start is kept and the answer always fits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from duel.params import DataParams


class PromptError(ValueError):
    """The prompt or verbalizer does not work with a tokenizer."""


@dataclass(frozen=True)
class Verbalizer:
    token_ids: tuple[int, int]
    """token_ids[label]: the single token that answers for that label."""


def verbalizer(tokenizer: PreTrainedTokenizerBase, params: DataParams, model_key: str) -> Verbalizer:
    """The token each label word becomes right after the prompt (tokenizers treat a leading space differently)."""
    prompt = params.prompt.format(review="A film.")
    prompt_ids = tokenizer(prompt).input_ids
    ids = []
    for word in params.label_words:
        full = tokenizer(prompt + word).input_ids
        if full[: len(prompt_ids)] != prompt_ids or len(full) != len(prompt_ids) + 1:
            raise PromptError(
                f"data.label_words: {word!r} is not one token after the prompt for models.{model_key}; "
                "choose a word that is one token for every model (e.g. ' positive')"
            )
        ids.append(full[-1])
    return Verbalizer((ids[0], ids[1]))


def build_prompts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, params: DataParams
) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of each prompt (with BOS, without the answer), at most max_length - 1 long so the answer fits.

    A review too long is cut at a token boundary of the review alone, then the template is put around it; the
    template's own tokens are never cut. Returns the ids and which reviews were cut.
    """
    budget = params.max_length - 1  # one position for the answer token
    overhead = len(tokenizer(params.prompt.format(review=""), add_special_tokens=True).input_ids)
    if overhead + 8 > budget:
        raise PromptError(
            f"data.max_length: {params.max_length} leaves no room for the review after the {overhead}-token prompt; "
            "raise it or shorten data.prompt"
        )
    reviews = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    truncated = np.zeros(len(texts), dtype=bool)
    kept = list(texts)
    room = budget - overhead
    for i, offsets in enumerate(reviews["offset_mapping"]):
        if len(offsets) > room:
            kept[i] = texts[i][: offsets[room - 1][1]]
            truncated[i] = True
    ids = tokenizer([params.prompt.format(review=t) for t in kept], add_special_tokens=True).input_ids
    # Tokens can merge across the template boundary, so a cut prompt may still be a token or two long: cut more.
    for i in np.flatnonzero([len(x) > budget for x in ids]):
        cut = room
        while len(ids[i]) > budget:
            cut -= len(ids[i]) - budget
            offsets = reviews["offset_mapping"][i]
            kept[i] = texts[i][: offsets[cut - 1][1]]
            ids[i] = tokenizer(params.prompt.format(review=kept[i]), add_special_tokens=True).input_ids
        truncated[i] = True
    return ids, truncated


def tokenize_split(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, params: DataParams
) -> tuple[pd.DataFrame, dict[str, float]]:
    ids, truncated = build_prompts(frame["text"].tolist(), tokenizer, params)
    lengths = np.array([len(x) for x in ids])
    out = pd.DataFrame(
        {"input_ids": ids, "label": frame["label"].to_numpy(), "n_tokens": lengths, "truncated": truncated}
    )
    stats = {
        "reviews": len(out),
        "truncated_share": round(float(truncated.mean()), 4),
        "tokens_mean": round(float(lengths.mean()), 1),
        "tokens_p50": int(np.percentile(lengths, 50)),
        "tokens_p95": int(np.percentile(lengths, 95)),
        "tokens_max": int(lengths.max()),
    }
    return out, stats
