"""Sampling against hand-computed distributions on tiny vocabularies.

Every expected distribution is computed here, in float64 with plain formulas (`ref_dist`), never with
the module's own helpers. The reported distribution is read back through `top` with top_n == vocab.
"""

import math
import pickle
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from nextword.server.sampling import (
    InvalidParameter,
    SampledToken,
    Sampler,
    SamplingParams,
    TokenProb,
    sample_rows,
    top_n_probs,
)

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 0.0], dtype=np.float32)  # exactly representable
V = LOGITS.size


def softmax(vals):
    e = [math.exp(v - max(vals)) for v in vals]
    s = sum(e)
    return [x / s for x in e]


def ref_dist(
    logits,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    prompt=(),
    generated=(),
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    logit_bias=(),
):
    """The documented pipeline, written out by hand. Returns probs over the whole vocab (0 = filtered)."""
    lg = [float(v) for v in logits]
    n = len(lg)
    for tok, b in logit_bias:
        lg[tok] += b
    for tok in set(prompt) | set(generated):
        lg[tok] = lg[tok] / repetition_penalty if lg[tok] > 0 else lg[tok] * repetition_penalty
    for tok, c in Counter(generated).items():
        lg[tok] -= presence_penalty * (c > 0) + frequency_penalty * c
    t = temperature if temperature > 0 else 1.0
    lg = [v / t for v in lg]

    kept = sorted(range(n), key=lambda i: (-lg[i], i))[:top_k] if top_k else list(range(n))

    def renorm(ids):
        p = softmax([lg[i] for i in ids])
        return dict(zip(ids, p, strict=True))

    probs = renorm(kept)
    if top_p < 1.0:
        order = sorted(probs, key=lambda i: (-probs[i], i))
        cum, prefix = 0.0, []
        for i in order:
            prefix.append(i)
            cum += probs[i]
            if cum >= top_p:
                break
        probs = renorm(prefix)
    if min_p > 0.0:
        pmax = max(probs.values())
        probs = renorm([i for i in probs if probs[i] >= min_p * pmax])
    return np.array([probs.get(i, 0.0) for i in range(n)])


def reported(tok: SampledToken, n: int) -> np.ndarray:
    out = np.zeros(n)
    for alt in tok.top:
        out[alt.token_id] = alt.prob
    return out


def one(logits=LOGITS, prompt=(), **kw) -> SampledToken:
    kw.setdefault("top_n", len(logits))
    kw.setdefault("seed", 0)
    return Sampler(SamplingParams(**kw), len(logits), prompt).sample(logits)


# ---- greedy and temperature ---------------------------------------------------------------------------


def test_greedy_picks_argmax_and_reports_softmax():
    tok = one(temperature=0.0)
    ref = softmax([2.0, 1.0, 0.5, -1.0, 0.0])  # temperature 1 for the report
    assert tok.token_id == 0
    assert tok.prob == pytest.approx(ref[0], rel=1e-12)
    assert tok.prob == pytest.approx(0.5630, abs=1e-4)  # e^2 / (e^2 + e + e^.5 + e^-1 + 1)
    np.testing.assert_allclose(reported(tok, V), ref, rtol=1e-12)


def test_greedy_ties_go_to_lowest_id():
    logits = np.array([1.0, 3.0, 3.0, 0.0], dtype=np.float32)
    assert one(logits, temperature=0.0).token_id == 1
    assert one(logits, temperature=0.0, top_k=1).token_id == 1


