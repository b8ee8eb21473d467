"""The paper's claims against measurements: each verdict rule of duel/claims.py on small inputs where the answer is
known, and the re-measured Table 3 read from benchmark records."""

from __future__ import annotations

import pandas as pd

from duel.claims import (
    A100_GIB,
    gap_claim,
    lora_claim,
    memory_claims,
    newest_ablation,
    plateau_share,
    quality_claims,
    stability_claim,
    table3_markdown,
    time_claims,
)
from duel.report import Comparison

PAPER = {"llama": {"accuracy": 0.84, "f1": 0.85}, "deepseek": {"accuracy": 0.91, "f1": 0.924}}


def record(model: str, variant: str, peak: float, run: str = "2026-12-04-h200-call01", **extra) -> dict:
    fields = {"quantization": "nf4-dq", "gradient_checkpointing": True, "attention": "sdpa", "micro_batch": 1}
    fields |= {"grad_accum": 16, "wall_s": 20.0, "steps": 2, "gpu_util_pct": 50.0, "gpu": "NVIDIA H200"}
    named = {"stage": "finetune", "model": model, "recipe": f"ablation-{variant}", "run": run, "peak_vram_gib": peak}
    return named | fields | extra


def test_quality_claim_verdict_follows_the_interval():
    evaluate = {"llama": {"accuracy": 0.83, "f1": 0.80, "reviews": 25000}}
    intervals = {"llama": {"accuracy": (0.825, 0.835), "f1": (0.79, 0.81)}}
    claims = {c.claim: c for c in quality_claims(evaluate, intervals, set(), PAPER)}
    assert claims["llama fine-tuned accuracy 0.84"].verdict == "contradicted"  # 0.84 above 0.835
    assert "above" in claims["llama fine-tuned accuracy 0.84"].why
    intervals["llama"]["accuracy"] = (0.82, 0.845)
    assert quality_claims(evaluate, intervals, set(), PAPER)[0].verdict == "supported"
    random = quality_claims(evaluate, intervals, {"llama"}, PAPER)
    assert {c.verdict for c in random} == {"not measurable on this run"}


def test_gap_claim():
    def comparison(difference: float, low: float, high: float, p: float) -> Comparison:
        return Comparison("llama fine-tuned", "deepseek fine-tuned", 1000, 10, 80, difference, low, high, p, False)

    assert gap_claim(comparison(0.07, 0.05, 0.09, 1e-6), 0.07)[0].verdict == "supported"
    assert gap_claim(comparison(0.02, 0.01, 0.03, 1e-3), 0.07)[0].verdict == "contradicted (size)"
    assert gap_claim(comparison(-0.03, -0.05, -0.01, 1e-3), 0.07)[0].verdict == "contradicted"
    assert gap_claim(comparison(0.01, -0.01, 0.03, 0.3), 0.07)[0].verdict == "not supported at this test size"


def test_newest_ablation_per_model():
    old = [record("llama", "paper", 9.0, run="2026-12-01-h200-call01")]
    new = [record("llama", "paper", 8.0), record("llama", "no-4bit", 20.0)]
    other = [{"stage": "finetune", "model": "llama", "recipe": "default", "run": "2026-12-05-h200-call01"}]
    newest = newest_ablation(old + new + other)
    assert set(newest["llama"]) == {"paper", "no-4bit"} and newest["llama"]["paper"]["peak_vram_gib"] == 8.0


def test_memory_claims_from_the_ablation():
    ablation = {
        "llama": {
            "paper": record("llama", "paper", 6.0),
            "no-4bit": record("llama", "no-4bit", 18.0, quantization="none"),  # saves 67%: in 65-70%
            "no-checkpointing": record("llama", "no-checkpointing", 12.0, gradient_checkpointing=False),  # 50%
            "eager-attention": record("llama", "eager-attention", 7.0, attention="eager"),
            "micro-batch-16": record("llama", "micro-batch-16", 30.0, micro_batch=16, grad_accum=1),
        }
    }
    claims = {c.claim: c for c in memory_claims(ablation, {})}
    assert claims["llama peaks near the A100's 40 GB"].verdict == "contradicted"  # 6 GiB
    assert claims["llama runs out of memory repeatedly on 40 GB"].verdict == "contradicted"
    assert claims["4-bit NF4 quantization saves 65-70% of memory"].verdict == "supported"
    assert claims["gradient checkpointing saves 33% of memory"].verdict == "contradicted"  # 50% measured
    assert claims["Flash attention (fused attention kernel) saves 40% of attention memory"].verdict == (
        "not measurable as stated"
    )
    assert not any("micro-batch" in name for name in claims)  # not a claim of the paper
    near = memory_claims({"llama": {"paper": record("llama", "paper", 0.95 * A100_GIB)}}, {})
    assert near[0].verdict == "supported" and near[1].verdict == "contradicted"
    table = "\n".join(table3_markdown(ablation))
    assert "| llama | no-4bit | none |" in table and "| 67% |" in table and "| 80% |" in table  # mb16: 1 - 6/30


def test_memory_claims_without_records_are_not_measurable():
    claims = memory_claims({}, {"llama": {"peak_vram_reserved_gib": 61.2}})
    assert {c.verdict for c in claims} == {"not measurable on this run"}
    assert "61.2 GiB" in claims[0].measured


def test_time_claims_scale_to_an_a100():
    ablation = {"llama": {"paper": record("llama", "paper", 6.0, wall_s=21.0, steps=2)}}  # 10.5 s a step
    (claim,) = time_claims(ablation, {"llama": (3.75, 50)})
    assert claim.verdict == "contradicted" and "10.5 s/step" in claim.measured  # 50 x 10.5 x 3.2 s = 0.46 h
    slow = {"llama": {"paper": record("llama", "paper", 6.0, wall_s=170.0, steps=2)}}  # 85 s a step: 3.7 h
    assert time_claims(slow, {"llama": (3.75, 50)})[0].verdict == "supported"
    assert time_claims({}, {"deepseek": (2.5, 200)})[0].verdict == "not measurable on this run"


def test_plateau_and_stability():
    steady = pd.Series([3.0 - 0.01 * i for i in range(200)])
    plateau = pd.Series([3.0 - 0.02 * i for i in range(100)] + [1.02] * 100)
    assert 0.45 < plateau_share(steady) < 0.55 and plateau_share(plateau) < 0.1
    (claim,) = stability_claim({"llama": plateau, "deepseek": steady}, set())
    assert claim.verdict == "supported"
    assert stability_claim({"llama": steady, "deepseek": steady}, set())[0].verdict == "contradicted"
    assert stability_claim({"llama": plateau, "deepseek": steady}, {"llama"})[0].verdict == (
        "not measurable on this run"
    )


def test_lora_share_is_counted():
    # Llama-2-7B: q, v and o at r=16 are 3 x 32 x 16 x (4096 + 4096) = 12,582,912 of 6,738,415,616 parameters.
    finetune = {"llama": {"trainable_parameters": 39_976_960, "total_parameters": 6_738_415_616}}
    bases = {"llama": {"hidden_size": 4096, "num_hidden_layers": 32}}
    (claim,) = lora_claim(finetune, bases, 16, set())
    assert "0.187%" in claim.measured and "0.593%" in claim.measured and claim.verdict == "contradicted"
    assert lora_claim(finetune, bases, 16, {"llama"})[0].verdict == "not measurable on this run"
