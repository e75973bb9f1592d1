"""The engine end to end on a tiny random Llama: generation against the reference forward, stop conditions,
seeds, batching, cancellation, validation and streaming detokenization."""

import re

import numpy as np
import pytest
import reference as ref
from tiny_models import write_tiny_model

from nextword.client.cli import main as cli_main
from nextword.server.engine import Engine, QueueFull
from nextword.server.sampling import InvalidParameter, SamplingParams
from nextword.server.tokenizer import IncrementalDecoder

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_model(path, "llama", seed=5)
    return path


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.load(folder, kv_cache_tokens=1024, block_size=4, max_top_n=8)


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def run(engine, prompt, params):
    steps = list(engine.generate(prompt, params))
    assert engine.live_sequences == 0 and engine.blocks.free_blocks == engine.blocks.num_blocks
    return steps


def test_greedy_generation_follows_the_reference_forward(engine, folder):
    ids = engine.tokenizer.encode(PROMPT)
    steps = run(engine, ids, greedy(max_new_tokens=12, ignore_eos=True, top_n=3))
    loaded, seq = ref.load_reference(folder), list(ids)
    for step in steps:
        logits = ref.reference_logits(loaded, seq)[-1]
        assert step.token.token_id == int(np.argmax(logits))
        probs = ref.softmax(logits)
        assert step.token.prob == pytest.approx(probs.max(), abs=1e-5)
        assert [t.token_id for t in step.token.top] == list(np.argsort(-probs)[:3])
        seq.append(step.token.token_id)
    assert steps[-1].finish.reason == "length" and steps[-1].finish.generated_tokens == 12
    assert "".join(s.text for s in steps) == engine.tokenizer.decode(seq[len(ids) :])


def test_plain_greedy_sequences_stepped_together_follow_the_reference(engine, folder):
    """Greedy without alternatives: the rows sampled together (sample_rows' batched path), into a logits buffer
    that the steps reuse, and again after the engine dropped it."""
    prompts = [engine.tokenizer.encode(p) for p in (PROMPT, "def add(a, b):", "x")]
    loaded = ref.load_reference(folder)
    for _ in range(2):
        outs = [[] for _ in prompts]
        for ids, out in zip(prompts, outs, strict=True):
            engine.submit(ids, greedy(max_new_tokens=6, ignore_eos=True), out.append)
        while engine.has_work():
            engine.step()
        for ids, out in zip(prompts, outs, strict=True):
            seq = list(ids)
            for step in out:
                probs = ref.softmax(ref.reference_logits(loaded, seq)[-1])
                assert step.token.token_id == int(np.argmax(probs))
                assert step.token.prob == pytest.approx(probs.max(), abs=1e-5)
                assert step.token.logprob == pytest.approx(np.log(probs.max()), abs=1e-4)
                seq.append(step.token.token_id)
            assert len(out) == 6
        engine.release_buffers()


def test_kv_cache_dtype_follows_the_weights_unless_set(folder):
    """auto: f16 keys and values with quantized weights, f32 with f32 weights; an explicit choice wins. The
    f16 cache's results against the float64 reference: tests/test_smollm2.py (real model), test_kernels.py."""
    dtypes = {w: Engine.load(folder, weights=w, kv_cache_tokens=64).cache.k[0].dtype for w in ("f32", "q4")}
    assert dtypes == {"f32": np.float32, "q4": np.uint16}
    assert Engine.load(folder, weights="q4", kv_cache_tokens=64, kv_cache_dtype="f32").cache.dtype == "f32"
    with pytest.raises(ValueError, match="KV-cache dtype 'f8'"):
        Engine.load(folder, kv_cache_tokens=64, kv_cache_dtype="f8")


