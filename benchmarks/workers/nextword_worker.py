"""One benchmark pass of nextword in this process: prints FIRST_TOKEN as soon as a first token exists (the
orchestrator times process start -> that line), then one JSON line of measurements."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from prompts import BATCH, BATCH_NEW_TOKENS, LONG_TEXT, MEDIUM_PROMPT, NEW_TOKENS, SHORT_PROMPT, rss_mib

from nextword.kernels.isa import target
from nextword.server.engine import Engine
from nextword.server.sampling import SamplingParams
from nextword.weights.default_model import ensure_default_model

weights, salt = (
    sys.argv[1],
    int(sys.argv[2]),
)  # salt: a different first token per pass, so no prefix is cached
engine = Engine.load(ensure_default_model(progress=None), weights=weights, kv_cache_tokens=8192)
next(engine.generate(SHORT_PROMPT, SamplingParams(temperature=0.0, max_new_tokens=1)))
print("FIRST_TOKEN", flush=True)

tok = engine.tokenizer
long_ids = tok.encode(LONG_TEXT * 80)


def decode_tps(prompt_ids: list[int]) -> float:
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    times = [time.perf_counter() for _ in engine.generate(prompt_ids, params)]
    return (len(times) - 1) / (times[-1] - times[0])


def prefill_tps(ids: list[int]) -> float:
    started = time.perf_counter()
    engine.next_token_probabilities(ids, top_n=1)
    return len(ids) / (time.perf_counter() - started)


def batch_tps() -> float:
    """Aggregate tokens/s of BATCH sequences decoding together (after all of them have their first token)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=BATCH_NEW_TOKENS, ignore_eos=True)
    outs = [[] for _ in range(BATCH)]
    for i, out in enumerate(outs):
        engine.submit([salt + 1000 + i] + tok.encode(MEDIUM_PROMPT), params, out.append)
    while not all(outs):  # every prompt processed
        engine.step()
    started, before = time.perf_counter(), sum(map(len, outs))
    while engine.has_work():
        engine.step()
    return (sum(map(len, outs)) - before) / (time.perf_counter() - started)


decode_tps([salt] + tok.encode(MEDIUM_PROMPT)[:16])  # warm-up
result = {
    "decode_short_tps": decode_tps([salt + 1] + tok.encode(MEDIUM_PROMPT)),
    "decode_long_tps": decode_tps([salt + 2] + long_ids[:999]),
    "decode_4k_tps": decode_tps([salt + 4] + long_ids[:3999]),
    "prefill_512_tps": prefill_tps([salt + 3] + long_ids[:511]),
    "batch16_tps": batch_tps(),
}
result["rss_mib"], result["peak_rss_mib"] = rss_mib()
result["isa"] = str(target())
result["weights_mib"] = engine.model.checkpoint.nbytes / 2**20
print(json.dumps(result), flush=True)
