"""The report's figures from small synthetic metrics and predictions, and the label-word loss the training logs beside
the answer-token cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.text import Text
from transformers import TrainerControl, TrainerState, TrainingArguments

from duel.figures import ModelRun, cost_figure, link, loss_figure, memory_figure, read_series, write_figures
from duel.training import IGNORE, AnswerLoss, answer_loss, label_word_loss

LABEL_WORDS = [" negative", " positive"]
NAMES = ["loss.png", "memory.png", "throughput.png", "accuracy.png", "confusion.png", "cost.png"]


def predictions(right: int, reviews: int = 40) -> pd.DataFrame:
    """Half the reviews positive; the first `right` predicted right, the rest wrong."""
    actual = np.arange(reviews) % 2
    predicted = np.where(np.arange(reviews) < right, actual, 1 - actual)
    return pd.DataFrame({"review_id": [f"test-{i}" for i in range(reviews)], "actual": actual, "predicted": predicted})


def series(values: list[float], name: str) -> pd.DataFrame:
    return pd.DataFrame({"step": range(1, len(values) + 1), name: values})


def model_run(key: str, vocab_size: int, gpu: bool, right: int, label_word: bool = True) -> ModelRun:
    energy = 5400.0 if gpu else None  # 1.5 Wh
    scoring = {
        variant: {
            "eval_reviews_per_s": 150.0 if gpu else 80.0,
            "eval_time_s": 30.0,
            "eval_energy_j": 720.0 if gpu else None,
            "eval_peak_memory_gib": 15.5 if gpu else 0.8,
        }
        for variant in ("finetuned", "zero_shot")
    }
    steps = {
        "loss": series([3.0, 1.5, 0.9, 0.6], "loss"),
        "memory_gib": series([60.0, 61.0, 61.0, 61.5] if gpu else [0.9] * 4, "memory_gib"),
    }
    if label_word:
        steps["label_word_loss"] = series([1.2, 0.5, 0.3, 0.25], "label_word_loss")
    finetune = {
        "reviews_per_s": 35.0 if gpu else 20.0,
        "train_time_s": 91.4,
        "energy_j": energy,
        "peak_memory_gib": 61.5 if gpu else 0.93,
        "device": "NVIDIA H200" if gpu else "cpu",
        "memory": "cuda_reserved" if gpu else "cpu_peak_rss",
    }
    variants = {"finetuned": predictions(right), "zero_shot": predictions(right // 2)}
    return ModelRun(key, vocab_size, not gpu, steps, finetune, scoring, variants, 0.84)


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]


@pytest.mark.parametrize("gpu", [True, False])
def test_every_figure_is_written(tmp_path, gpu):
    runs = [model_run("llama", 32_000, gpu, right=30), model_run("deepseek", 102_400, gpu, right=36)]
    written = write_figures(tmp_path / "figures", runs, LABEL_WORDS)
    assert [p.name for p in written] == NAMES
    for path in written:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000, path
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(NAMES)  # no temporary file left


def test_cost_says_energy_was_not_measured_on_cpu_and_memory_starts_at_zero():
    cpu = cost_figure([model_run("llama", 32_000, False, 30), model_run("deepseek", 102_400, False, 36)])
    assert "not measured on CPU" in texts(cpu)
    gpu = cost_figure([model_run("llama", 32_000, True, 30), model_run("deepseek", 102_400, True, 36)])
    assert "not measured on CPU" not in texts(gpu)
    assert "1.50" in texts(gpu)  # 5,400 J of training is 1.5 Wh
    for fig in (cpu, gpu, memory_figure([model_run("llama", 32_000, True, 30)])):
        memory = fig.axes[-1]  # the cost figure's last panel, the memory figure's only one
        assert memory.get_ylim()[0] == 0 and "memory" in memory.get_title().lower(), memory.get_title()


def test_cost_stacks_each_stages_start_up_beneath_its_work():
    """The time panel: each bar is the stage's start-up (hatched, labelled inside) under its work, labelled with the
    sum; metrics from before the stages timed their start-up draw the work alone, without the hatch's legend."""
    timed = model_run("llama", 32_000, True, 30)
    timed.finetune["startup_s"] = 30.0
    for variant in timed.scoring.values():
        variant["eval_startup_s"] = 20.0
    labels = [t.get_text() for t in cost_figure([timed]).axes[0].findobj(Text)]
    assert {"121.4", "30.0", "50.0", "20.0"} <= set(labels)  # 91.4 s of training after 30 s; 30 s of scoring after 20
    assert "start-up: imports, model build" in labels
    untimed = [t.get_text() for t in cost_figure([model_run("llama", 32_000, True, 30)]).axes[0].findobj(Text)]
    assert {"91.4", "30.0"} <= set(untimed) and "start-up: imports, model build" not in untimed