def test_sample_rows_draws_what_each_sampler_draws_alone():
    """A step's rows sampled together: the plain ones (greedy or a temperature, nothing else) through the
    batched kernel, the others one by one; every token, probability and alternative as the sampler alone
    gives them, and the plain greedy ones as the float64 softmax."""
    vocab = 3000
    logits = (np.random.default_rng(7).standard_normal((4, vocab)) * 4).astype(np.float32)
    logits[1, [10, 2000]] = logits[1].max() + 1  # a tie: the lowest id
    logits[2, :100] = -np.inf
    kinds = [
        {"temperature": 0.0},
        {"temperature": 0.0, "top_n": 3},
        {"temperature": 0.8, "seed": 3, "top_p": 0.9},
        {"temperature": 0.0, "top_k": 5},
        {"temperature": 0.0},
        {"temperature": 0.0, "logit_bias": {5: 50.0}},
        {"temperature": 0.0},
    ]
    kinds += [{"temperature": t, "seed": seed} for t in (0.5, 1.0, 2.5) for seed in range(8)]
    rows = [3, 0, 1, 1, 1, 2, 2] + [seed % 4 for seed in range(24)]
    fresh = [Sampler(SamplingParams(**kw), vocab, []) for kw in kinds]
    assert [s.plain for s in fresh] == [True, False, False, False, True, False, True] + [True] * 24
    got = sample_rows(fresh, logits, rows)
    for kw, row, tok in zip(kinds, rows, got, strict=True):
        alone = Sampler(SamplingParams(**kw), vocab, []).sample(logits[row])
        assert tok.token_id == alone.token_id
        assert tok.prob == pytest.approx(alone.prob, rel=1e-12)
        assert tok.logprob == pytest.approx(alone.logprob, rel=1e-12)
        assert [a.token_id for a in tok.top] == [a.token_id for a in alone.top]
    for i in (0, 4, 6):
        ref = np.exp(logits[rows[i]].astype(np.float64) - logits[rows[i]].max())
        assert got[i].token_id == int(np.argmax(ref))
        assert got[i].prob == pytest.approx(1.0 / ref.sum(), rel=1e-12)
    assert got[4].token_id == 10
    assert len({t.token_id for t in got[7:]}) > 12  # the draws are draws


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sample_rows_frequencies_match_distribution(temperature):
    """The batched draw over a vocabulary of several chunks: every token as often as its probability."""
    vocab = 700  # 3 chunks, the last partial
    logits = np.full(vocab, -30.0, dtype=np.float32)
    logits[[0, 255, 256, 511, 699]] = [2.0, 1.0, 0.5, -1.0, 0.0]  # the chunks' edges
    s = Sampler(SamplingParams(temperature=temperature, seed=11), vocab, [])
    n = 20000
    draws = [t.token_id for _ in range(n // 100) for t in sample_rows([s] * 100, logits[None], [0] * 100)]
    counts = np.bincount(draws, minlength=vocab)
    ref = ref_dist(logits, temperature=temperature or 1.0)
    if temperature == 0:
        assert counts[0] == n
        return
    np.testing.assert_allclose(counts / n, ref, atol=0.01)
    nz = ref > 1e-4
    chi2 = float((((counts - n * ref) ** 2)[nz] / (n * ref[nz])).sum())
    assert chi2 < 18.47  # 99.9th percentile of chi-square with 4 degrees of freedom
    assert counts[~nz].sum() == 0  # the 695 others hold ~1e-15 of the mass


def test_sample_rows_rejects_bad_logits_as_sample_does():
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7)):
        s = Sampler(params, 3, [])
        assert s.plain
        for bad in ([0.0, np.nan, 1.0], [-np.inf] * 3, [0.0, np.inf, 1.0]):
            with pytest.raises(ValueError, match="finite"):
                sample_rows([s], np.array([bad], dtype=np.float32), [0])


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0, 2.0, 7.0])
def test_temperature_scales_as_exp_l_over_t(temperature):
    tok = one(temperature=temperature)
    e = [math.exp(v / temperature) for v in (2.0, 1.0, 0.5, -1.0, 0.0)]
    ref = [x / sum(e) for x in e]
    np.testing.assert_allclose(reported(tok, V), ref, rtol=1e-12)
    assert tok.prob == pytest.approx(ref[tok.token_id], rel=1e-12)


# ---- filters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9])
def test_top_k_keeps_exactly_k(k):
    tok = one(top_k=k)
    got = reported(tok, V)
    assert np.count_nonzero(got) == min(k, V)
    np.testing.assert_allclose(got, ref_dist(LOGITS, top_k=k), rtol=1e-12)


def test_top_k_ties_at_the_cut_go_to_lowest_ids():
    logits = np.array([0.0, 1.0, 1.0, 1.0, 0.0], dtype=np.float32)
    assert [a.token_id for a in one(logits, top_k=2).top] == [1, 2]


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.25, 1), (0.2500001, 2), (0.5, 2), (0.5000001, 3), (0.75, 3), (0.76, 4), (1.0, 4)],
)
def test_top_p_boundary_is_inclusive(top_p, kept):
    # Uniform over 4: probs are exactly .25 and the cumulative sums exactly .25 .5 .75 1, so the
    # convention "smallest prefix with cumulative >= top_p" is tested at equality. Ties: lowest ids first.
    logits = np.zeros(4, dtype=np.float32)
    tok = one(logits, top_p=top_p)
    assert [a.token_id for a in tok.top] == list(range(kept))
    assert all(a.prob == 1.0 / kept for a in tok.top)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
