"""Per-kernel breakdown of one engine step: where the time of a decode (or prefill) step goes.

    python benchmarks/profile_step.py [--weights q4] [--context 30] [--batch 1] [--prefill 0] [--extend 0]
                                      [--steps 50] [--isa avx2]

Wraps every kernel that the forward pass calls with a timer (a few hundred ns of overhead per call,
reported), runs warm steps, and prints milliseconds per step by kernel.
"""

import argparse
import time
from collections import defaultdict

import numpy as np

from nextword.kernels import gpt2, llama
from nextword.kernels.isa import ISAS, reexec_as, target
from nextword.server.engine import Engine
from nextword.server.sampling import SamplingParams
from nextword.weights.default_model import ensure_default_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model folder (default: the default model)")
    ap.add_argument("--weights", default="q4", choices=["f32", "int8", "q4"])
    ap.add_argument("--context", type=int, default=30, help="prompt tokens before the measured steps")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--prefill", type=int, default=0, help="measure one prefill of this many tokens instead")
    ap.add_argument(
        "--extend",
        type=int,
        default=0,
        help="measure instead prompts that add this many tokens to a cached --context one (an editor's keystroke)",
    )
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument(
        "--isa", choices=ISAS, help="compile the kernels for this instruction set (default: host)"
    )
    args = ap.parse_args()
    if args.isa:
        reexec_as(args.isa)

    engine = Engine.load(args.model or ensure_default_model(progress=None), weights=args.weights)
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for module in (llama, gpt2):
        for name in [n for n in dir(module) if not n.startswith("_")]:
            fn = getattr(module, name)
            if callable(fn) and (hasattr(fn, "signatures") or name == "linear"):
                setattr(module, name, _timed(fn, name, totals, calls))

    text = "The history of computing is a story of abstraction layered on abstraction. " * 200
    ids = engine.tokenizer.encode(text)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.steps + 2, ignore_eos=True)
    if args.prefill:
        engine.next_token_probabilities(ids[: args.prefill], 1)  # warm
        totals.clear(), calls.clear()
        t0 = time.perf_counter()
        engine.next_token_probabilities([7] + ids[: args.prefill - 1], 1)
        wall, steps = time.perf_counter() - t0, 1
    elif args.extend:
        engine.next_token_probabilities(ids[: args.context], 1)  # now in the prefix cache
        prompts = [ids[: args.context] + [100 + s] * args.extend for s in range(args.steps + 1)]
        engine.next_token_probabilities(prompts[-1], 1)  # warm
        totals.clear(), calls.clear()
        t0 = time.perf_counter()
        for prompt in prompts[:-1]:
            engine.next_token_probabilities(prompt, 1)
        wall, steps = time.perf_counter() - t0, args.steps
    else:
        for b in range(args.batch):
            engine.submit([b + 100] + ids[: args.context - 1], params, lambda out: None)
        while engine.steps < 3 or engine.last_batch[1] != args.batch:  # prefill done, decoding
            engine.step()
        totals.clear(), calls.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall, steps = time.perf_counter() - t0, args.steps
    kernel_total = sum(totals.values())
    if args.prefill:
        what = f"prefill of {args.prefill} tokens"
    elif args.extend:
        what = f"prompts of {args.extend} new tokens"
    else:
        what = f"decode, batch {args.batch}"
    print(
        f"{engine.model_id} {args.weights} on {target()}, {what}, context {args.context}: {wall / steps * 1000:.2f} ms/step"
    )
    print(f"{'kernel':<18}{'ms/step':>9}{'calls':>7}{'share':>8}")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{name:<18}{t / steps * 1000:9.3f}{calls[name] // steps:7d}{t / wall:8.1%}")
    rest = wall - kernel_total
    print(
        f"{'(outside kernels)':<18}{rest / steps * 1000:9.3f}{'':7}{rest / wall:8.1%}  sampling, batching, Python"
    )


def _timed(fn, name, totals, calls):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        totals[name] += time.perf_counter() - t
        calls[name] += 1
        return result

    return wrapper


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
