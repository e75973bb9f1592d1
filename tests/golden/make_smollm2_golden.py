"""Make tests/golden/smollm2.json: what the reference implementations say about SmolLM2-135M-Instruct.

Run with a Python that has llama-cpp-python, transformers and torch (not nextword's dependencies; the peers
venv of ../shared/peers has them):

    ~/.cache/nextword-peers/venv/bin/python tests/golden/make_smollm2_golden.py GGUF_FILE

- token ids: llama.cpp's tokenizer on the GGUF (its `smollm` pre-tokenizer splits digits like the original
  SmolLM2 tokenizer.json). transformers' own GGUF import builds a plain ByteLevel pre-tokenizer instead, so its
  ids are recorded too, only to show where they differ;
- chat prompts: rendered by transformers' apply_chat_template with the GGUF's template, tokenized by llama.cpp;
- next-token top-10 log-probabilities and greedy 32-token continuations: transformers (float32, eager) on the
  weights it dequantizes itself from the same GGUF, fed the llama.cpp token ids. The smallest gap between the
  best and second-best logit along each greedy path is recorded, so a test can tell a real mismatch from a
  near-tie.
"""

import hashlib
import json
import sys
from pathlib import Path

import llama_cpp
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The capital of France is",
    "Hello, world!",
    "hello world",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\ttabs",
    "line one\nline two\n\nline four",
    "\n\n\n",
    "    indented code",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)",
    '<html><body class="main">Hi</body></html>',
    '{"key": [1, 2.5, -3e10], "nested": {"a": null}}',
    "SELECT name, COUNT(*) FROM users WHERE age >= 21 GROUP BY name;",
    "2024-11-26T05:36:18Z",
    "3.14159265358979",
    "1234567890",
    "The year 1969, the price $19.99, and 100% of 42.",
    "0x1F 0b1010 1e-9 -273.15",
    "½ ¼ ²",
    "x² + y² = z²",
    "H₂O and CO₂",
    "⅓ cup of sugar, ¾ of flour",
    "Ⅻ o'clock",
    "١٢٣ ٤٥٦",
    "०१२३",
    "Café, naïve, résumé, façade, Ångström",
    "Straße, Größe, übermäßig",
    "¿Dónde está la biblioteca? ¡Aquí!",
    "Привет, как дела?",
    "Γειά σου Κόσμε",
    "שלום עולם",
    "مرحبا بالعالم",
    "日本語のテキストです。",
    "中文文本，包括标点符号。",
    "한국어 문장입니다.",
    "ไทย ภาษา",
    "Emoji: 😀 🎉 👍🏽 🇫🇷",
    "👨‍👩‍👧‍👦 family",
    "I'm, you're, he's, we'll, they'd, it's",
    "DON'T SHOUT, I'M LISTENING",
    "snake_case camelCase PascalCase kebab-case",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com",
    "a  b   c    d",
    "!!!???...,,,;;;",
    "--- *** ___ === +++",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
    "mixed 123abc456def 7.8.9",
    "αβγ ∑∫∂ ≤≥≠ ∞",
    "© ® ™ § ¶ † ‡",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after a special token",
    "Supercalifragilisticexpialidocious",
    "antidisestablishmentarianism",
    "A" * 40,
    " ",
    "a",
    "9",
    "\r\nwindows line endings\r\n",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name 3 primes."},
        {"role": "assistant", "content": "2, 3, 5."},
        {"role": "user", "content": "Two more?"},
    ],
]

PROMPTS = [
    "The capital of France is",
    "In a quiet village at the edge of a great forest, an old clockmaker spent his evenings",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Once upon a time, there was a little robot who",
    "import numpy as np\n\n# Create a 3x3 identity matrix\n",
    "The Python programming language was created by",
]

TOP = 10
NEW = 32


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(gguf_path: str) -> None:
    gguf_path = Path(gguf_path)
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    hf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    torch.set_num_threads(2)

    def llama_ids(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    tokens = []
    for text in TEXTS:
        ids = llama_ids(text)
        hf = hf_tok(text, add_special_tokens=False).input_ids
        tokens.append({"text": text, "ids": ids, "transformers_gguf_ids": hf if hf != ids else "same"})
    chats = []
    for messages in CHATS:
        rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chats.append({"messages": messages, "rendered": rendered, "ids": llama_ids(rendered)})

    prompts = []
    with torch.inference_mode():
        for text in PROMPTS:
            ids = llama_ids(text)
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            top = torch.topk(logprobs, TOP)
            seq, min_gap = list(ids), float("inf")
            for _ in range(NEW):  # greedy, no stop: nextword runs this with ignore_eos
                logits = model(torch.tensor([seq])).logits[0, -1]
                best = torch.topk(logits, 2).values
                min_gap = min(min_gap, float(best[0] - best[1]))
                seq.append(int(logits.argmax()))
            prompts.append(
                {
                    "text": text,
                    "ids": ids,
                    "top_ids": top.indices.tolist(),
                    "top_logprobs": [round(x, 6) for x in top.values.tolist()],
                    "greedy_ids": seq[len(ids) :],
                    "greedy_min_logit_gap": round(min_gap, 6),
                }
            )
            print(f"{text[:40]!r}: gap {min_gap:.4f} -> {hf_tok.decode(seq[len(ids) :])!r}")

    out = {
        "made_by": "tests/golden/make_smollm2_golden.py",
        "gguf_sha256": file_sha256(gguf_path),  # the file these goldens were made from
        "versions": {
            "llama_cpp_python": llama_cpp.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "tokens": tokens,
        "chats": chats,
        "prompts": prompts,
    }
    path = Path(__file__).with_name("smollm2.json")
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    differ = sum(t["transformers_gguf_ids"] != "same" for t in tokens)
    print(f"wrote {path}: {len(tokens)} strings ({differ} where transformers' GGUF tokenizer differs)")


if __name__ == "__main__":
    main(sys.argv[1])