def test_top_p(top_p):
    np.testing.assert_allclose(reported(one(top_p=top_p), V), ref_dist(LOGITS, top_p=top_p), rtol=1e-12)


def test_top_p_hand_computed():
    # probs ~ [.5630, .2071, .1256, .0762, .0280]: cumulative .5630, .7701, .8957 -> 0.8 keeps three.
    assert [a.token_id for a in one(top_p=0.8).top] == [0, 1, 2]
    assert [a.token_id for a in one(top_p=0.7).top] == [0, 1]


def test_top_k_is_applied_before_top_p():
    # After top-k=3 the renormalized probs are ~[.6286, .2312, .1402]; cumulative .8598 >= .8 at two.
    tok = one(top_k=3, top_p=0.8)
    assert [a.token_id for a in tok.top] == [0, 1]
    np.testing.assert_allclose(reported(tok, V), ref_dist(LOGITS, top_k=3, top_p=0.8), rtol=1e-12)


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.2, 0.4, 1.0])
def test_min_p(min_p):
    np.testing.assert_allclose(reported(one(min_p=min_p), V), ref_dist(LOGITS, min_p=min_p), rtol=1e-12)


def test_min_p_hand_computed():
    # p / p_max = exp(l - 2) = [1, .368, .223, .0498, .135]: min_p .2 keeps ids 0, 1, 2.
    assert sorted(a.token_id for a in one(min_p=0.2).top) == [0, 1, 2]


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.7, "top_k": 4, "top_p": 0.9, "min_p": 0.05},
        {"temperature": 1.8, "top_k": 4, "top_p": 0.8},
        {"temperature": 0.3, "top_p": 0.95, "min_p": 0.01},
        {"temperature": 0.0, "top_p": 0.7},  # greedy reports the filtered distribution at T=1
        {"temperature": 0.0, "top_k": 2, "min_p": 0.5},
    ],
)
def test_filters_combined(kw):
    tok = one(**kw)
    ref = ref_dist(LOGITS, **kw)
    np.testing.assert_allclose(reported(tok, V), ref, rtol=1e-12)
    assert ref[tok.token_id] > 0


@pytest.mark.parametrize(
    "kw",
    [
        {"top_p": 0.9},
        {"top_p": 0.5, "temperature": 0.7},
        {"top_k": 100, "top_p": 0.95},
        {"top_k": 700, "min_p": 0.3},
        {"min_p": 0.1, "top_p": 0.99},
    ],
)
@pytest.mark.parametrize("quantized", [False, True])
def test_filters_on_a_larger_vocab(kw, quantized):
    # 3000 flat logits make top-p widen past its first candidate window; rounding to 0.25 makes many
    # ties, so the cuts land inside runs of equal values (ties go to the lowest ids).
    logits = np.random.default_rng(21).normal(0, 1, 3000).astype(np.float32)
    if quantized:
        logits = np.round(logits * 4) / 4
    tok = one(logits, **kw)
    np.testing.assert_allclose(reported(tok, logits.size), ref_dist(logits, **kw), rtol=1e-9, atol=1e-15)


# ---- penalties and bias -------------------------------------------------------------------------------


def run_steps(n, prompt=(), logits=LOGITS, **kw):
    """Greedy steps; checks every step's reported distribution against ref_dist. Returns the tokens."""
    s = Sampler(SamplingParams(temperature=0.0, top_n=len(logits), **kw), len(logits), prompt)
    generated = []
    for _ in range(n):
        tok = s.sample(logits)
        ref = ref_dist(logits, prompt=prompt, generated=generated, temperature=0.0, **kw)
        np.testing.assert_allclose(reported(tok, len(logits)), ref, rtol=1e-12)
        assert tok.token_id == int(np.argmax(ref))
        generated.append(tok.token_id)
    return generated


