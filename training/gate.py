"""The promotion gate: a new generation is served only if it learned and kept its variety.

Measured on tonight's held-out picks (never trained on) for three models: the base (adapters
disabled), the generation being served now (if any) and the candidate.

    accuracy     share of held-out pairs where the model gives the chosen reply a higher mean token
                 log-probability than the rejected one (what the sampler sees), with a bootstrap
                 interval over picks; the gain over the base must be above zero with confidence
    distinct-2   unique token bigrams / all bigrams among K samples of one context, averaged
    self-BLEU    mean BLEU-4 of each sample against its K-1 siblings (higher = more alike)
    repetition   share of samples with a loop (a 3-gram three times, or one token four times in a row)
    length       mean sampled reply length in tokens, relative to the base, with a bootstrap interval over
                 contexts (lengths are heavy-tailed); refused when the whole interval is outside the band
    KL           Monte-Carlo estimate on the candidate's own samples, nats per token, against the base,
                 over the tokens outside what was taught (the taught piece itself is the lesson)
    obsession    share of replies to unrelated contexts that carry what was taught (see `taught_markers`)

Samples and scores are computed in batches (`ModelBackend.sample_many`, `score_completions`).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from bot.config import GateSettings, SamplingSettings
from bot.model import ModelBackend

BOOTSTRAP_ROUNDS = 2000


@dataclass
class GateReport:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def pair_wins(backend: ModelBackend, pairs: list[dict], adapter: str | None) -> list[bool]:
    """Per pair: does the model give the chosen reply a higher mean token log-probability?"""
    items = [(p["prompt"], f" {text}\n") for p in pairs for text in (p["chosen"], p["rejected"])]
    scores = backend.score_completions(items, adapter)
    means = [logprob / max(tokens, 1) for logprob, tokens in scores]
    return [means[2 * i] > means[2 * i + 1] for i in range(len(pairs))]


def pick_accuracy(backend: ModelBackend, pairs: list[dict], adapter: str | None) -> float:
    return _mean(pair_wins(backend, pairs, adapter))


def bootstrap(groups: list[int], values: list[float], level: float, seed: int = 0) -> tuple[float, float]:
    """Central `level` interval of the mean of `values`, resampling whole groups (the pairs of one pick)."""
    by_group: dict[int, list[float]] = {}
    for group, value in zip(groups, values):
        by_group.setdefault(group, []).append(value)
    blocks = list(by_group.values())
    if not blocks:
        return 0.0, 0.0
    return _interval(blocks, lambda drawn: sum(map(sum, drawn)) / sum(map(len, drawn)), level, seed)


def _interval(blocks: list, statistic, level: float, seed: int) -> tuple[float, float]:
    """Central `level` interval of `statistic(blocks drawn with replacement)` over BOOTSTRAP_ROUNDS draws."""
    rng = random.Random(seed)
    values = sorted(statistic([blocks[rng.randrange(len(blocks))] for _ in blocks]) for _ in range(BOOTSTRAP_ROUNDS))
    tail = (1 - level) / 2
    return values[int(tail * (len(values) - 1))], values[int((1 - tail) * (len(values) - 1))]


def taught_markers(pairs: list[dict], min_share: float = 0.2, limit: int = 5) -> list[str]:
    """What the user taught, as text: the pieces a chosen reply adds to a rejected reply that is otherwise
    the same sentence (몽실이 for 고양이, 냥 before the final !), found in at least `min_share` of the pairs.

    Picks among unrelated candidates (different sentences) teach no single piece and give none.
    """
    counts: Counter = Counter()
    for pair in pairs:
        chosen, rejected = pair["chosen"], pair["rejected"]
        matcher = SequenceMatcher(None, rejected, chosen, autojunk=False)
        if matcher.ratio() < 0.6:
            continue
        pieces = {chosen[j1:j2].strip(" .,!?~") for tag, _, _, j1, j2 in matcher.get_opcodes()
                  if tag in ("replace", "insert")}
        counts.update(p for p in pieces if p and p not in rejected)
    return [piece for piece, count in counts.most_common(limit) if count >= min_share * len(pairs)]


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
    for samples in backend.sample_many(prompts, gate.samples_per_context, sampling, ["\n"], adapter):
        ids = [backend.tokenizer(s.text, add_special_tokens=False).input_ids for s in samples]
        d2.append(distinct_n(ids))
        sb.append(self_bleu(ids))
        loops += sum(has_loop(t) for t in ids)
        lengths.append([len(t) for t in ids])
        texts.append([s.text for s in samples])
    count = max(sum(map(len, lengths)), 1)
    return {"distinct2": _mean(d2), "self_bleu": _mean(sb), "repetition": loops / count,
            "length": sum(map(sum, lengths)) / count, "lengths": lengths, "samples": texts}


def length_ratio_interval(base: list[list[int]], new: list[list[int]], level: float, seed: int = 3
                          ) -> tuple[float, float]:
    """Central `level` bootstrap interval of the candidate's mean reply length over the base's, resampling
    the probe contexts (both models' samples of a context together).

    Sampled lengths are heavy-tailed (a few replies run to the token limit), so one draw of 72 samples
    moves the ratio a lot: the same two models measured 1.10x to 1.28x in four draws, and 1.70x in a fifth.
    """
    contexts = list(zip(base, new))
    if not contexts:
        return 1.0, 1.0

    def ratio(drawn) -> float:
        base_mean = sum(sum(b) for b, _ in drawn) / max(sum(len(b) for b, _ in drawn), 1)
        return sum(sum(n) for _, n in drawn) / max(sum(len(n) for _, n in drawn), 1) / max(base_mean, 1e-6)

    return _interval(contexts, ratio, level, seed)


def kl_per_token(backend: ModelBackend, prompts: list[str], samples: list[list[str]], adapter: str,
                 taught: list[str] = ()) -> tuple[float, float]:
    """Monte-Carlo KL from the base in nats per token on the candidate's own samples: over every token,
    and over the tokens outside what was taught (`taught` pieces, where a sample carries them).

    A piece the base never says is expensive on its own (냥 costs the base about 12 nats each time), so a
    learned style would read as drift by its every use; the tokens around it show whether the rest moved.
    """
    items = [(prompt, text + "\n") for prompt, texts in zip(prompts, samples) for text in texts]
    policy = backend.token_logprobs(items, adapter)
    base = backend.token_logprobs(items, None)
    total = outside = 0.0
    tokens = outside_tokens = 0
    for (ids, new), (_, old) in zip(policy, base):
        skip = _taught_positions(backend.tokenizer, ids, taught)
        for i, (p, b) in enumerate(zip(new, old)):
            total += p - b
            if i not in skip:
                outside += p - b
                outside_tokens += 1
        tokens += len(ids)
    return total / max(tokens, 1), outside / max(outside_tokens, 1)


def _taught_positions(tokenizer, ids: list[int], taught) -> set[int]:
    """Indexes of the tokens whose text overlaps an occurrence of a taught piece."""
    text = tokenizer.decode(ids)
    spans = [(m.start(), m.end()) for piece in taught if piece for m in re.finditer(re.escape(piece), text)]
    if not spans:
        return set()
    positions, end = set(), 0
    for i in range(len(ids)):
        start, end = end, len(tokenizer.decode(ids[:i + 1]))
        if any(s < end and start < e for s, e in spans):
            positions.add(i)
    return positions


def marker_rate(samples: list[list[str]], markers: list[str]) -> float:
    replies = [text for row in samples for text in row]
    return sum(any(m in text for m in markers) for text in replies) / max(len(replies), 1)


def evaluate(backend: ModelBackend, heldout: list[dict], candidate: str, current: str | None, gate: GateSettings,
             sampling: SamplingSettings, train_pairs: list[dict] | None = None) -> GateReport:
    """Compare `candidate` (a loaded adapter) with the base and with `current`; decide promotion.

    `train_pairs` tell what was taught (for the obsession measure) and where it was not chosen.
    """
    metrics: dict = {"heldout_pairs": len(heldout), "heldout_picks": len({p["pick_id"] for p in heldout})}
    groups = [p["pick_id"] for p in heldout]
    wins = {name: pair_wins(backend, heldout, adapter) for name, adapter in
            (("base", None), ("candidate", candidate), *((("current", current),) if current else ()))}
    metrics["accuracy_base"] = _mean(wins["base"])
    metrics["accuracy"] = _mean(wins["candidate"])
    metrics["accuracy_low"], metrics["accuracy_high"] = bootstrap(groups, wins["candidate"], gate.confidence)
    gain = [float(c) - float(b) for c, b in zip(wins["candidate"], wins["base"])]
    metrics["gain_low"], metrics["gain_high"] = bootstrap(groups, gain, gate.confidence, seed=1)
    if current is not None:
        metrics["accuracy_current"] = _mean(wins["current"])
        change = [float(c) - float(s) for c, s in zip(wins["candidate"], wins["current"])]
        metrics["change_low"], metrics["change_high"] = bootstrap(groups, change, gate.confidence, seed=2)

    prompts = list(dict.fromkeys(p["prompt"] for p in heldout))[: gate.probe_contexts]
    base = sample_stats(backend, prompts, None, gate, sampling)
    new = sample_stats(backend, prompts, candidate, gate, sampling)
    for key in ("distinct2", "self_bleu", "repetition", "length"):
        metrics[f"{key}_base"], metrics[key] = base[key], new[key]
    metrics["length_low"], metrics["length_high"] = length_ratio_interval(base["lengths"], new["lengths"],
                                                                          gate.confidence)
    markers = taught_markers(train_pairs or [])
    metrics["taught"] = markers
    metrics["kl_all_per_token"], metrics["kl_per_token"] = kl_per_token(backend, prompts, new["samples"],
                                                                        candidate, markers)
    metrics["examples"] = [s[:3] for s in new["samples"][:3]]
    unrelated = list(dict.fromkeys(p["prompt"] for p in (train_pairs or []) + heldout
                                   if not any(m in p["chosen"] for m in markers)))[: gate.probe_contexts]
    if markers and unrelated:
        metrics["obsession_contexts"] = len(unrelated)
        metrics["obsession_base"] = marker_rate(sample_stats(backend, unrelated, None, gate, sampling)["samples"],
                                                markers)
        metrics["obsession"] = marker_rate(sample_stats(backend, unrelated, candidate, gate, sampling)["samples"],
                                           markers)
    return GateReport(not (reasons := decide(metrics, gate)), reasons, metrics)


def decide(m: dict, gate: GateSettings) -> list[str]:
    """Reasons to refuse promotion (empty: promote)."""
    reasons = []
    interval = f"{gate.confidence:.0%} interval"
    if m["accuracy_high"] < gate.min_accuracy:
        reasons.append(f"held-out accuracy {m['accuracy']:.2f} ({interval} {m['accuracy_low']:.2f}-"
                       f"{m['accuracy_high']:.2f}) is below {gate.min_accuracy:.2f}")
    if m["gain_low"] <= gate.min_gain_over_base:
        reasons.append(f"held-out accuracy {m['accuracy']:.2f} does not beat the base ({m['accuracy_base']:.2f}) "
                       f"with confidence (gain {interval} {m['gain_low']:+.2f} to {m['gain_high']:+.2f}, "
                       f"{m['heldout_picks']} picks)")
    if "change_high" in m and m["change_high"] < -gate.max_drop_from_current:
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
    ratio_low, ratio_high = m.get("length_low", ratio), m.get("length_high", ratio)
    if ratio_low > high or ratio_high < low:  # the whole interval outside the band
        reasons.append(f"reply length is {ratio:.2f}x the base's ({interval} {ratio_low:.2f}-{ratio_high:.2f}), "
                       f"outside [{low}, {high}]")
    if m["kl_per_token"] > gate.max_kl_per_token:
        outside = f" outside {', '.join(m['taught'])}" if m.get("taught") else ""
        reasons.append(f"KL from the base{outside} {m['kl_per_token']:.3f} nats/token is over {gate.max_kl_per_token}")
    if "obsession" in m and m["obsession"] > max(gate.max_obsession, m["obsession_base"]):
        reasons.append(f"{m['obsession']:.0%} of replies to unrelated messages bring up "
                       f"{', '.join(m['taught'])} (at most {gate.max_obsession:.0%})")
    return reasons


def verdict(status: str, m: dict) -> str:
    """One line of the gate's figures, for `banryeo train` and the admin commands."""
    parts = [f"accuracy {m['accuracy']:.2f} [{m['accuracy_low']:.2f}-{m['accuracy_high']:.2f}] "
             f"vs base {m['accuracy_base']:.2f} on {m['heldout_pairs']} held-out pairs",
             f"distinct-2 {m['distinct2'] / max(m['distinct2_base'], 1e-6):.2f}x base",
             f"loops {m['repetition']:.0%} (base {m['repetition_base']:.0%})",
             f"length {m['length'] / max(m['length_base'], 1e-6):.2f}x"
             + (f" [{m['length_low']:.2f}-{m['length_high']:.2f}]" if "length_low" in m else "")]
    if "serving_accuracy_on_new" in m:
        parts.append(f"the serving generation had {m['serving_accuracy_on_new']:.2f} on tonight's "
                     f"{m['serving_tested_pairs']} new pairs")
    if "obsession" in m:
        parts.append(f"off-topic {'/'.join(m['taught'])} {m['obsession']:.0%} (base {m['obsession_base']:.0%})")
    return f"{status}: " + ", ".join(parts)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
