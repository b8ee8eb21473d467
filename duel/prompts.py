"""Prompt template, verbalizer and truncation: the review's start is kept and the answer always fits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from duel.errors import PromptError
from duel.params import DataParams


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

    Each prompt is tokenized whole once; only a prompt too long is cut: its review at a token boundary of the review
    alone, then the template put around it again (the template's own tokens are never cut). Returns the ids and which
    reviews were cut.
    """
    budget = params.max_length - 1  # one position for the answer token
    overhead = len(tokenizer(params.prompt.format(review=""), add_special_tokens=True).input_ids)
    if overhead + 8 > budget:
        raise PromptError(
            f"data.max_length: {params.max_length} leaves no room for the review after the {overhead}-token prompt; "
            "raise it or shorten data.prompt"
        )
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: ids without building a Python dict per review
    ids = [e.ids for e in backend.encode_batch([params.prompt.format(review=t) for t in texts])]
    long = [i for i, row in enumerate(ids) if len(row) > budget]
    truncated = np.zeros(len(texts), dtype=bool)
    truncated[long] = True
    reviews = backend.encode_batch([texts[i] for i in long], add_special_tokens=False)
    cut = [min(budget - overhead, len(r.offsets)) for r in reviews]
    # Tokens can merge across the template boundary, so a cut prompt may still be a token or two long: cut more.
    while long:
        kept = [texts[i][: r.offsets[c - 1][1]] for i, r, c in zip(long, reviews, cut, strict=True)]
        encoded = backend.encode_batch([params.prompt.format(review=t) for t in kept])
        over = []
        for j, (i, row) in enumerate(zip(long, encoded, strict=True)):
            ids[i] = row.ids
            if len(row.ids) > budget:
                over.append(j)
                cut[j] -= len(row.ids) - budget
        long, reviews, cut = [long[j] for j in over], [reviews[j] for j in over], [cut[j] for j in over]
    return ids, truncated


def tokenize_split(
    frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, params: DataParams
) -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per review of `frame` (review_id, text, label), in its order: its review_id and label, the prompt's
    token ids, their number and whether the review was cut; and the split's length statistics."""
    ids, truncated = build_prompts(frame["text"].tolist(), tokenizer, params)
    lengths = np.array([len(x) for x in ids])
    out = pd.DataFrame(
        {
            "review_id": frame["review_id"].to_numpy(),
            "input_ids": ids,
            "label": frame["label"].to_numpy(),
            "n_tokens": lengths,
            "truncated": truncated,
        }
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
