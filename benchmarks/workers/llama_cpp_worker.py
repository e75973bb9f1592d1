"""One benchmark pass of llama.cpp (llama-cpp-python, 2 threads) on the same GGUF. Run with the peers venv's
python. Prints FIRST_TOKEN, then one JSON line (batch16 comes from llama-batched-bench, run separately)."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
import llama_cpp
from llama_cpp import Llama
from prompts import LONG_TEXT, MEDIUM_PROMPT, NEW_TOKENS, SHORT_PROMPT, rss_mib

gguf, threads = sys.argv[1], int(sys.argv[2])

# No weight repacking (llama-server's --no-repack): on a CPU that lists AMX, repacking picks ggml's AMX
# kernels, which segfault in the first decode on these VMs. The binding has no flag for it.
_default_params = llama_cpp.llama_cpp.llama_model_default_params


def _params_without_repack():
    params = _default_params()
    params.use_extra_bufts = False
    return params


llama_cpp.llama_cpp.llama_model_default_params = _params_without_repack
llm = Llama(
    model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=8192, n_batch=512, verbose=False
)
ids = llm.tokenize(SHORT_PROMPT.encode(), add_bos=False, special=True)
next(iter(llm.generate(ids, temp=0.0, top_k=1)))
print("FIRST_TOKEN", flush=True)
long_ids = llm.tokenize((LONG_TEXT * 80).encode(), add_bos=False, special=True)


def decode_tps(prompt_ids):
    llm.reset()
    times = []
    for _ in llm.generate(
        prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True
    ):
        times.append(time.perf_counter())
        if len(times) == NEW_TOKENS:
            break
    return (len(times) - 1) / (times[-1] - times[0])


def prefill_tps(prompt_ids):
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt_ids)
    llama_cpp.llama_synchronize(llm._ctx.ctx)
    return len(prompt_ids) / (time.perf_counter() - started)


def isa() -> str:
    """The widest x86 vector extension llama.cpp was built with (from its system info)."""
    info = llama_cpp.llama_print_system_info().decode()
    widest = next((f for f in ("AVX512", "AVX2", "AVX") if f"{f} = 1" in info), "baseline")
    return f"{widest.lower()} (llama.cpp build: {' '.join(x.strip() for x in info.split('|') if '= 1' in x)})"


medium = llm.tokenize(MEDIUM_PROMPT.encode(), add_bos=False, special=True)
decode_tps(medium[:16])  # warm-up
result = {
    "decode_short_tps": decode_tps(medium),
    "decode_long_tps": decode_tps(long_ids[:1000]),
    "decode_4k_tps": decode_tps(long_ids[:4000]),
    "prefill_512_tps": prefill_tps(long_ids[:512]),
}
result["isa"] = isa()
result["rss_mib"], result["peak_rss_mib"] = rss_mib()
print(json.dumps(result), flush=True)
