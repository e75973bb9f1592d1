"""Another stream's inter-token gap while a long request holds work for the engine.

    python benchmarks/engine_gap.py [--weights q4] [--repeats 2]

A stream decodes (greedy, ignore_eos) on a fresh `nextword serve`; while it does, one long request runs:
NextTokenProbabilities on ~2,000 tokens, Attention on 512 tokens, Embed on 1,024 tokens. The gaps between
the stream's tokens received during that request are reported (p50 / p99 / max, ms), with the request's own
time. The engine sizes each step in time (ServerConfig.max_step_ms) and runs inspections a layer at a time
between steps, so the gap stays near the step budget instead of the whole request's time.
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from prompts import LONG_TEXT
from serving import start_server

from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc


def gaps_during(stub, long_call) -> tuple[list[float], float]:
    stream = stub.Generate(
        pb.GenerateRequest(
            prompt=pb.Prompt(text="Once upon a time"),
            max_new_tokens=4000,
            sampling=pb.SamplingParams(ignore_eos=True, temperature=0.0),
        )
    )
    next(stream)
    done = threading.Event()
    took = []

    def run():
        t = time.perf_counter()
        long_call()
        took.append(time.perf_counter() - t)
        done.set()

    threading.Thread(target=run).start()
    gaps, last = [], time.perf_counter()
    for _ in stream:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        if done.is_set():
            break
    stream.cancel()
    done.wait()
    return gaps, took[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    proc, target, _ = start_server(args.weights)
    long_text = LONG_TEXT * 40
    try:
        with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = nextword_pb2_grpc.InferenceStub(ch)
            ids = stub.Tokenize(pb.TokenizeRequest(text=long_text)).ids
            calls = {
                "NextTokenProbabilities, 2,000 tokens": lambda r: stub.NextTokenProbabilities(
                    pb.NextTokenProbabilitiesRequest(
                        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids[r : r + 2000]))
                    )
                ),
                "Attention, 512 tokens": lambda r: stub.Attention(
                    pb.AttentionRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids[:512])))
                ),
                "Embed, 1,024 tokens": lambda r: stub.Embed(
                    pb.EmbedRequest(texts=[stub.Detokenize(pb.DetokenizeRequest(ids=ids[:1000])).text])
                ),
            }
            print("| long request | its time (s) | gaps | gap p50 (ms) | gap p99 (ms) | gap max (ms) |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, call in calls.items():
                gaps, took = [], 0.0
                for r in range(args.repeats):
                    # a different prompt each time: no prefix-cache hit
                    g, t = gaps_during(stub, lambda r=r, call=call: call(r))
                    gaps += g
                    took += t
                gaps.sort()
                p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]
                print(
                    f"| {name} | {took / args.repeats:.1f} | {len(gaps)} | {statistics.median(gaps) * 1000:.0f} | "
                    f"{p99 * 1000:.0f} | {gaps[-1] * 1000:.0f} |",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
