"""Sampling: one sequence's logits -> one token plus the probabilities it was drawn with.

NumPy, and one Numba kernel. The model never samples and sampling never touches the model: `Sampler.sample`
takes the float32 logits of one position and returns a `SampledToken`; `sample_rows` does the same for the
rows of a step's logits, the plain ones (see `Sampler.plain`) together, in parallel. Each `Sampler` owns its
own seeded `np.random.default_rng(seed)` and the token counts the penalties need, so one request's draws never
depend on another's.

Pipeline of `Sampler.sample`, in this order (all arithmetic in float64, on a copy of the logits):

  1. logit bias          l[id] += bias            (pairs from `logit_bias`; a repeated id: the last pair wins)
  2. repetition penalty  l > 0 -> l / r, else l * r, once per distinct id in prompt + generated tokens
  3. presence/frequency  l -= presence * (count > 0) + frequency * count, counts over generated tokens only
  4. temperature         l / T                    (T == 0 is greedy; see below)
  5. top-k               keep the k largest; ties at the cut go to the lowest ids, so exactly k are kept
  6. top-p               keep the smallest prefix, in order (prob desc, id asc), whose cumulative
                         probability is >= top_p (the boundary is inclusive: with probs .25 x 4 and
                         top_p = .5 two tokens are kept); computed on the top-k renormalized distribution
  7. min-p               keep p >= min_p * p_max
  8. softmax             over the kept tokens; filtered tokens get probability 0
  9. draw                `rng.random()` against the cumulative distribution of the kept tokens in id
                         order (so a seed reproduces the same tokens), or argmax when T == 0

Decisions:

- "The distribution it was drawn from" (`SampledToken.prob`, `.logprob`, `.top`) is the one after bias,
  penalties, temperature and the three filters. Filtered tokens have probability 0 and never appear in
  `top`; tokens whose probability underflows to 0 (e.g. -inf logits) do not appear either, so `top` can be
  shorter than `top_n`.
- Greedy (temperature 0) reports the distribution at temperature 1, with the filters applied, so the
  probabilities mean something; the token is its argmax, lowest id on ties (the filters always keep it).
- Softmax subtracts the max; probabilities are e / sum(e) and logprobs are (l - max) - log(sum(e)), i.e.
  logit - logsumexp, so exp(logprob) == prob up to rounding and logprobs stay finite when probs underflow.
- Logits that are NaN or +inf, or all -inf, raise ValueError (the max must be finite).
- `Sampler` calls `params.validate(vocab_size, max_top_n=vocab_size)`: everything but the service's cap
  on `top_n`, which the servicer checks with its own `max_top_n`. Prompt ids outside [0, vocab) raise
  ValueError.
- Cost: three float64 [vocab] scratch buffers (1.2 MB at vocab 49152) per thread, reused by every
  Sampler that thread runs: no page faults per token, and not 1.2 MB per live sequence (600 MB for 500
  streams). Per Sampler, only when penalties are on, a [vocab] seen-mask and counts. A Sampler is not
  thread-safe: one per sequence. Top-p avoids sorting the vocabulary when the mass sits in the top 128
  (then 1024, 8192, ...) tokens.
- A decode step of 16 sequences spent ~2 ms (7%) sampling them one by one in NumPy. The plain rows (no
  filter, penalty, bias or alternatives: greedy autocomplete, an OpenAI client's defaults) need only the
  argmax and the softmax's normalizer, and a draw the place where the cumulative mass crosses it.
  `sample_rows` takes the normalizers of all of them in one parallel kernel, in pieces of 256 ids
  (`exp_chunk_sums`, float64, its own vectorizing exp); a draw then finds its piece from those sums and
  its token within the piece. The same tokens as `sample` (a draw could differ only where rounding in a
  different order of summation moves the crossing: ~1e-16), the same probabilities to ~1e-15.
- Stop strings, stop token ids, `ignore_eos` and `max_new_tokens` are carried here but enforced by the
  generation loop.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from nextword.kernels.softmax import SUM_CHUNK, exp_chunk_sums

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
_TOP_P_FIRST = 128  # top-p looks at this many candidates first, then 8x more until the mass is reached


class InvalidParameter(ValueError):
    """A sampling parameter is out of range. `.field` is the field name; str(e) names field and value."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def __reduce__(self):
        return (type(self), (self.field, str(self)))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling knobs. Lists are accepted and stored as tuples; `logit_bias` may be a dict."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus; 1 = off; in (0, 1]
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; [0, 1]
    repetition_penalty: float = 1.0  # HF/CTRL, over prompt + generated: logit > 0 -> /r, else *r; > 0
    presence_penalty: float = 0.0  # OpenAI, over generated only: -= presence * (count > 0); [-2, 2]
    frequency_penalty: float = 0.0  # -= frequency * count; [-2, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias) added to logits; bias in [-100, 100]
    seed: int | None = None  # None = a random seed, reported back as Sampler.seed
    stop: tuple[str, ...] = ()  # stop strings (checked by the engine, on text)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_n: int = 0  # alternatives to report per step
    max_time_s: float = 0.0  # stop after this long from submission (engine-enforced); 0 = no limit
    max_lines: int = 0  # stop once the output holds this many newlines (engine-enforced); 0 = no limit

    def __post_init__(self):
        bias = self.logit_bias
        if isinstance(bias, dict):
            bias = bias.items()
        if not isinstance(bias, tuple):
            try:
                object.__setattr__(self, "logit_bias", tuple(tuple(p) for p in bias))
            except TypeError:
                pass  # left as given; validate() reports it
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list | np.ndarray):
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def validate(self, vocab_size: int, max_top_n: int = 20) -> None:
        """Raise InvalidParameter(field, message) on the first bad field, in declaration order."""
        _check_int("max_new_tokens", self.max_new_tokens, lo=1)
        _check_real("temperature", self.temperature, "[0, 100]", lambda v: 0 <= v <= 100)
        _check_int("top_k", self.top_k, lo=0, note=" (0 = off)")
        _check_real("top_p", self.top_p, "(0, 1]", lambda v: 0 < v <= 1)
        _check_real("min_p", self.min_p, "[0, 1]", lambda v: 0 <= v <= 1)
        _check_real("repetition_penalty", self.repetition_penalty, "(0, 10]", lambda v: 0 < v <= 10)
        _check_real("presence_penalty", self.presence_penalty, "[-2, 2]", lambda v: -2 <= v <= 2)
        _check_real("frequency_penalty", self.frequency_penalty, "[-2, 2]", lambda v: -2 <= v <= 2)
        if not isinstance(self.logit_bias, tuple):
            raise InvalidParameter(
                "logit_bias", f"logit_bias must be (token_id, bias) pairs, got {self.logit_bias!r}"
            )
        for pair in self.logit_bias:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise InvalidParameter(
                    "logit_bias", f"logit_bias must be (token_id, bias) pairs, got {pair!r}"
                )
            tok, bias = pair
            _check_id("logit_bias", tok, vocab_size, what="logit_bias token id")
            _check_real(
                "logit_bias", bias, "[-100, 100]", lambda v: -100 <= v <= 100, what=f"logit_bias[{tok}]"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=2**64 - 1, rng="None or in [0, 2**64)")
        if not isinstance(self.stop, tuple):
            raise InvalidParameter("stop", f"stop must be a sequence of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameter(
                "stop", f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                shown = f"{len(s)} characters" if isinstance(s, str) and s else repr(s)
                raise InvalidParameter(
                    "stop",
                    f"stop strings must be non-empty str of at most {MAX_STOP_CHARS} characters, got {shown}",
                )
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidParameter(
                "stop_token_ids", f"stop_token_ids must be a sequence, got {self.stop_token_ids!r}"
            )
        for tok in self.stop_token_ids:
            _check_id("stop_token_ids", tok, vocab_size)
        if not isinstance(self.ignore_eos, bool | np.bool_):
            raise InvalidParameter("ignore_eos", f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        _check_real("max_time_s", self.max_time_s, "[0, 3600] (0 = no limit)", lambda v: 0 <= v <= 3600)
        _check_int("max_lines", self.max_lines, lo=0, note=" (0 = no limit)")
        _check_int("top_n", self.top_n, lo=0, hi=max_top_n)


def _check_int(field, value, lo, hi=None, note="", rng=None):
    if rng is None:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise InvalidParameter(field, f"{field} must be an integer {rng}{note}, got {_show(value)}")
    if value < lo or (hi is not None and value > hi):
        raise InvalidParameter(field, f"{field} must be {rng}{note}, got {value}")


def _check_real(field, value, rng, ok, what=None):
    what = what or field
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise InvalidParameter(field, f"{what} must be in {rng}, got {_show(value)}")


def _show(value) -> str:
    return str(value) if isinstance(value, Real) else repr(value)  # np.float64(1.5) -> 1.5, "5" -> '5'


def _check_id(field, value, vocab_size, what=None):
    what = what or field
    if not isinstance(value, Integral) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise InvalidParameter(field, f"{what} must be in [0, {vocab_size}), got {_show(value)}")


@dataclass(frozen=True)
class TokenProb:
    """One alternative: a token and its probability in the reported distribution."""

    token_id: int
    prob: float
    logprob: float


@dataclass(frozen=True)
class SampledToken:
    """The drawn token, its probability, and the top-N of the same (filtered) distribution."""

    token_id: int
    prob: float  # probability of the token in the distribution it was drawn from (see module docstring)
    logprob: float
    top: tuple[TokenProb, ...]  # most likely first; len == top_n, or fewer if fewer have p > 0


class Sampler:
    """Per-sequence sampling state: the seeded generator and the token counts for the penalties."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int]):
        params.validate(vocab_size, max_top_n=vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(64)
        self.rng = np.random.default_rng(self.seed)

        bias = dict(params.logit_bias)  # a repeated id: the last pair wins
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.intp, count=len(bias))  # [n_bias]
        self._bias_vals = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))  # [n_bias]

        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab_size):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        self._use_rep = params.repetition_penalty != 1.0
        self._use_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        if self._use_rep:
            self._seen = np.zeros(vocab_size, dtype=bool)  # [vocab] in prompt or generated
            self._seen[prompt] = True
            self._seen_ids = np.flatnonzero(self._seen)  # [n_seen] distinct ids, ascending
        if self._use_counts:
            self._counts = np.zeros(vocab_size, dtype=np.int64)  # [vocab] generated-token counts
            self._gen_ids = np.zeros(0, dtype=np.intp)  # [n_gen] distinct generated ids
        # nothing but the temperature shapes the distribution, and nothing but the token is reported
        self.plain = (
            not bias
            and not self._use_rep
            and not self._use_counts
            and not 0 < params.top_k < vocab_size
            and params.top_p == 1.0
            and params.min_p == 0.0
            and params.top_n == 0
        )

    def sample(self, logits: np.ndarray) -> SampledToken:
        """Draw one token from `logits` (float32 [vocab], not modified) and record it for the penalties."""
        p = self.params
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"logits must have shape ({self.vocab_size},), got {logits.shape}")
        x, e_buf, cum_buf = _scratch(self.vocab_size)
        # x: [vocab] our own float64 copy; the caller's array is never written
        np.copyto(x, logits)
        self._apply_bias_and_penalties(x)

        m = x.max()
        if not np.isfinite(m):
            raise ValueError(f"logits must have a finite maximum, got {m}")
        greedy = p.temperature == 0
        z = x
        z -= m  # [vocab] shifted logits, max exactly 0
        if not greedy and p.temperature != 1.0:
            z /= p.temperature  # the max stays exactly 0

        keep = None  # ids still in play, ascending; None = all of them
        if 0 < p.top_k < z.size:
            keep = _top_set(z, p.top_k)
            z = z[keep]  # [k]
        e = np.exp(z, out=e_buf[: z.size])  # [n_keep] unnormalized probs, max exactly 1
        if p.top_p < 1.0:
            sel = _top_p_set(e, p.top_p)
            keep, z, e = _narrow(keep, sel), z[sel], e[sel]
        if p.min_p > 0.0:
            sel = np.flatnonzero(e >= p.min_p)  # p / p_max == e / 1
            keep, z, e = _narrow(keep, sel), z[sel], e[sel]

        total = e.sum()  # in [1, n_keep]
        log_total = math.log(total)
        if greedy:
            j = int(np.argmax(e))  # lowest id on ties, since the kept ids are ascending
        else:
            cum = np.cumsum(e, out=cum_buf[: e.size])  # [n_keep] in id order
            j = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
            j = min(j, cum.size - 1)  # guards rounding at the top end; a zero-mass token is never picked
        token = j if keep is None else int(keep[j])

        top = ()
        if p.top_n > 0:
            order = _ordered(e, _top_set(e, p.top_n))
            order = order[e[order] > 0]
            ids = order if keep is None else keep[order]
            top = tuple(
                TokenProb(int(t), float(e[i] / total), float(z[i] - log_total))
                for t, i in zip(ids, order, strict=True)
            )
        self._record(token)
        return SampledToken(token, float(e[j] / total), float(z[j] - log_total), top)

    def _plain(self, logits: np.ndarray, best: int, chunk_sums: np.ndarray) -> SampledToken:
        """A plain sampler's draw from `logits`, given their argmax and chunk_sums [ceil(vocab / SUM_CHUNK)]:
        sum(exp((logits - max) / T)) over each chunk of SUM_CHUNK ids (T = 1 when greedy)."""
        total, m = float(chunk_sums.sum()), float(logits[best])
        if not (math.isfinite(total) and math.isfinite(m)):
            return self.sample(logits)  # NaN or +inf logits, or all -inf: sample() says which
        log_total = math.log(total)
        if self.params.temperature == 0:
            return SampledToken(best, 1.0 / total, -log_total, ())
        t = self.params.temperature
        target = self.rng.random() * total
        cum = np.cumsum(chunk_sums)  # [chunks] mass up to the end of each chunk, in id order
        c = int(np.searchsorted(cum, target, side="right"))  # the chunk whose mass crosses target
        if c == len(cum):  # rounding at the top end: the last chunk with mass
            c = int(np.flatnonzero(chunk_sums > 0)[-1])
        start = c * SUM_CHUNK
        z = (logits[start : start + SUM_CHUNK].astype(np.float64) - m) / t  # [<= SUM_CHUNK]
        e = np.exp(z)
        j = int(np.searchsorted((cum[c - 1] if c else 0.0) + np.cumsum(e), target, side="right"))
        if j == len(e):  # rounding again: the chunk's last token with mass (never one without)
            j = int(np.flatnonzero(e > 0)[-1])
        return SampledToken(start + j, float(e[j]) / total, float(z[j]) - log_total, ())

    def _apply_bias_and_penalties(self, x: np.ndarray) -> None:
        p = self.params
        if self._bias_ids.size:
            x[self._bias_ids] += self._bias_vals
        if self._use_rep and self._seen_ids.size:
            v = x[self._seen_ids]
            r = p.repetition_penalty
            x[self._seen_ids] = np.where(v > 0, v / r, v * r)
        if self._use_counts and self._gen_ids.size:
            x[self._gen_ids] -= p.presence_penalty + p.frequency_penalty * self._counts[self._gen_ids]

    def _record(self, token: int) -> None:
        if self._use_rep and not self._seen[token]:
            self._seen[token] = True
            self._seen_ids = np.append(self._seen_ids, token)
        if self._use_counts:
            if self._counts[token] == 0:
                self._gen_ids = np.append(self._gen_ids, token)
            self._counts[token] += 1


def sample_rows(samplers: Sequence[Sampler], logits: np.ndarray, rows: Sequence[int]) -> list[SampledToken]:
    """samplers[i].sample(logits[rows[i]]) for every i (logits: float32 [R, vocab]), the plain ones together:
    their argmaxes, then their softmax normalizers, in pieces, in one parallel kernel."""
    tokens: list[SampledToken | None] = [None] * len(samplers)
    plain = [i for i, s in enumerate(samplers) if s.plain]
    if plain:
        picked = np.asarray([rows[i] for i in plain], dtype=np.int64)  # [n] rows of logits
        if len(picked) == len(logits):  # every row (a decode step): one call
            best = np.argmax(logits, axis=1)[picked]  # the first of the largest: lowest id on ties
        else:
            best = np.array([np.argmax(logits[r]) for r in picked], dtype=np.int64)
        shift = logits[picked, best].astype(np.float64)  # [n] each row's max
        temperature = np.array([samplers[i].params.temperature or 1.0 for i in plain])  # greedy reports T = 1
        chunk_sums = np.empty((len(plain), -(-logits.shape[1] // SUM_CHUNK)))  # [n, chunks] float64
        exp_chunk_sums(chunk_sums, logits, picked, shift, 1.0 / temperature)
        for k, i in enumerate(plain):
            tokens[i] = samplers[i]._plain(logits[picked[k]], int(best[k]), chunk_sums[k])
    for i, s in enumerate(samplers):
        if tokens[i] is None:
            tokens[i] = s.sample(logits[rows[i]])
    return tokens


_per_thread = threading.local()


def _scratch(vocab_size: int) -> np.ndarray:
    """This thread's [3, vocab] float64 scratch (adjusted logits, exp, cumulative mass), shared by its
    Samplers: a sample() uses it only until it returns, and fresh 400 KB arrays cost page faults per token."""
    buffers = _per_thread.__dict__.setdefault("by_vocab", {})
    if vocab_size not in buffers:
        buffers[vocab_size] = np.empty((3, vocab_size), dtype=np.float64)
    return buffers[vocab_size]


def top_n_probs(logits: np.ndarray, n: int) -> tuple[TokenProb, ...]:
    """The n most likely tokens under a plain softmax of the raw logits, most likely first.

    Ties go to the lowest id; tokens with probability 0 (e.g. -inf logits) are left out.
    """
    z = logits.astype(np.float64).reshape(-1)  # [vocab]
    m = z.max()
    if not np.isfinite(m):
        raise ValueError(f"logits must have a finite maximum, got {m}")
    if n <= 0:
        return ()
    z -= m
    e = np.exp(z)  # [vocab]
    total = e.sum()
    log_total = math.log(total)
    order = _ordered(e, _top_set(e, n))
    order = order[e[order] > 0]
    return tuple(TokenProb(int(i), float(e[i] / total), float(z[i] - log_total)) for i in order)


def _top_set(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest values of x, ascending; ties at the cut go to the lowest positions."""
    n = x.size
    if k >= n:
        return np.arange(n)
    kth = np.partition(x, n - k)[n - k]  # the k-th largest value
    mask = x > kth  # [n]
    mask[np.flatnonzero(x == kth)[: k - np.count_nonzero(mask)]] = True
    return np.flatnonzero(mask)


def _ordered(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """idx sorted by x descending, then by position ascending."""
    return idx[np.lexsort((idx, -x[idx]))]


def _top_p_set(e: np.ndarray, top_p: float) -> np.ndarray:
    """Positions (ascending) of the smallest prefix, by (prob desc, position asc), with mass >= top_p.

    Only the sorted *values* are needed to find the prefix length (tied values give the same cumulative
    sums in any order); the set itself is then the top-n_keep set with ties to the lowest positions.
    The largest _TOP_P_FIRST values are tried first, widening 8x until they hold the mass, so a peaked
    distribution costs a partition rather than a sort of the whole vocabulary.
    """
    probs = e / e.sum()
    n = probs.size
    m = min(_TOP_P_FIRST, n)
    while True:
        vals = np.partition(probs, n - m)[n - m :] if m < n else probs  # [m] the m largest, unordered
        cum = np.cumsum(np.sort(vals)[::-1])  # [m] cumulative mass, largest first
        if cum[-1] >= top_p or m == n:
            break
        m = min(8 * m, n)
    n_keep = min(int(np.searchsorted(cum, top_p, side="left")) + 1, m)  # first index with cum >= top_p
    return _top_set(probs, n_keep)


def _narrow(keep: np.ndarray | None, sel: np.ndarray) -> np.ndarray:
    return sel if keep is None else keep[sel]