def test_loss_figure_names_each_vocabulary_and_says_when_the_label_word_loss_is_missing():
    runs = [model_run("llama", 32_000, True, 30), model_run("deepseek", 102_400, True, 36)]
    labels = texts(loss_figure(runs))
    assert any("vocabulary 32,000; chance ln V = 10.37" in t for t in labels)
    assert any("vocabulary 102,400; chance ln V = 11.54" in t for t in labels)
    assert "not logged by this run's fine-tunes" not in labels
    old = [model_run("llama", 32_000, True, 30, label_word=False)]
    assert "not logged by this run's fine-tunes" in texts(loss_figure(old))


def test_read_series_and_link(tmp_path):
    folder = tmp_path / "plots" / "metrics"
    folder.mkdir(parents=True)
    series([0.7, 0.5], "label_word_loss").to_csv(folder / "label_word_loss.tsv", sep="\t", index=False)
    read = read_series(tmp_path)
    assert list(read) == ["label_word_loss"] and read["label_word_loss"]["label_word_loss"].tolist() == [0.7, 0.5]
    assert link("loss.png", "training loss") == "![training loss](../plots/report/loss.png)"


# --- the label-word loss -------------------------------------------------------------------------------------------

NEGATIVE, POSITIVE = 1, 3  # token ids of the label words in a vocabulary of 5
LOGITS = torch.tensor([[0.0, 2.0, 5.0, 1.0, 0.0], [1.0, 0.5, 0.0, -1.0, 4.0]])
ANSWERS = torch.tensor([NEGATIVE, POSITIVE])


def test_label_word_loss_by_hand():
    # Review 1 answers negative: logits 2 (negative) against 1 (positive). Review 2 answers positive: -1 against 0.5.
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
    second = -math.log(math.exp(-1) / (math.exp(0.5) + math.exp(-1)))
    loss = label_word_loss(LOGITS, ANSWERS, (NEGATIVE, POSITIVE))
    assert loss.tolist() == pytest.approx([first, second], rel=1e-6)


def test_label_word_loss_ignores_a_shift_of_all_logits_and_differs_from_the_vocabulary_loss():
    loss = label_word_loss(LOGITS, ANSWERS, (NEGATIVE, POSITIVE))
    shifted = label_word_loss(LOGITS + 7.5, ANSWERS, (NEGATIVE, POSITIVE))
    torch.testing.assert_close(shifted, loss)
    vocabulary = F.cross_entropy(LOGITS, ANSWERS, reduction="none")
    assert (vocabulary > loss + 0.5).all()  # the other words' mass (logit 5 and 4) counts there, not here
    # The other words alone move the vocabulary loss and leave the label-word loss as it is.
    others = LOGITS.clone()
    others[:, [0, 2, 4]] -= 10.0
    torch.testing.assert_close(label_word_loss(others, ANSWERS, (NEGATIVE, POSITIVE)), loss)
    assert not torch.allclose(F.cross_entropy(others, ANSWERS, reduction="none"), vocabulary)


def test_answer_loss_logs_the_label_word_loss_beside_an_unchanged_training_loss(tmp_path):
    """The loss it returns (what is learned) is answer_loss's; each log line gets the mean label-word loss of the
    reviews since the previous one, and the next line starts afresh."""
    outputs = type("Outputs", (), {"logits": LOGITS[:, None, :].clone().requires_grad_()})()
    labels = torch.tensor([[IGNORE, NEGATIVE], [IGNORE, POSITIVE]])
    tracked = AnswerLoss((NEGATIVE, POSITIVE))
    loss = tracked(outputs, labels, num_items_in_batch=4)
    assert loss.item() == pytest.approx(answer_loss(outputs, labels, num_items_in_batch=4).item())
    loss.backward()
    assert outputs.logits.grad is not None  # the training loss still carries its gradient
    first = type("Outputs", (), {"logits": LOGITS[:1, None, :]})()
    tracked(first, labels[:1])  # a second micro-batch: the first review again
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    logs = {"loss": 1.0}
    tracked.on_log(args, TrainerState(), TrainerControl(), logs=logs)
    per_review = label_word_loss(LOGITS, ANSWERS, (NEGATIVE, POSITIVE)).tolist()
    expected = (2 * per_review[0] + per_review[1]) / 3
    assert logs["label_word_loss"] == pytest.approx(expected, abs=1e-4)
    summary = {"train_loss": 1.0}  # the Trainer's closing summary: no loss key, nothing added
    tracked.on_log(args, TrainerState(), TrainerControl(), logs=summary)
    assert "label_word_loss" not in summary
    second = type("Outputs", (), {"logits": LOGITS[1:, None, :]})()
    tracked(second, labels[1:])
    logs = {"loss": 1.0}
    tracked.on_log(args, TrainerState(), TrainerControl(), logs=logs)
    assert logs["label_word_loss"] == pytest.approx(per_review[1], abs=1e-4)