def test_repetition_penalty_covers_prompt_and_generated():
    # Prompt [0, 3], r = 4: step 1 logits [2/4, 1, .5, -1*4, 0] -> token 1; then 1 is penalized too
    # (1/4), so step 2 sees [.5, .25, .5, -4, 0] -> token 0 (tie with 2, lowest id).
    tok = one(prompt=[0, 3], temperature=0.0, repetition_penalty=4.0)
    np.testing.assert_allclose(reported(tok, V), softmax([0.5, 1.0, 0.5, -4.0, 0.0]), rtol=1e-12)
    assert run_steps(4, prompt=[0, 3], repetition_penalty=4.0) == [1, 0, 0, 0]


def test_repetition_penalty_is_once_per_id_not_per_count():
    a = one(prompt=[0], temperature=0.0, repetition_penalty=2.0)
    b = one(prompt=[0, 0, 0, 0], temperature=0.0, repetition_penalty=2.0)
    assert reported(a, V).tolist() == reported(b, V).tolist()


def test_presence_penalty_counts_generated_tokens_only():
    # The prompt is ignored: step 1 is the raw softmax. After token 0: l0 = 2 - 1.5 = .5 -> token 1;
    # then l1 = -.5 -> [.5, -.5, .5, -1, 0] -> token 0; presence does not grow, so 0 again.
    tok = one(prompt=[0, 0, 0], temperature=0.0, presence_penalty=1.5)
    np.testing.assert_allclose(reported(tok, V), softmax([2.0, 1.0, 0.5, -1.0, 0.0]), rtol=1e-12)
    assert run_steps(4, prompt=[0, 0, 0], presence_penalty=1.5) == [0, 1, 0, 0]


def test_frequency_penalty_counts_repeats():
    # f = .6: l0 = 2, 1.4, .8 -> tokens 0, 0, then 1 (1.0 > .8); then l1 = .4 -> 0; then l0 = .2 -> 2 (.5).
    assert run_steps(5, prompt=[0, 0, 0], frequency_penalty=0.6) == [0, 0, 1, 0, 2]


def test_penalties_combined_match_reference():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, 40).astype(np.float32)
    run_steps(12, prompt=[1, 2, 3, 3], logits=logits, repetition_penalty=1.3, presence_penalty=0.4,
              frequency_penalty=0.3, logit_bias=((5, 2.0), (6, -1.0)))  # fmt: skip


def test_logit_bias_forces_and_bans():
    s = Sampler(SamplingParams(seed=1, logit_bias=((3, 100.0),)), V, [])
    draws = [s.sample(LOGITS) for _ in range(300)]
    assert all(d.token_id == 3 for d in draws)
    assert draws[0].prob == 1.0 and -1e-40 < draws[0].logprob <= 0.0  # others: ~e^-99 each

    s = Sampler(SamplingParams(seed=1, logit_bias={0: -100.0}), V, [])
    assert all(s.sample(LOGITS).token_id != 0 for _ in range(3000))
    tok = one(logit_bias=((0, -100.0),))
    np.testing.assert_allclose(reported(tok, V), ref_dist(LOGITS, logit_bias=((0, -100.0),)), rtol=1e-12)


def test_logit_bias_repeated_id_last_pair_wins():
    a = one(temperature=0.0, logit_bias=((2, 5.0), (2, -1.0)))
    np.testing.assert_allclose(reported(a, V), softmax([2.0, 1.0, -0.5, -1.0, 0.0]), rtol=1e-12)


# ---- drawing ------------------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seed_different():
    logits = np.random.default_rng(3).normal(0, 1.5, 1000).astype(np.float32)

    def tokens(seed, **kw):
        s = Sampler(SamplingParams(seed=seed, **kw), logits.size, [1, 2, 3])
        return [s.sample(logits).token_id for _ in range(50)]

    assert tokens(123) == tokens(123)
    assert tokens(123) != tokens(124)
    kw = {"temperature": 0.8, "top_k": 200, "top_p": 0.9, "repetition_penalty": 1.2, "frequency_penalty": 0.5}
    assert tokens(5, **kw) == tokens(5, **kw)


