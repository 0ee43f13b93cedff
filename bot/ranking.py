"""Which of the N sampled replies to show: the model's own signals first, then what the user's picks taught.

    scored = score_samples(samples, weights, settings.ranking)     # best first; weights None: the prior
    weights = fit(history, previous, settings.ranking)            # after a pick, from the user's recent picks

A reply is described by `features`: its mean token log-probability given the conversation, its
relevance (that mean minus the same given the persona alone: a reply the model finds as likely with no
conversation at all ignores what the user said) and, from the local generator, `state_dims` numbers
summing up its hidden state (the mean last hidden state over its tokens, length-normalised and
projected by a fixed random matrix). Its score is `weights · features`.

With no picks the weights are the prior: `logprob_weight`, `relevance_weight` and zero on the state.
Each pick says "the chosen reply scores above each shown sibling" (a Bradley-Terry pair; never-shown
replies were not judged and are left out); `fit` finds the weights that say so for the user's last
`history_picks` picks, the two signal weights held near the prior (`l2`) and the state weights near
zero (`state_l2`), by Newton's method on a few dozen numbers: a millisecond after each pick, so the
next offer already reflects it. The two pulls were chosen on bench/ranking_hits.py: a weak pull on the
signals let a user's taste (a name the model finds unlikely) undo the relevance that keeps replies on
topic; a weak pull on the state overfit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from bot.config import RankingSettings
from bot.serving import Sample

SIGNALS = 2  # log-prob and relevance come first in every feature vector
NEWTON_STEPS = 12


@dataclass(eq=False)
class Scored:
    """One sampled reply (`text` as offered) with what ranked it."""

    text: str
    sample: Sample
    score: float | None          # None: the generator gave no signals (replies keep their sampled order)
    state: np.ndarray | None     # the projected hidden state, as stored (float16)


@functools.lru_cache(maxsize=8)
def projection(hidden_size: int, dims: int) -> np.ndarray:
    """The fixed [hidden_size, dims] random matrix that shortens hidden states (the same in every process:
    numpy's PCG64 stream for a seed does not change between versions). Standard normal entries: a unit
    state comes out with coordinates of about one, the size of the two signals' differences."""
    return np.random.default_rng(hidden_size * 1009 + dims).standard_normal((hidden_size, dims))


def project_state(hidden: tuple[float, ...], dims: int) -> np.ndarray | None:
    """A reply's mean hidden state as `dims` float16 numbers: unit length, then the fixed projection."""
    if not hidden or not dims:
        return None
    vector = np.asarray(hidden, dtype=np.float64)
    norm = np.linalg.norm(vector)
    if not np.isfinite(norm) or norm == 0:
        return None
    return (vector / norm @ projection(len(vector), dims)).astype(np.float16)


def features(logprob: float | None, relevance: float | None, state: np.ndarray | None, dims: int) -> np.ndarray | None:
    """[log-prob, relevance, state...] as float64; None without a log-prob (nothing to rank by)."""
    if logprob is None:
        return None
    out = np.zeros(SIGNALS + dims)
    out[0], out[1] = logprob, relevance or 0.0
    if state is not None and len(state) == dims:
        out[SIGNALS:] = state
    return out


def prior(cfg: RankingSettings) -> np.ndarray:
    weights = np.zeros(SIGNALS + cfg.state_dims)
    weights[0], weights[1] = cfg.logprob_weight, cfg.relevance_weight
    return weights


def usable(weights: list[float] | None, cfg: RankingSettings) -> np.ndarray:
    """Stored weights if they fit today's feature layout (state_dims may have changed), else the prior."""
    if weights is not None and len(weights) == SIGNALS + cfg.state_dims and all(map(math.isfinite, weights)):
        return np.asarray(weights, dtype=np.float64)
    return prior(cfg)


def sample_features(sample: Sample, cfg: RankingSettings) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A sample's projected state (as stored) and its feature vector (None without signals)."""
    state = project_state(sample.features, cfg.state_dims)
    return state, features(sample.logprob, sample.relevance, state, cfg.state_dims)


def score_samples(replies: dict[str, Sample], weights: list[float] | None, cfg: RankingSettings) -> list[Scored]:
    """The replies (text as offered -> its sample) best first by `weights` (None: the prior). Replies
    without signals keep their sampled order, after the scored ones."""
    w = usable(weights, cfg)
    scored = []
    for text, sample in replies.items():
        state, x = sample_features(sample, cfg)
        scored.append(Scored(text, sample, None if x is None else round(float(w @ x), 4), state))
    return sorted(scored, key=lambda s: (s.score is None, -(s.score or 0.0)))


def scores(samples: list[Sample], weights: list[float] | None, cfg: RankingSettings) -> list[float | None]:
    """Each sample's score by `weights` (None: the prior), in order; None for a sample without signals."""
    w = usable(weights, cfg)
    vectors = [sample_features(sample, cfg)[1] for sample in samples]
    return [None if x is None else float(w @ x) for x in vectors]


@dataclass
class PickFeatures:
    """One past pick as the ranker learns from it: the chosen reply's features and each shown sibling's."""

    chosen: np.ndarray
    rejected: list[np.ndarray]


def pick_features(history: list[dict], cfg: RankingSettings) -> list[PickFeatures]:
    """Stored picks (`Store.ranking_history`) as feature vectors."""
    def vector(row: dict) -> np.ndarray | None:
        state = np.frombuffer(row["state"], dtype=np.float16) if row["state"] else None
        return features(row["logprob"], row["relevance"], state, cfg.state_dims)

    picks = []
    for pick in history:
        chosen, rejected = vector(pick["chosen"]), [v for v in map(vector, pick["rejected"]) if v is not None]
        if chosen is not None and rejected:
            picks.append(PickFeatures(chosen, rejected))
    return picks


def fit(history: list[PickFeatures], previous: list[float] | None, cfg: RankingSettings) -> list[float]:
    """Weights under which each chosen reply outscores its shown siblings, pulled towards the prior.

    Minimises sum(log(1 + exp(-w·(chosen - rejected)))) + sum(l2_i/2 * (w_i - prior_i)^2) over every pair,
    with `l2` on the two signals and `state_l2` on the state, starting from `previous` (the weights
    before this pick). Strictly convex, so a few Newton steps settle it.
    """
    w0 = prior(cfg)
    pull = np.full(len(w0), cfg.state_l2)
    pull[:SIGNALS] = cfg.l2
    diffs = [pick.chosen - r for pick in history for r in pick.rejected
             if len(pick.chosen) == len(w0) and len(r) == len(w0)]
    if not diffs:
        return w0.tolist()
    d = np.stack(diffs)
    w = usable(previous, cfg).copy()
    for _ in range(NEWTON_STEPS):
        margin = d @ w
        p = 1 / (1 + np.exp(np.clip(margin, -50, 50)))          # how far each pair is from being won
        gradient = -(d * p[:, None]).sum(axis=0) + pull * (w - w0)
        hessian = (d * (p * (1 - p))[:, None]).T @ d + np.diag(pull)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return [round(float(v), 6) for v in w]
