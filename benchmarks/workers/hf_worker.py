"""One benchmark pass of Hugging Face transformers (float32, CPU, 2 threads) on the float32 weights
dequantized from the same GGUF. Run with the peers venv's python. Prints FIRST_TOKEN, then one JSON line."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
import torch
from prompts import BATCH, BATCH_NEW_TOKENS, LONG_TEXT, MEDIUM_PROMPT, NEW_TOKENS, SHORT_PROMPT, rss_mib
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.inference_mode():
    model.generate(**tok(SHORT_PROMPT, return_tensors="pt"), max_new_tokens=1, do_sample=False)
print("FIRST_TOKEN", flush=True)
long_ids = tok(LONG_TEXT * 20, return_tensors="pt").input_ids


@torch.inference_mode()
def prefill_s(ids) -> float:
    started = time.perf_counter()
    model(ids, logits_to_keep=1)
    return time.perf_counter() - started


@torch.inference_mode()
def decode_tps(ids, batch=1, new=NEW_TOKENS) -> float:
    """Decode tokens/s: the whole generate minus one prefill of the same prompt."""
    ids = ids.repeat(batch, 1)
    started = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=tok.eos_token_id,
    )
    return batch * (new - 1) / (time.perf_counter() - started - prefill_s(ids))


medium = tok(MEDIUM_PROMPT, return_tensors="pt").input_ids
decode_tps(medium, new=8)  # warm-up
result = {
    "decode_short_tps": decode_tps(medium),
    "decode_long_tps": decode_tps(long_ids[:, :1000]),
    "prefill_512_tps": 512 / prefill_s(long_ids[:, :512]),
    "batch16_tps": decode_tps(medium, batch=BATCH, new=BATCH_NEW_TOKENS),
}
result["rss_mib"], result["peak_rss_mib"] = rss_mib()
print(json.dumps(result), flush=True)
