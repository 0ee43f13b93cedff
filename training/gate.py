"""The promotion gate: a new generation is served only if it learned and kept its variety.

Measured on the held-out picks (the newest ones, never trained on) for three models: the base
(adapters disabled), the generation being served now (if any) and the candidate.

    accuracy     share of held-out pairs where the model gives the chosen reply a higher mean
                 token log-probability than the rejected one (what the sampler sees)
    distinct-2   unique token bigrams / all bigrams among K samples of one context, averaged
    self-BLEU    mean BLEU-4 of each sample against its K-1 siblings (higher = more alike)
    repetition   share of samples with a loop (a 3-gram three times, or one token four times in a row)
    length       mean sampled reply length in tokens, relative to the base
    KL           Monte-Carlo estimate on the candidate's own samples, nats per token, against the base
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from bot.config import GateSettings, SamplingSettings
from bot.model import ModelBackend


@dataclass
class GateReport:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def pick_accuracy(backend: ModelBackend, pairs: list[dict], adapter: str | None) -> float:
    if not pairs:
        return 0.0
    wins = 0
    for pair in pairs:
        (chosen_lp, chosen_n), (rejected_lp, rejected_n) = backend.completion_logprobs(
            pair["prompt"], [f" {pair['chosen']}\n", f" {pair['rejected']}\n"], adapter)
        wins += chosen_lp / max(chosen_n, 1) > rejected_lp / max(rejected_n, 1)
    return wins / len(pairs)


def distinct_n(samples: list[list[int]], n: int = 2) -> float:
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(candidate: list[int], references: list[list[int]], max_n: int = 4) -> float:
    """Sentence BLEU with add-one smoothing (enough to compare models on the same contexts)."""
    if not candidate or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(tuple(candidate[i:i + n]) for i in range(len(candidate) - n + 1))
        best: Counter = Counter()
        for ref in references:
            best |= Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matched = sum(min(c, best[g]) for g, c in grams.items())
        log_precision += math.log((matched + 1) / (sum(grams.values()) + 1))
    closest = min((abs(len(r) - len(candidate)), len(r)) for r in references)[1]
    brevity = 1.0 if len(candidate) > closest else math.exp(1 - closest / max(len(candidate), 1))
    return brevity * math.exp(log_precision / max_n)


def self_bleu(samples: list[list[int]]) -> float:
    if len(samples) < 2:
        return 0.0
    return sum(bleu(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)) / len(samples)


def has_loop(tokens: list[int]) -> bool:
    if any(len(set(tokens[i:i + 4])) == 1 for i in range(len(tokens) - 3)):
        return True
    trigrams = Counter(tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2))
    return any(count >= 3 for count in trigrams.values())


def sample_stats(backend: ModelBackend, prompts: list[str], adapter: str | None, gate: GateSettings,
                 sampling: SamplingSettings) -> dict:
    """Diversity, loops and length of K samples per probe prompt, at the serving sampler settings."""
    d2, sb, loops, lengths, texts = [], [], 0, [], []
    for prompt in prompts:
        samples = backend.sample(prompt, gate.samples_per_context, sampling, ["\n"], adapter)
        ids = [backend.tokenizer(s.text, add_special_tokens=False).input_ids for s in samples]
        d2.append(distinct_n(ids))
        sb.append(self_bleu(ids))
        loops += sum(has_loop(t) for t in ids)
        lengths += [len(t) for t in ids]
        texts.append([s.text for s in samples])
    count = max(len(lengths), 1)
    return {"distinct2": _mean(d2), "self_bleu": _mean(sb), "repetition": loops / count,
            "length": sum(lengths) / count, "samples": texts}


def kl_per_token(backend: ModelBackend, prompts: list[str], samples: list[list[str]], adapter: str) -> float:
    total, tokens = 0.0, 0
    for prompt, texts in zip(prompts, samples):
        completions = [t + "\n" for t in texts]
        policy = backend.completion_logprobs(prompt, completions, adapter)
        base = backend.completion_logprobs(prompt, completions, None)
        total += sum(p[0] - b[0] for p, b in zip(policy, base))
        tokens += sum(p[1] for p in policy)
    return total / max(tokens, 1)


def evaluate(backend: ModelBackend, heldout: list[dict], candidate: str, current: str | None, gate: GateSettings,
             sampling: SamplingSettings) -> GateReport:
    """Compare `candidate` (a loaded adapter) with the base and with `current`; decide promotion."""
    metrics: dict = {"heldout_pairs": len(heldout)}
    metrics["accuracy_base"] = pick_accuracy(backend, heldout, None)
    metrics["accuracy"] = pick_accuracy(backend, heldout, candidate)
    if current is not None:
        metrics["accuracy_current"] = pick_accuracy(backend, heldout, current)
    prompts = list(dict.fromkeys(p["prompt"] for p in heldout))[: gate.probe_contexts]
    base = sample_stats(backend, prompts, None, gate, sampling)
    new = sample_stats(backend, prompts, candidate, gate, sampling)
    for key in ("distinct2", "self_bleu", "repetition", "length"):
        metrics[f"{key}_base"], metrics[key] = base[key], new[key]
    metrics["kl_per_token"] = kl_per_token(backend, prompts, new["samples"], candidate)
    metrics["examples"] = [s[:3] for s in new["samples"][:3]]
    return GateReport(not (reasons := decide(metrics, gate)), reasons, metrics)


def decide(m: dict, gate: GateSettings) -> list[str]:
    """Reasons to refuse promotion (empty: promote)."""
    reasons = []
    if m["accuracy"] < gate.min_accuracy:
        reasons.append(f"held-out accuracy {m['accuracy']:.2f} is below {gate.min_accuracy:.2f}")
    if m["accuracy"] <= m["accuracy_base"] + gate.min_gain_over_base:
        reasons.append(f"held-out accuracy {m['accuracy']:.2f} does not beat the base ({m['accuracy_base']:.2f})")
    if "accuracy_current" in m and m["accuracy"] < m["accuracy_current"] - gate.max_drop_from_current:
        reasons.append(f"held-out accuracy {m['accuracy']:.2f} falls below the serving generation's "
                       f"({m['accuracy_current']:.2f})")
    if m["distinct2"] < gate.min_distinct2_ratio * m["distinct2_base"]:
        reasons.append(f"distinct-2 {m['distinct2']:.3f} is under {gate.min_distinct2_ratio}x the base's "
                       f"({m['distinct2_base']:.3f})")
    if m["self_bleu"] > gate.max_self_bleu_ratio * max(m["self_bleu_base"], 1e-6):
        reasons.append(f"self-BLEU {m['self_bleu']:.3f} is over {gate.max_self_bleu_ratio}x the base's "
                       f"({m['self_bleu_base']:.3f})")
    if m["repetition"] > max(gate.max_repetition_rate, m["repetition_base"]):
        reasons.append(f"{m['repetition']:.0%} of samples loop (base {m['repetition_base']:.0%})")
    low, high = gate.length_band
    ratio = m["length"] / max(m["length_base"], 1e-6)
    if not low <= ratio <= high:
        reasons.append(f"reply length is {ratio:.2f}x the base's, outside [{low}, {high}]")
    if m["kl_per_token"] > gate.max_kl_per_token:
        reasons.append(f"KL from the base {m['kl_per_token']:.3f} nats/token is over {gate.max_kl_per_token}")
    return reasons


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
