"""Make tests/golden/score.json: Hugging Face transformers' log-probability of every token of a few texts,
for the Score RPC's test.

Run with a Python that has transformers and torch (not nextword's dependencies; the peers venv of
../shared/peers has them), on the default model's float32 folder as nextword imported it:

    ~/.cache/nextword-peers/venv/bin/python tests/golden/make_score_golden.py ~/.cache/nextword/models/SmolLM2-135M-Instruct

The token ids come from the folder's tokenizer.json (the same ids nextword uses: tests/golden/smollm2.json
checks them against llama.cpp's); the model runs in float32 with eager attention, one forward over the whole
text; logprob[i] = log_softmax(logits[i - 1])[ids[i]] for i >= 1, computed in float64 from the float32 logits.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

ENGLISH = (Path(__file__).parents[2] / "benchmarks" / "data" / "english.txt").read_text()
TEXTS = [
    ENGLISH[:1500],  # prose, about 300 tokens
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])\n",
    (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of "
        "France is Paris.<|im_end|>\n"
    ),
]


def main() -> None:
    folder = Path(sys.argv[1]).expanduser()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cases = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()  # [T, V]
        logprobs = torch.log_softmax(logits[:-1], dim=-1)[torch.arange(len(ids) - 1), ids[1:]]
        cases.append({"text": text, "ids": ids, "logprobs": [round(x, 7) for x in logprobs.tolist()]})
    golden = {
        "made_by": "tests/golden/make_score_golden.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": folder.name,
        "cases": cases,
    }
    out = Path(__file__).parent / "score.json"
    out.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {out}: {sum(len(c['logprobs']) for c in cases)} token log-probabilities")


if __name__ == "__main__":
    main()
