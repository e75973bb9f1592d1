"""The model's own tokenizer (Hugging Face `tokenizers`), its chat template, and streaming detokenization."""

from __future__ import annotations

import functools
import json
import re
import secrets
from pathlib import Path

import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from nextword.weights.config import ModelError


class Tokenizer:
    """Text <-> token ids exactly as the reference (Hugging Face) tokenizer of the model does it."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{folder}: no tokenizer.json")
        self._path = path
        self._tok = HFTokenizer.from_file(str(path))
        self._token_texts: dict[int, str] = {}
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # some models keep several named templates
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        specials = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(specials)
        self._special_by_text = {text: i for i, text in specials.items()}
        longest_first = sorted(self._special_by_text, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first))) if specials else None
        eos = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids = frozenset() if eos is None else frozenset({eos})

    @functools.cached_property
    def _text_tok(self) -> HFTokenizer:
        """The tokenizer that keeps special-token strings as text (chat contents). Built on first use: only
        chat requests need it, and parsing tokenizer.json is ~0.1 s of a server's start."""
        tok = HFTokenizer.from_file(str(self._path))
        tok.encode_special_tokens = True
        # Only the handling of special tokens differs: both use one BPE model (its vocabulary and merges
        # are 10 MiB, most of a tokenizer's memory), and this one's copy is freed.
        tok.model = self._tok.model
        return tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) become their ids."""
        if len(text) <= 4096:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # encode_batch releases the GIL while it works (encode does not): a big text tokenized on a
        # worker thread then leaves the event loop and the engine running
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (U+FFFD where it holds only part of a UTF-8 character)."""
        text = self._token_texts.get(token_id)
        if text is None:  # cached: every streamed step asks for the texts of its top-N alternatives
            text = self._token_texts[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's template, as transformers' apply_chat_template does."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        try:
            return _compile_template(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise ValueError(str(e)) from None

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        special_tokens_in_content: bool = False,
    ) -> list[int]:
        """Token ids of a conversation. The template writes the special tokens itself, so none are added
        (transformers does the same). Message contents are text: a special token's string inside one stays
        text, unless `special_tokens_in_content` (transformers' behaviour: parsed like the template's)."""
        rendered = self.apply_chat_template(messages, add_generation_prompt)
        if special_tokens_in_content or self._special_re is None:
            return self.encode(rendered, add_special_tokens=False)
        # Render again with a marker for each content, to know which characters the template wrote.
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
        pieces = re.split(
            f"\ue000{nonce}:(\\d+)\ue001", self.apply_chat_template(marked, add_generation_prompt)
        )
        # pieces: template text, content index, template text, ...
        contents = [messages[int(i)]["content"] for i in pieces[1::2]]
        if "".join(p if k % 2 == 0 else contents[k // 2] for k, p in enumerate(pieces)) != rendered:
            # The template transforms contents (strip, escape...): we cannot tell its text from theirs.
            if any(self._special_re.search(str(c)) for c in contents):
                raise ValueError(
                    "a message contains a special token's text, which this template cannot keep apart"
                )
            return self.encode(rendered, add_special_tokens=False)
        # Split at the template's own special tokens only; each run between them (template text and the
        # contents inside it) is encoded whole with special-token strings as text, which gives the ids of
        # encoding everything at once whenever no content holds a special token's text.
        ids: list[int] = []
        run: list[str] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                run.append(contents[k // 2])
                continue
            at = 0
            for match in self._special_re.finditer(piece):
                run.append(piece[at : match.start()])
                ids += self._encode_text(run)
                ids.append(self._special_by_text[match.group()])
                run, at = [], match.end()
            run.append(piece[at:])
        return ids + self._encode_text(run)

    def _encode_text(self, parts: list[str]) -> list[int]:
        text = "".join(parts)
        return self._text_tok.encode(text, add_special_tokens=False).ids if text else []


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


_templates: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
    if source not in _templates:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        _templates[source] = env.from_string(source)
    return _templates[source]


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Byte-level tokens can end in the middle of a multi-byte character; decoding them alone gives U+FFFD. We
    decode a short window of recent tokens and only emit text once it no longer ends in a partial character
    (the approach of TGI and vLLM), so the concatenated deltas equal decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        self._tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:])  # a little context: some decoders strip a leading space
        self._prefix = len(self.ids)  # start of the window
        self._read = len(self.ids)  # tokens before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        before = self._tok.decode(self.ids[self._prefix : self._read])
        after = self._tok.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (an incomplete character, as U+FFFD)."""
        before = self._tok.decode(self.ids[self._prefix : self._read])
        after = self._tok.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]
