"""The prompts every engine is measured on (the same texts as the peers' benchmark scripts)."""

SHORT_PROMPT = "The capital of France is"
# about 30 tokens with the SmolLM2 tokenizer
MEDIUM_PROMPT = (
    "In a quiet village at the edge of a great forest, an old clockmaker spent his "
    "evenings repairing broken watches and telling stories to the children who"
)
# repeated, then cut to an exact number of tokens (512 for prefill, 1000 for the long-context decode)
LONG_TEXT = (
    "The history of computing is a story of abstraction layered on abstraction. Early "
    "machines were programmed by rewiring panels; later, stored programs let the same "
    "hardware perform many tasks. Compilers translated human-readable code into machine "
    "instructions, operating systems shared scarce processors among many users, and "
    "networks connected distant computers into a single fabric. Each step hid complexity "
    "beneath a simpler interface, allowing people to build ever larger systems. Today, "
    "language models run on the same principles: matrices of numbers multiplied together "
    "billions of times, orchestrated by software that schedules memory, threads and caches. "
)
NEW_TOKENS = 128  # decode measurements generate this many tokens
BATCH = 16  # sequences of the aggregate decode measurement
BATCH_NEW_TOKENS = 64


def rss_mib() -> tuple[float, float]:
    """(resident, peak resident) MiB of this process."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]
