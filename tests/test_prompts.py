"""Prompts with both real tokenizers: the review's start is kept, the template is never cut, the answer fits."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
from conftest import IMDB

from duel.prompts import PromptError, build_prompts, tokenize_split, verbalizer

MODELS = ["llama", "deepseek"]
MAX_LENGTH = 64

SHORT = "A fine film."
LONG = (
    "Brilliantly acted and beautifully shot, this film kept me on the edge of my seat from start to finish. "
    "The story unfolds slowly, with patience, and every scene earns its place. " * 6
)
# Texts that stress the cut: no spaces, newlines, non-ASCII, a trailing space, HTML breaks as in IMDB.
AWKWARD = [
    "x" * 400,
    "Great.\n\n" * 60,
    "Très bien — 非常好的电影！ " * 30,
    "ok ",
    "One line.<br /><br />Another line. " * 30,
    "Sentiment: positive. " * 40,
]


@pytest.fixture(scope="module")
def imdb_texts() -> list[str]:
    """The first 200 reviews of the IMDB mirror (all lengths), or the built-in texts when it is absent."""
    if not (IMDB / "test.parquet").exists():
        return [SHORT, LONG, *AWKWARD]
    return pd.read_parquet(IMDB / "test.parquet")["text"].head(200).tolist()


@pytest.fixture
def data(params):
    return dataclasses.replace(params.data, max_length=MAX_LENGTH)


def suffix_ids(tokenizer, data) -> list[int]:
    """Token ids of the template after {review} ("\\nSentiment:"), as they come out in a real prompt."""
    prompt = data.prompt.format(review=SHORT)
    start = prompt.index(SHORT) + len(SHORT)
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    return [i for i, (s, _) in zip(encoded.input_ids, encoded.offset_mapping, strict=True) if s >= start]


@pytest.mark.parametrize("model", MODELS)
def test_prompts_fit_and_end_with_template(tokenizers, data, imdb_texts, model):
    tokenizer = tokenizers[model]
    texts = [SHORT, LONG, *AWKWARD, *imdb_texts]
    ids, truncated = build_prompts(texts, tokenizer, data)
    tail = suffix_ids(tokenizer, data)
    assert len(tail) >= 2
    assert len(ids) == len(texts) == len(truncated)
    for row, text in zip(ids, texts, strict=True):
        assert len(row) <= MAX_LENGTH - 1, text[:40]
        assert row[0] == tokenizer.bos_token_id
        assert row.count(tokenizer.bos_token_id) == 1
        assert row[-len(tail) :] == tail, text[:40]
        assert tokenizer.decode(row, skip_special_tokens=True).endswith("\nSentiment:")
    assert truncated.dtype == bool
    assert truncated[1] and not truncated[0]


@pytest.mark.parametrize("model", MODELS)
def test_long_review_keeps_its_start(tokenizers, data, model):
    tokenizer = tokenizers[model]
    (short_ids, long_ids), truncated = build_prompts([SHORT, LONG], tokenizer, data)
    assert truncated.tolist() == [False, True]
    long_text = tokenizer.decode(long_ids, skip_special_tokens=True)
    assert long_text.startswith("Review: Brilliantly acted and beautifully shot, this film")
    assert "edge of my seat" in long_text
    kept = long_text.removeprefix("Review: ").removesuffix("\nSentiment:")
    assert LONG.startswith(kept) and 0 < len(kept) < len(LONG)
    # A cut review uses (nearly) the whole budget; the cut is at most a few tokens early.
    assert len(long_ids) >= MAX_LENGTH - 1 - 3
    # A short review goes in whole: exactly the template around it.
    assert short_ids == tokenizer(data.prompt.format(review=SHORT)).input_ids
    assert tokenizer.decode(short_ids, skip_special_tokens=True) == f"Review: {SHORT}\nSentiment:"


@pytest.mark.parametrize("model", MODELS)
def test_truncated_flags_match_lengths(tokenizers, data, imdb_texts, model):
    tokenizer = tokenizers[model]
    ids, truncated = build_prompts(imdb_texts, tokenizer, data)
    for row, text, cut in zip(ids, imdb_texts, truncated, strict=True):
        whole = tokenizer(data.prompt.format(review=text)).input_ids
        assert cut == (len(whole) > MAX_LENGTH - 1)
        if not cut:
            assert row == whole


@pytest.mark.parametrize("model", MODELS)
def test_no_room_for_review(tokenizers, data, model):
    with pytest.raises(PromptError, match=r"data\.max_length"):
        build_prompts([SHORT], tokenizers[model], dataclasses.replace(data, max_length=8))


@pytest.mark.parametrize("model", MODELS)
def test_verbalizer_one_token_per_word(tokenizers, data, model):
    tokenizer = tokenizers[model]
    answer = verbalizer(tokenizer, data, model)
    negative, positive = answer.token_ids
    assert negative != positive
    for token_id, word in zip(answer.token_ids, data.label_words, strict=True):
        assert tokenizer.decode([token_id]).strip() == word.strip()
        # The answer token is what follows the prompt when the word is written after it.
        prompt = tokenizer(data.prompt.format(review=SHORT)).input_ids
        assert tokenizer(data.prompt.format(review=SHORT) + word).input_ids == [*prompt, token_id]


@pytest.mark.parametrize("model", MODELS)
def test_verbalizer_rejects_multi_token_word(tokenizers, data, model):
    bad = dataclasses.replace(data, label_words=[" negative", " absolutely-wonderful"])
    with pytest.raises(PromptError) as err:
        verbalizer(tokenizers[model], bad, model)
    assert "absolutely-wonderful" in str(err.value) and f"models.{model}" in str(err.value)


@pytest.mark.parametrize("model", MODELS)
def test_tokenize_split_stats(tokenizers, data, model):
    texts = [SHORT, LONG, "Bad.", LONG + " Worse."]
    frame = pd.DataFrame({"review_id": ["test-7", "test-3", "test-12", "test-0"], "text": texts, "label": [1, 1, 0, 0]})
    out, stats = tokenize_split(frame, tokenizers[model], data)
    assert list(out.columns) == ["review_id", "input_ids", "label", "n_tokens", "truncated"]
    assert out["review_id"].tolist() == ["test-7", "test-3", "test-12", "test-0"]  # each review keeps its id
    assert out["label"].tolist() == [1, 1, 0, 0]
    assert out["truncated"].tolist() == [False, True, False, True]
    assert out["n_tokens"].tolist() == [len(x) for x in out["input_ids"]]
    assert stats["reviews"] == 4
    assert stats["truncated_share"] == 0.5
    assert 0 < stats["tokens_p50"] <= stats["tokens_p95"] <= stats["tokens_max"] <= MAX_LENGTH - 1
    assert stats["tokens_max"] == out["n_tokens"].max()
    assert stats["tokens_mean"] == pytest.approx(out["n_tokens"].mean(), abs=0.05)


@pytest.mark.parametrize("model", MODELS)
def test_tokenize_split_share_bounds(tokenizers, data, imdb_texts, model):
    ids = [f"test-{i}" for i in range(len(imdb_texts))]
    frame = pd.DataFrame({"review_id": ids, "text": imdb_texts, "label": [i % 2 for i in range(len(imdb_texts))]})
    _, stats = tokenize_split(frame, tokenizers[model], data)
    assert 0.0 <= stats["truncated_share"] <= 1.0
    _, roomy = tokenize_split(frame, tokenizers[model], dataclasses.replace(data, max_length=4096))
    assert roomy["truncated_share"] <= stats["truncated_share"]


@pytest.mark.parametrize("text", ["Hello world", "Review: A film.\nSentiment: positive", "  two  spaces, tabs\tand é"])
def test_deepseek_keeps_spaces(tokenizers, text):
    """Regression: transformers 5's AutoTokenizer gave DeepSeek-LLM Llama's Metaspace pre-tokenizer, which dropped
    every space ("Hello world" -> "H", "ellow", "orld"). Loading tokenizer.json directly keeps them."""
    tokenizer = tokenizers["deepseek"]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    if text == "Hello world":
        assert tokenizer.convert_ids_to_tokens(ids) == ["Hello", "Ġworld"]


def test_deepseek_tokenizer_resolves_without_the_mistral_regex_warning(tokenizers, params, tmp_path, monkeypatch):
    """The offline hub copy's DeepSeek-LLM config.json names no transformers version, which transformers 5 takes
    for a Mistral tokenizer with a broken pre-tokenizer regex: it warns "This will lead to incorrect tokenization".
    DeepSeek-LLM is a llama model, and resolve_model says so: no warning, and the tokens of the tokenizer file."""
    import transformers.tokenization_utils_tokenizers as loading
    from transformers import PreTrainedTokenizerFast

    from duel.hub import load_tokenizer, resolve_model

    warned: list[str] = []
    monkeypatch.setattr(loading.logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    tiny = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
    model = dataclasses.replace(params.model("deepseek"), init="random", overrides=tiny | {"num_key_value_heads": 4})
    resolve_model("deepseek", model, 0, tmp_path / "base")
    assert not [message for message in warned if "incorrect regex" in message]
    text = "Review: Très bien, 10/10 -- a film!\nSentiment:"
    assert load_tokenizer(tmp_path / "base")(text).input_ids == tokenizers["deepseek"](text).input_ids
    PreTrainedTokenizerFast.from_pretrained(model.checkpoint)  # the control: loaded without saying, it warns
    assert [message for message in warned if "incorrect regex" in message]