def test_next_token_probabilities(engine, folder):
    ids = engine.tokenizer.encode(PROMPT)
    dist = engine.next_token_probabilities(ids, top_n=5)
    expect = ref.log_softmax(ref.reference_logits(folder, ids)[-1])
    np.testing.assert_allclose(dist.logprobs, expect, atol=1e-4)
    assert np.exp(dist.logprobs).sum() == pytest.approx(1.0, abs=1e-5)
    assert [t.token_id for t in dist.top] == list(np.argsort(-expect)[:5])
    assert engine.live_sequences == 0


def test_seed_reproduces_tokens_and_batch_mates_do_not_matter(engine):
    params = SamplingParams(temperature=1.5, seed=1234, max_new_tokens=15, ignore_eos=True)
    alone = [s.token.token_id for s in run(engine, PROMPT, params)]
    assert [s.token.token_id for s in run(engine, PROMPT, params)] == alone
    other = SamplingParams(temperature=1.5, seed=99, max_new_tokens=15, ignore_eos=True)
    assert [s.token.token_id for s in run(engine, PROMPT, other)] != alone

    # the same request batched with two others, stepped together
    outs = {name: [] for name in "abc"}
    ids = engine.tokenizer.encode(PROMPT)
    engine.submit(engine.tokenizer.encode("def add(a, b):"), other, outs["a"].append)
    engine.submit(ids, params, outs["b"].append)
    engine.submit(ids[:2], greedy(max_new_tokens=4), outs["c"].append)
    while engine.has_work():
        engine.step()
    assert [s.token.token_id for s in outs["b"]] == alone
    assert outs["a"][-1].finish and outs["c"][-1].finish.generated_tokens == 4


def test_stop_string_cuts_the_text(engine):
    full = "".join(s.text for s in run(engine, PROMPT, greedy(max_new_tokens=16, ignore_eos=True)))
    stop = full[5:8]
    assert stop and full.find(stop) == 5
    steps = run(engine, PROMPT, greedy(max_new_tokens=16, ignore_eos=True, stop=("zzzz-never", stop)))
    assert "".join(s.text for s in steps) == full[:5]
    assert steps[-1].finish.reason == "stop" and steps[-1].finish.stop == stop


def test_stop_token_eos_and_ignore_eos(engine):
    tokens = [s.token.token_id for s in run(engine, PROMPT, greedy(max_new_tokens=10, ignore_eos=True))]
    steps = run(engine, PROMPT, greedy(max_new_tokens=10, stop_token_ids=(tokens[2],)))
    assert steps[-1].finish.reason == "stop_token" and len(steps) == tokens.index(tokens[2]) + 1

    eos = engine.tokenizer.encode("<|im_end|>")[0]
    forced = greedy(max_new_tokens=5, logit_bias=((eos, 100.0),))
    steps = run(engine, PROMPT, forced)
    assert [s.finish.reason for s in steps if s.finish] == ["eos"] and len(steps) == 1 and steps[0].text == ""
    steps = run(engine, PROMPT, greedy(max_new_tokens=5, logit_bias=((eos, 100.0),), ignore_eos=True))
    assert len(steps) == 5 and steps[-1].finish.reason == "length"


def test_cancel_frees_the_sequence(engine):
    steps = engine.generate(PROMPT, greedy(max_new_tokens=50, ignore_eos=True))
    next(steps), next(steps)
    steps.close()  # the caller went away
    assert engine.live_sequences == 0 and engine.blocks.free_blocks == engine.blocks.num_blocks

    out = []
    seq = engine.submit(engine.tokenizer.encode(PROMPT), greedy(max_new_tokens=50), out.append)
    engine.step()
    engine.cancel(seq)
    engine.step()
    assert out[-1].finish.reason == "cancelled" and out[-1].token is None
    assert engine.live_sequences == 0