def test_random_seed_is_reported_and_reproduces():
    s = Sampler(SamplingParams(), V, [])
    assert isinstance(s.seed, int) and 0 <= s.seed < 2**64
    a = [s.sample(LOGITS).token_id for _ in range(30)]
    s2 = Sampler(SamplingParams(seed=s.seed), V, [])
    assert [s2.sample(LOGITS).token_id for _ in range(30)] == a
    assert Sampler(SamplingParams(), V, []).seed != s.seed


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.8, "top_k": 3}])
def test_empirical_frequencies_match_distribution(kw):
    n = 20000
    s = Sampler(SamplingParams(seed=2024, **kw), V, [])
    counts = np.bincount([s.sample(LOGITS).token_id for _ in range(n)], minlength=V)
    ref = ref_dist(LOGITS, **kw)
    np.testing.assert_allclose(counts / n, ref, atol=0.01)
    assert counts[ref == 0].sum() == 0
    nz = ref > 0
    chi2 = float((((counts - n * ref) ** 2)[nz] / (n * ref[nz])).sum())
    assert chi2 < 18.47  # 99.9th percentile of chi-square with 4 degrees of freedom


# ---- reporting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_n", [0, 1, 3, 5])
def test_top_is_sorted_and_matches_distribution(top_n):
    logits = np.random.default_rng(11).normal(0, 2, 64).astype(np.float32)
    ref = ref_dist(logits, temperature=1.3)
    s = Sampler(SamplingParams(seed=9, temperature=1.3, top_n=top_n), logits.size, [])
    for _ in range(5):
        tok = s.sample(logits)
        assert len(tok.top) == top_n
        ids = [a.token_id for a in tok.top]
        assert ids == sorted(range(logits.size), key=lambda i: (-ref[i], i))[:top_n]
        for a in tok.top:
            assert isinstance(a, TokenProb)
            assert a.prob == pytest.approx(ref[a.token_id], rel=1e-12)
            assert math.exp(a.logprob) == pytest.approx(a.prob, rel=1e-12)
        assert tok.prob == pytest.approx(ref[tok.token_id], rel=1e-12)


def test_top_is_shorter_when_fewer_tokens_have_mass():
    logits = np.array([0.0, -np.inf, 1.0, -np.inf], dtype=np.float32)
    assert [a.token_id for a in one(logits).top] == [2, 0]
    assert [a.token_id for a in one(logits, top_k=1).top] == [2]
    s = Sampler(SamplingParams(seed=0), 4, [])
    assert {s.sample(logits).token_id for _ in range(200)} == {0, 2}


@pytest.mark.parametrize(
    "kw",
    [{}, {"temperature": 0.0}, {"temperature": 0.05}, {"top_k": 2, "top_p": 0.5}, {"min_p": 0.3}],
)
def test_sampled_prob_and_logprob_are_consistent(kw):
    s = Sampler(SamplingParams(seed=4, **kw), V, [])
    for _ in range(20):
        tok = s.sample(LOGITS)
        assert 0 < tok.prob <= 1
        assert math.isfinite(tok.logprob) and tok.logprob <= 0
        assert math.exp(tok.logprob) == pytest.approx(tok.prob, rel=1e-12)


def test_logprob_stays_finite_when_prob_underflows():
    logits = np.array([0.0, -800.0], dtype=np.float64)
    tok = one(logits, temperature=0.0, top_n=2)
    assert tok.prob == 1.0 and tok.logprob == 0.0
    assert [a.token_id for a in tok.top] == [0]  # p(1) underflows to 0 and is left out


def test_sampler_does_not_modify_logits():
    logits = np.random.default_rng(5).normal(0, 2, 100).astype(np.float32)
    before = logits.copy()
    kw = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.01, "repetition_penalty": 1.5,
              "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": ((3, 5.0),), "top_n": 5}  # fmt: skip
    s = Sampler(SamplingParams(seed=1, **kw), 100, list(range(30)))
    for _ in range(10):
        s.sample(logits)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, before)