def test_each_block_is_released_once(engine):
    """Two sequences share cached prefix blocks; when one ends, every block the other holds stays in use
    (released once per holder, never freed under a live sequence), and all are free once both ended."""
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert len(prompt) > 2 * engine.blocks.block_size
    run(engine, prompt, greedy(max_new_tokens=1))  # its full blocks are now in the prefix cache
    short, long = [], []
    engine.submit(prompt, greedy(max_new_tokens=1), short.append)
    b = engine.submit(prompt, greedy(max_new_tokens=6, ignore_eos=True), long.append)
    engine.step()  # both admitted on the cached blocks; the short one ends here
    assert short[-1].finish and not long[-1].finish and b.cached_prompt_tokens > 0
    assert engine.blocks.used_blocks == len(set(b.blocks))  # the shared blocks are still held, by b
    while not long[-1].finish:
        engine.step()
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize(
    "prompt,params,field",
    [
        ([], greedy(), "prompt"),
        ([1, 5, 10_000], greedy(), "prompt"),
        ([1] * 100, greedy(max_new_tokens=29), "max_new_tokens"),
        ([1, 2], greedy(top_n=9), "top_n"),
        ([1, 2], SamplingParams(top_p=1.5), "top_p"),
        ([1, 2], SamplingParams(temperature=-1), "temperature"),
    ],
)
def test_invalid_requests_name_the_field(engine, prompt, params, field):
    with pytest.raises(InvalidParameter) as e:
        engine.submit(prompt, params, print)
    assert e.value.field == field
    assert engine.live_sequences == 0


def test_context_error_gives_both_counts(engine):
    with pytest.raises(
        InvalidParameter, match=r"prompt \(100 tokens\) \+ max_new_tokens \(29\) = 129 .* 128"
    ):
        engine.validate([1] * 100, greedy(max_new_tokens=29))


def test_incremental_decoding_never_splits_a_character(engine):
    tok = engine.tokenizer
    text = "héllo wörld 日本語 😀 ½"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters are split over byte tokens
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_cli_generate(folder, capsys, tmp_path):
    assert cli_main(["generate", PROMPT, "--model", str(folder), "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out and re.search(r"\[length; \d+ prompt \+ 6 generated tokens", err)
    write_tiny_model(tmp_path, "llama", seed=5, aligned=True)  # widths of 32s: --weights applies
    for weights in ("q4", "int8"):
        args = ["generate", PROMPT, "--model", str(tmp_path), "--max-new-tokens", "8", "--weights", weights]
        assert cli_main([*args, "--ignore-eos"]) == 0
        expect = Engine.load(tmp_path, weights=weights)
        assert expect.model.checkpoint.nbytes < Engine.load(tmp_path).model.checkpoint.nbytes  # quantized
        steps = expect.generate(PROMPT, greedy(max_new_tokens=8, ignore_eos=True))
        assert capsys.readouterr().out == "".join(s.text for s in steps)
    assert (
        cli_main(["generate", PROMPT, "--model", str(folder), "--show-probs", "--max-new-tokens", "3"]) == 0
    )
    out, _ = capsys.readouterr()
    assert len(out.strip().splitlines()) == 3 and "|" in out
    assert cli_main(["generate", PROMPT, "--model", str(folder), "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_prefix_cache_reuses_blocks_and_changes_no_result(engine, folder):
    long_prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    params = greedy(max_new_tokens=8, ignore_eos=True, top_n=3)
    first = run(engine, long_prompt, params)
    again = run(engine, long_prompt, params)
    # every prompt token but the last: full blocks shared, the last one's prompt part copied
    assert again[-1].finish.cached_prompt_tokens == len(long_prompt) - 1
    extended = long_prompt + [s.token.token_id for s in first[:3]]
    cont = run(engine, extended, params)  # its prompt reaches into the first request's generated blocks
    assert cont[-1].finish.cached_prompt_tokens > again[-1].finish.cached_prompt_tokens

    fresh = Engine.load(folder, kv_cache_tokens=1024, block_size=4, max_top_n=8)  # no cache to hit
    for steps, prompt in ((again, long_prompt), (cont, extended)):
        expect = run(fresh, prompt, params)
        assert [s.token.token_id for s in steps] == [s.token.token_id for s in expect]
        for a, b in zip(steps, expect, strict=True):
            assert a.token.prob == pytest.approx(b.token.prob, abs=1e-5)


def test_a_prompt_that_extends_a_released_one_computes_only_its_new_tokens(engine, folder):
    """An editor's keystroke: the same prompt plus a token, after the first request was cancelled mid-way.
    The part of the last block the first prompt filled is copied, not computed; results are unchanged."""
    prompt = engine.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n")
    block = engine.blocks.block_size
    prompt = prompt[: len(prompt) - len(prompt) % block + 2]  # ends 2 tokens into a block
    params = greedy(max_new_tokens=3, ignore_eos=True, top_n=3)
    first = []
    seq = engine.submit(prompt, greedy(max_new_tokens=50, ignore_eos=True), first.append)
    while not first:
        engine.step()
    engine.cancel(seq)
    while engine.has_work():
        engine.step()
    for typed in ([prompt[-1]], [prompt[-1], prompt[-2]]):
        longer = prompt + typed
        steps = run(engine, longer, params)
        assert steps[-1].finish.cached_prompt_tokens == len(longer) - 1
        fresh = Engine.load(folder, kv_cache_tokens=1024, block_size=block, max_top_n=8)
        expect = run(fresh, longer, params)
        assert [s.token.token_id for s in steps] == [s.token.token_id for s in expect]
        for a, b in zip(steps, expect, strict=True):
            assert a.token.prob == pytest.approx(b.token.prob, abs=1e-5)
    changed = prompt[:-1] + [prompt[-2], prompt[-1]]  # its last block's second token differs
    steps = run(engine, changed, params)
    assert steps[-1].finish.cached_prompt_tokens == len(prompt) - 1  # up to the changed token


def test_queue_bound(folder):
    small = Engine.load(folder, kv_cache_tokens=64, block_size=4, max_queue=2)
    ids = small.tokenizer.encode(PROMPT)
    outs = [[] for _ in range(3)]
    for out in outs[:2]:
        small.submit(ids, greedy(max_new_tokens=40, ignore_eos=True), out.append)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        small.submit(ids, greedy(max_new_tokens=40), outs[2].append)
    small.step()  # the first is admitted; the second waits: the cache holds 64 positions, not 2 x 55
    assert small.running_sequences == 1 and small.waiting_sequences == 1
    small.submit(ids, greedy(max_new_tokens=4), outs[2].append)  # room in the queue again
    while small.has_work():
        small.step()
    assert all(out[-1].finish for out in outs)
    assert small.blocks.free_blocks == small.blocks.num_blocks


def test_max_lines_and_max_time(engine):
    newline = engine.tokenizer.encode("\n")[0]
    params = greedy(max_new_tokens=20, ignore_eos=True, logit_bias=((newline, 6.0),), max_lines=2)
    steps = run(engine, PROMPT, params)
    text = "".join(s.text for s in steps)
    assert steps[-1].finish.reason == "lines" and text.count("\n") == 2 and text.endswith("\n")

    clock = engine.clock
    engine.clock = lambda: float(engine.steps)  # an injected clock: one second per engine step
    try:
        steps = run(engine, PROMPT, greedy(max_new_tokens=100, ignore_eos=True, max_time_s=3.0))
    finally:
        engine.clock = clock
    assert steps[-1].finish.reason == "time" and steps[-1].token is None  # at the 3rd step, before its token
    assert [s.token is not None for s in steps] == [True, True, False]
    assert steps[-1].finish.generated_tokens == 2


def test_scoring_is_a_prompt_pass_with_every_position_s_logits(folder):
    """Score against the reference forward: chunked over several steps (a small token budget, and
    MAX_SCORE_ROWS), beside a running generation, from a later token, with ranks and top-N; the prefix cache
    (warmed by an equal prompt) is not used, since every position's logits are needed."""
    engine = Engine.load(folder, kv_cache_tokens=1024, block_size=4, max_top_n=8, max_batch_tokens=7)
    ids = engine.tokenizer.encode(PROMPT + " jumps over the lazy dog and runs far away")
    expect = ref.log_softmax(ref.reference_logits(folder, ids))  # [T, V]
    list(engine.generate(ids, greedy(max_new_tokens=1)))  # fills the prefix cache with ids' blocks
    out = []
    mate = engine.submit(ids[:3], greedy(max_new_tokens=50, ignore_eos=True), lambda step: None)
    engine.submit(ids, SamplingParams(top_n=3), out.append, score_from=2)
    steps = 0
    while not out:
        engine.step()
        steps += 1
    scores = out[0]
    assert steps >= 3 and not mate.finished  # chunked, batched with the generation
    positions = np.arange(1, len(ids) - 1)  # row p predicts token p + 1, from token 2 on
    np.testing.assert_array_equal(scores.token_ids, ids[2:])
    np.testing.assert_allclose(scores.logprobs, expect[positions, ids[2:]], atol=1e-4)
    ranks = 1 + (expect[positions] > expect[positions, ids[2:]][:, None]).sum(axis=1)
    np.testing.assert_array_equal(scores.ranks, ranks)
    assert [[t.token_id for t in top] for top in scores.top] == [
        list(np.argsort(-e)[:3]) for e in expect[positions]
    ]
    assert scores.finish.reason == "scored" and scores.finish.prompt_tokens == len(ids)
    assert scores.finish.cached_prompt_tokens == 0
    engine.cancel(mate)
    engine.step()
    assert engine.live_sequences == 0 and engine.blocks.free_blocks == engine.blocks.num_blocks


def test_scoring_is_cancelled_at_the_next_step_and_validated(engine):
    ids = engine.tokenizer.encode(PROMPT + " jumps over the lazy dog")
    out = []
    seq = engine.submit(ids, SamplingParams(), out.append, score_from=1)
    engine.cancel(seq)
    engine.step()
    assert out[0].finish.reason == "cancelled" and engine.live_sequences == 0
    with pytest.raises(InvalidParameter, match="at least 2 tokens") as e:
        engine.submit(ids[:1], SamplingParams(), out.append, score_from=1)
    assert e.value.field == "prompt"
    with pytest.raises(InvalidParameter, match="exceeds the context") as e:
        engine.submit([1] * 1025, SamplingParams(), out.append, score_from=1)
    assert e.value.field == "prompt"


def test_steps_stay_within_their_time_budget_after_the_warm_up(tmp_path):
    """A machine on an injected clock: the first forward costs 2 s (the kernels load), later ones 5 ms + 1 ms
    per token. After the server's warm-up, a long prompt goes through in steps that each fit max_step_s:
    before, the warm-up's seconds were learned as every step's fixed cost, a token then looked free, and the
    steps doubled to max_batch_tokens (a whole second here, which every decoding stream waited for)."""
    from nextword.server.serve import _warm

    write_tiny_model(tmp_path, "llama", seed=5, context=1024)
    now, costs = [0.0], []
    engine = Engine.load(tmp_path, kv_cache_tokens=2048, max_step_s=0.2, clock=lambda: now[0])
    forward = engine.model.forward

    def timed_forward(cache, batch, out=None):
        cost = 2.0 if not costs else 0.005 + 0.001 * len(batch.token_ids)
        costs.append(cost)
        now[0] += cost
        return forward(cache, batch, out)

    engine.model.forward = timed_forward
    _warm(engine)
    warm_steps = len(costs)
    run(engine, [3 + i % 290 for i in range(900)], greedy(max_new_tokens=2))
    serving = costs[warm_steps:]
    assert costs[0] == 2.0 and len(serving) >= 5  # the prompt took several steps
    assert max(serving) <= engine.max_step_s