def test_bad_logits_raise():
    s = Sampler(SamplingParams(), 3, [])
    for bad in ([0.0, np.nan, 1.0], [-np.inf] * 3, [0.0, np.inf, 1.0]):
        with pytest.raises(ValueError, match="finite"):
            s.sample(np.array(bad, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        s.sample(np.zeros(4, dtype=np.float32))


def test_top_n_probs_is_plain_softmax():
    ref = softmax([2.0, 1.0, 0.5, -1.0, 0.0])
    got = top_n_probs(LOGITS, 3)
    assert [a.token_id for a in got] == [0, 1, 2]
    for a in got:
        assert a.prob == pytest.approx(ref[a.token_id], rel=1e-12)
        assert a.logprob == pytest.approx(math.log(ref[a.token_id]), rel=1e-12)
    assert len(top_n_probs(LOGITS, 50)) == V
    assert top_n_probs(LOGITS, 0) == ()


# ---- validation ---------------------------------------------------------------------------------------

BAD = [
    ("max_new_tokens", 0),
    ("max_new_tokens", 2.5),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_k", -1),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 10.5),
    ("presence_penalty", -2.5),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", 2.5),
    ("logit_bias", ((5, 1.0),)),  # vocab is 5
    ("logit_bias", ((-1, 1.0),)),
    ("logit_bias", ((0, 100.5),)),
    ("logit_bias", ((0, -100.5),)),
    ("logit_bias", ((0, float("inf")),)),
    ("logit_bias", ((0, float("nan")),)),
    ("logit_bias", ((0,),)),
    ("seed", -1),
    ("seed", 2**64),
    ("stop", ("",)),
    ("stop", ("x" * 257,)),
    ("stop", ("x",) * 17),
    ("stop_token_ids", (5,)),
    ("stop_token_ids", (-1,)),
    ("top_n", -1),
    ("top_n", 21),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={str(v)[:20]}" for f, v in BAD])
def test_validate_rejects(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(InvalidParameter) as info:
        params.validate(vocab_size=V, max_top_n=20)
    assert info.value.field == field
    assert field in str(info.value)
    with pytest.raises(InvalidParameter):  # the Sampler validates too
        Sampler(params, V, [])


def test_validate_message_names_field_value_and_range():
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(top_p=1.5).validate(V)
    assert str(info.value) == "top_p must be in (0, 1], got 1.5"
    assert isinstance(info.value, ValueError)
    again = pickle.loads(pickle.dumps(info.value))
    assert again.field == "top_p" and str(again) == str(info.value)


GOOD_EDGES = [
    {"max_new_tokens": 1},
    {"temperature": 0.0},
    {"temperature": 100.0},
    {"top_p": 1.0, "min_p": 1.0},
    {"top_p": 1e-9, "min_p": 0.0},
    {"repetition_penalty": 10.0},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"logit_bias": ((0, -100.0), (4, 100.0))},
    {"seed": 0},
    {"seed": 2**63},
    {"seed": 2**64 - 1},
    {"stop": ("x" * 256,) * 16, "stop_token_ids": (0, 4)},
    {"top_n": 20},
]


@pytest.mark.parametrize("kw", GOOD_EDGES)
def test_validate_accepts_edges(kw):
    SamplingParams(**kw).validate(vocab_size=V, max_top_n=20)


def test_params_normalize_lists_and_dicts():
    p = SamplingParams(stop=["a"], stop_token_ids=[1, 2], logit_bias={3: 1.0})
    assert p.stop == ("a",) and p.stop_token_ids == (1, 2) and p.logit_bias == ((3, 1.0),)
    hash(p)


def test_prompt_ids_out_of_range_raise():
    with pytest.raises(ValueError, match="prompt"):
        Sampler(SamplingParams(), V, [0, 5])


def test_samplers_hold_no_vocabulary_sized_buffers_of_their_own():
    """A live sequence's Sampler used to hold three float64 [vocab] scratch buffers (1.2 MB at SmolLM2's
    vocabulary): 500 streams, 600 MB. They are now one set per thread, shared."""
    vocab = 49152
    logits = np.zeros(vocab, dtype=np.float32)
    tracemalloc.start()
    try:
        samplers = [Sampler(SamplingParams(seed=i, top_p=0.9), vocab, [1, 2, 3]) for i in range(50)]
        for s in samplers:
            s.sample(logits)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 2 * 3 * vocab * 8  # one shared set (and change), not 50


def test_interleaved_samplers_draw_as_they_do_alone():
    """Sharing the scratch leaves nothing of one Sampler's draw in the next one's."""
    rng = np.random.default_rng(0)
    steps = [rng.normal(size=V * 20).astype(np.float32) for _ in range(12)]
    kw = [
        {"seed": 1, "temperature": 0.8, "top_p": 0.9, "top_n": 3},
        {"seed": 2, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "top_n": 2},
    ]

    def draws(params, order):
        samplers = [Sampler(SamplingParams(**p), V * 20, [1, 2]) for p in params]
        return [samplers[i].sample(steps[k]) for k, i in order]

    alone = [draws([p], [(k, 0) for k in range(12)]) for p in kw]
    together = draws(kw, [(k, i) for k in range(12) for i in (0, 1)])
    assert together[0::2] == alone[0] and together[1::2] == alone[1]
