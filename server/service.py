"""The gRPC servicer: protobuf in, engine calls, protobuf out. The only server module that touches `_pb2`.

Handlers run on the asyncio event loop and never compute: they translate protobuf into the engine's terms and
delegate to the Frontend (server/frontend.py, shared with the HTTP app), which validates, tokenizes, submits to
the engine thread and relays its outputs. A handler that ends for any reason (done, client cancel, deadline,
disconnect) cancels its sequence in `finally`, so the engine drops it at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from nextword.kernels import isa
from nextword.server.engine import Distribution, Step
from nextword.server.frontend import Frontend, RequestError, engine_failure, invalid
from nextword.server.interceptors import note, sanitize
from nextword.server.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc

log = logging.getLogger("nextword.requests")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
SAMPLING_FIELDS = [f.name for f in pb.SamplingParams.DESCRIPTOR.fields]
OPTIONAL_SAMPLING_FIELDS = [f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.has_presence]
FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
    "stop": pb.FINISH_REASON_STOP,
    "stop_token": pb.FINISH_REASON_STOP_TOKEN,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "time": pb.FINISH_REASON_TIME,
    "lines": pb.FINISH_REASON_LINES,
    "superseded": pb.FINISH_REASON_SUPERSEDED,
}
DEFAULTS = SamplingParams()
MAX_EMBED_TEXTS = 64
MAX_EMBED_TOKENS = 1024  # all texts of one Embed together: the engine stops for each text's forward
MAX_ATTENTION_TOKENS = 512  # the [T, T] matrix, and L x H x T x T weights to compute
MAX_NEAREST_TERMS = 16
# Flow control: a stream whose events wait unsent (the client does not read: gRPC's window is full) is paused
# in the engine past this many, resumed when half are sent, and cancelled after the engine's max_paused_s.
MAX_UNSENT_EVENTS = 32
MAX_DROPPED_IDS = 64  # a Session's requests superseded before they started, still to be answered
MAX_TERM_WEIGHT = 1e6  # 16 terms of this weight sum far below float32's range (embeddings are ~1)


def _status(error: RequestError) -> grpc.Status:
    """The rich status of a refused request: the code, the message, the field (proto path) and retry hint."""
    details = []
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=_proto_field(error.field), description=error.message
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if error.retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(int(error.retry_after_s * 1000))
        details.append(_pack(retry))
    code = getattr(code_pb2, error.code.name)
    return rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=details))


def _pack(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


class InferenceService(nextword_pb2_grpc.InferenceServicer):
    def __init__(self, frontend: Frontend, max_request_bytes: int):
        self.frontend = frontend
        self.max_request_bytes = max_request_bytes
        self.metrics = frontend.metrics
        self._sessions: set[asyncio.Queue] = set()  # the inboxes of the open Sessions

    @property
    def runner(self):
        return self.frontend.runner

    @property
    def draining(self) -> bool:
        return self.frontend.draining

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE); each Session stops reading and ends after its live request."""
        self.frontend.draining = True
        for inbox in self._sessions:
            inbox.put_nowait(("end", None))

    def _engine(self):
        return self.frontend.engine()

    async def _abort(self, context, error: RequestError):
        self.metrics.observe_error(error.code.name)
        await context.abort_with_status(_status(error))

    # ---- the RPCs ----

    async def Generate(self, request, context):
        try:
            async for event in self._generate(request):
                yield event
        except RequestError as e:
            await self._abort(context, e)

    async def Complete(self, request, context):
        try:
            events = [e async for e in self._generate(request)]
        except RequestError as e:
            await self._abort(context, e)
        return pb.CompleteResponse(
            request_id=events[-1].request_id,
            text="".join(e.text for e in events),
            tokens=[e.token for e in events if e.HasField("token")],
            finish=events[-1].finish,
        )

    async def NextTokenProbabilities(self, request, context):
        try:
            engine = self._engine()
            prompt = await self._prompt(request.prompt)
            params = SamplingParams(top_n=request.top_n)
            dist: Distribution = await self.frontend.next_output(prompt, params, probs_only=True)
        except RequestError as e:
            await self._abort(context, e)
        return pb.NextTokenProbabilitiesResponse(
            top=[self._token_prob(t) for t in dist.top],
            logprobs=dist.logprobs.astype("<f4").tobytes() if request.full_vocabulary else b"",
            prompt_tokens=dist.prompt_tokens,
            vocab_size=engine.config.vocab_size,
        )

    async def Score(self, request, context):
        try:
            tok = self._engine().tokenizer
            prompt = await self._prompt(request.prompt, add_generation_prompt=False)
            started = time.perf_counter()
            scores = await self.frontend.score(prompt, request.top_n, request.window, request.stride)
        except RequestError as e:
            await self._abort(context, e)
        log.info(
            "score: %d tokens in %d windows, perplexity %.3f, %.0f ms",
            len(prompt),
            scores.windows,
            scores.perplexity,
            _ms_since(started),
        )
        tops = scores.top or [()] * len(scores.token_ids)
        return pb.ScoreResponse(
            tokens=[
                pb.ScoredToken(
                    index=index,
                    id=token_id,
                    text=tok.token_text(token_id),
                    logprob=logprob,
                    rank=rank,
                    top=[self._token_prob(t) for t in top],
                )
                for index, token_id, logprob, rank, top in zip(
                    scores.positions.tolist(),
                    scores.token_ids.tolist(),
                    scores.logprobs.tolist(),
                    scores.ranks.tolist(),
                    tops,
                    strict=True,
                )
            ],
            sum_logprob=scores.sum_logprob,
            perplexity=scores.perplexity,
            prompt_tokens=scores.prompt_tokens,
            window=scores.window,
            stride=scores.stride,
            windows=scores.windows,
        )

    async def Tokenize(self, request, context):
        try:
            tok = self._engine().tokenizer
            which = request.WhichOneof("input")
            if which == "chat":
                ids = await self._chat_ids(request.chat, "chat")
            elif request.text:
                ids = await self.frontend.encode_text(request.text, "text")
            else:
                raise invalid("text", "give text or chat messages to tokenize")
        except RequestError as e:
            await self._abort(context, e)
        tokens = await self.frontend.off_loop(len(ids), lambda: [tok.token_text(i) for i in ids])
        return pb.TokenizeResponse(ids=ids, tokens=tokens)

    async def Detokenize(self, request, context):
        try:
            engine = self._engine()
            self._check_ids(request.ids, "ids")
        except RequestError as e:
            await self._abort(context, e)
        text = engine.tokenizer.decode(request.ids, skip_special_tokens=request.skip_special_tokens)
        return pb.DetokenizeResponse(text=text)

    async def ModelInfo(self, request, context):
        try:
            engine = self._engine()
        except RequestError as e:
            await self._abort(context, e)
        c, tok = engine.config, engine.tokenizer
        defaults = pb.SamplingParams(
            **{f: getattr(DEFAULTS, f) for f in OPTIONAL_SAMPLING_FIELDS if getattr(DEFAULTS, f) is not None}
        )
        return pb.ModelInfoResponse(
            model_id=engine.model_id,
            architecture=c.model_type,
            vocab_size=c.vocab_size,
            context_length=engine.max_context,
            eos_token_ids=sorted(engine.eos_ids),
            special_tokens=[pb.SpecialToken(id=i, text=tok.token_text(i)) for i in sorted(tok.special_ids)],
            has_chat_template=bool(tok.chat_template),
            weights_format=engine.weights_format,
            parameters=engine.model.checkpoint.num_parameters,
            kernel_path=isa.target().kernels,
            instruction_set=f"{isa.target().isa} (LLVM cpu {isa.target().cpu})",
            kv_cache_dtype=engine.cache.dtype,
            limits=pb.Limits(
                max_top_n=engine.max_top_n,
                max_stop_strings=MAX_STOP_STRINGS,
                max_stop_chars=MAX_STOP_CHARS,
                max_request_bytes=self.max_request_bytes,
                kv_cache_tokens=engine.blocks.num_blocks * engine.blocks.block_size,
                max_queue=engine.max_queue,
                max_batch_tokens=engine.max_batch_tokens,
                max_embed_texts=MAX_EMBED_TEXTS,
                max_embed_tokens=MAX_EMBED_TOKENS,
                max_attention_tokens=min(MAX_ATTENTION_TOKENS, engine.max_context),
            ),
            defaults=pb.Defaults(sampling=defaults, max_new_tokens=DEFAULTS.max_new_tokens),
        )

    # ---- inspection: the model's insides, computed on the engine thread between two steps ----
    # (nextword.kernels.inspect is imported by the first inspection RPC: a server that never inspects does
    # not hold its 1.4 MiB)

    async def Embed(self, request, context):
        from nextword.kernels import inspect as inspection

        try:
            engine = self._engine()
            c, tok = engine.config, engine.tokenizer
            if not 1 <= len(request.texts) <= MAX_EMBED_TEXTS:
                raise invalid("texts", f"give 1 to {MAX_EMBED_TEXTS} texts, got {len(request.texts)}")
            layer = request.layer if request.HasField("layer") else None
            if layer is not None and layer > c.num_layers:
                raise invalid(
                    "layer", f"layer must be in 0..{c.num_layers} (0: the input embeddings), got {layer}"
                )
            token_ids = []
            for i, text in enumerate(request.texts):
                if not text:
                    raise invalid(f"texts[{i}]", f"texts[{i}] is empty")
                token_ids.append(await self.frontend.encode_text(text, f"texts[{i}]"))
                if len(token_ids[-1]) > engine.max_context:
                    raise invalid(
                        f"texts[{i}]",
                        f"texts[{i}] has {len(token_ids[-1])} tokens; the context is {engine.max_context}",
                    )
            total = sum(map(len, token_ids))
            if total > MAX_EMBED_TOKENS:
                raise invalid(
                    "texts", f"the texts have {total} tokens together; Embed takes {MAX_EMBED_TOKENS}"
                )
            started = time.perf_counter()

            def embed_all(model):  # one layer of one text per chunk
                results = []
                for ids in token_ids:
                    results.append((yield from inspection.embed_chunks(model, ids, layer)))
                return results

            results = await self._inspect(embed_all, engine.model)
        except RequestError as e:
            await self._abort(context, e)
        note(detail=f"{len(token_ids)} texts, {total} tokens, {_ms_since(started):.0f} ms")
        texts = [
            pb.TextEmbedding(
                token_ids=ids,
                tokens=[tok.token_text(t) for t in ids],
                token_embeddings=b"" if rows is None else rows.astype("<f4").tobytes(),
                sentence_embedding=sentence.astype("<f4").tobytes(),
            )
            for ids, (rows, sentence) in zip(token_ids, results, strict=True)
        ]
        return pb.EmbedResponse(texts=texts, dim=c.hidden_size, num_layers=c.num_layers)

    async def NearestTokens(self, request, context):
        from nextword.kernels import inspect as inspection

        try:
            engine = self._engine()
            tok = engine.tokenizer
            if not 1 <= len(request.terms) <= MAX_NEAREST_TERMS:
                raise invalid("terms", f"give 1 to {MAX_NEAREST_TERMS} terms, got {len(request.terms)}")
            ids, weights = [], []
            for i, term in enumerate(request.terms):
                which = term.WhichOneof("token")
                if which is None:
                    raise invalid(f"terms[{i}]", f"terms[{i}] needs a token_id or a text")
                if which == "text" and not term.text:
                    raise invalid(f"terms[{i}].text", f"terms[{i}].text is empty")
                if which == "token_id":
                    self._check_ids([term.token_id], f"terms[{i}].token_id")
                ids.append(term.token_id if which == "token_id" else tok.encode(term.text)[0])
                weights.append(term.weight if term.HasField("weight") else 1.0)
                if not abs(weights[-1]) <= MAX_TERM_WEIGHT:  # the sum must stay finite in float32
                    raise invalid(
                        f"terms[{i}].weight",
                        f"terms[{i}].weight must be finite, in [-{MAX_TERM_WEIGHT:g}, {MAX_TERM_WEIGHT:g}]",
                    )
            if not 1 <= request.top_n <= engine.max_top_n:
                raise invalid("top_n", f"top_n must be in 1..{engine.max_top_n}, got {request.top_n}")
            exclude = () if request.include_terms else ids

            def nearest(model):
                query = inspection.token_sum(model, ids, weights)
                best, cosines = inspection.nearest_tokens(model, query, request.top_n, exclude)
                return inspection.cosine(model, query, ids), best, cosines

            own, best, cosines = await self._inspect(nearest, engine.model)
        except RequestError as e:
            await self._abort(context, e)

        def similarity(token_id, cos) -> pb.TokenSimilarity:
            return pb.TokenSimilarity(token_id=token_id, text=tok.token_text(token_id), cosine=cos)

        return pb.NearestTokensResponse(
            terms=[similarity(i, c) for i, c in zip(ids, own.tolist(), strict=True)],
            nearest=[similarity(i, c) for i, c in zip(best.tolist(), cosines.tolist(), strict=True)],
        )

    async def Attention(self, request, context):
        from nextword.kernels import inspect as inspection

        try:
            engine = self._engine()
            c = engine.config
            ids = await self._prompt(request.prompt)
            limit = min(MAX_ATTENTION_TOKENS, engine.max_context)
            if len(ids) > limit:
                raise invalid("prompt", f"the prompt has {len(ids)} tokens; Attention takes at most {limit}")
            layer = request.layer if request.HasField("layer") else None
            if layer is not None and not 1 <= layer <= c.num_layers:
                raise invalid("layer", f"layer must be in 1..{c.num_layers}, got {layer}")
            head = request.head if request.HasField("head") else None
            if head is not None and head >= c.num_heads:
                raise invalid("head", f"head must be in 0..{c.num_heads - 1}, got {head}")
            started = time.perf_counter()
            weights = await self._inspect(inspection.attention_chunks, engine.model, ids, layer, head)
        except RequestError as e:
            await self._abort(context, e)
        note(detail=f"{len(ids)} tokens, layer {layer}, head {head}, {_ms_since(started):.0f} ms")
        return pb.AttentionResponse(
            token_ids=ids,
            tokens=[engine.tokenizer.token_text(t) for t in ids],
            weights=weights.astype("<f4").tobytes(),
            num_layers=c.num_layers,
            num_heads=c.num_heads,
        )

    async def _inspect(self, fn, *args):
        """fn(*args) on the engine thread, between two steps (only that thread may touch the model)."""
        try:
            return await asyncio.wrap_future(self.runner.call(lambda: fn(*args)))
        except Exception as e:
            if self.draining:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down") from e
            log.exception("inspection failed")
            raise engine_failure(e) from e

    # ---- generation plumbing ----

    async def _generate(self, request):
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(gen, step):
            queue.put_nowait(step)
            if queue.qsize() >= MAX_UNSENT_EVENTS:  # the client is not reading: stop generating for it
                self.runner.pause(gen.seq)

        gen = await self._start(request, deliver)
        try:
            while True:
                step = await queue.get()
                if queue.qsize() <= MAX_UNSENT_EVENTS // 2:
                    self.runner.resume(gen.seq)
                event = gen.event(step)
                yield event
                if event.HasField("finish"):
                    return
        finally:
            gen.cancel_unless_finished()

    async def _start(self, request, deliver) -> _Generation:
        """Validate a GenerateRequest and submit it; each engine output is passed to deliver(gen, output)
        on the event loop."""
        self._engine()  # UNAVAILABLE while loading or draining
        gen = _Generation(self, request)
        note(request_id=gen.request_id)
        prompt = await self._prompt(request.prompt)
        params = self._sampling(request)
        gen.seq = self.frontend.submit(
            prompt, params, lambda out: deliver(gen, out), request_id=gen.request_id
        )
        return gen

    async def Session(self, request_iterator, context):
        inbox: asyncio.Queue = asyncio.Queue()  # ("request", None) | ("end", None) | (gen, step)
        # Only the newest request not yet started is kept: each one supersedes the last, so a flood of
        # requests (or a client that does not read its events) holds one request's memory and at most one
        # place in the engine's queue. The ids of the ones dropped get their SUPERSEDED event later (the
        # last MAX_DROPPED_IDS of them: a flood is not remembered in full either).
        pending: list = []
        dropped: deque[str] = deque(maxlen=MAX_DROPPED_IDS)

        async def read():
            async for request in request_iterator:
                if not pending:
                    inbox.put_nowait(("request", None))
                elif not isinstance(pending[0], RequestError):
                    dropped.append(pending[0].request_id)
                pending[:] = [request]
            inbox.put_nowait(("end", None))

        reader = asyncio.create_task(read())
        live: _Generation | None = None  # the request in flight
        ended = False
        self._sessions.add(inbox)
        try:
            while not (ended and live is None):
                tag, item = await inbox.get()
                if tag == "end":
                    ended = True
                elif tag == "request" and ended:  # draining: no new request
                    pending.clear()
                elif tag == "request":
                    item = pending.pop()
                    while dropped:
                        superseded = pb.Finish(reason=pb.FINISH_REASON_SUPERSEDED)
                        yield pb.SessionEvent(
                            generate=pb.GenerateEvent(request_id=dropped.popleft(), finish=superseded)
                        )
                    if isinstance(item, RequestError):  # malformed or oversized (server/guard.py)
                        yield _session_error("", item)
                        continue
                    if live is not None and live.continues_into(item):
                        self.metrics.continued.inc()
                        yield pb.SessionEvent(generate=live.supersede_event())
                        log.info(
                            "Session request id=%s: continued by the next request", sanitize(live.request_id)
                        )
                        catch_up = live.rename(item.request_id or uuid.uuid4().hex[:16], item.prompt.text)
                        if catch_up.text:
                            yield pb.SessionEvent(generate=catch_up)
                        continue
                    try:
                        gen = await self._start(item, lambda gen, step: inbox.put_nowait((gen, step)))
                    except RequestError as e:
                        yield _session_error(item.request_id, e)
                        continue
                    if live is not None:
                        self.runner.cancel(live.seq, "superseded")
                    live = gen
                else:  # an engine output of generation `tag`
                    gen, step = tag, item
                    if gen is not live and not getattr(step, "finish", None):
                        continue  # superseded: only its final event still matters
                    failed = isinstance(step, Exception)
                    if failed:
                        yield _session_error(gen.request_id, engine_failure(step))
                    else:
                        yield pb.SessionEvent(generate=gen.event(step))
                        if step.finish:  # a Session carries many requests: one line each
                            log.info(
                                "Session request id=%s: %s", sanitize(gen.request_id), _request_summary(step)
                            )
                    if gen is live and (failed or step.finish):
                        live = None
        finally:
            self._sessions.discard(inbox)
            reader.cancel()
            if live is not None:
                live.cancel_unless_finished()

    # ---- protobuf -> domain ----

    async def _prompt(self, prompt, add_generation_prompt: bool = True) -> list[int]:
        which = prompt.WhichOneof("input")
        if which is None:
            raise invalid("prompt", "prompt is required: set prompt.text, prompt.token_ids or prompt.chat")
        if which == "text":
            return await self.frontend.encode_text(prompt.text, "prompt.text")
        if which == "token_ids":
            return self._check_ids(prompt.token_ids.ids, "prompt.token_ids")
        return await self._chat_ids(prompt.chat, "prompt.chat", add_generation_prompt)

    async def _chat_ids(self, chat, field: str, add_generation_prompt: bool = True) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        return await self.frontend.encode_chat(
            messages, field + ".messages", add_generation_prompt, chat.special_tokens_in_content
        )

    def _check_ids(self, ids, field: str) -> list[int]:
        return self.frontend.check_ids(ids, field)

    def _sampling(self, request) -> SamplingParams:
        s = request.sampling
        given = {f: getattr(s, f) for f in OPTIONAL_SAMPLING_FIELDS if s.HasField(f)}
        given |= {
            "logit_bias": tuple(sorted(s.logit_bias.items())),
            "stop": tuple(s.stop),
            "stop_token_ids": tuple(s.stop_token_ids),
            "ignore_eos": s.ignore_eos,
            "top_n": request.top_n,
        }
        if request.HasField("max_new_tokens"):
            given["max_new_tokens"] = request.max_new_tokens
        given["max_time_s"] = request.max_time_ms / 1000
        given["max_lines"] = request.max_lines
        return SamplingParams(**given)

    # ---- domain -> protobuf ----

    def _token_prob(self, t) -> pb.TokenProb:
        text = self.runner.engine.tokenizer.token_text(t.token_id)
        return pb.TokenProb(token_id=t.token_id, text=text, prob=t.prob, logprob=t.logprob)

    def _token(self, step: Step, index: int, elapsed_ms: float) -> pb.Token:
        t = step.token
        return pb.Token(
            id=t.token_id,
            text=self.runner.engine.tokenizer.token_text(t.token_id),
            prob=t.prob,
            logprob=t.logprob,
            top=[self._token_prob(a) for a in t.top],
            index=index,
            elapsed_ms=elapsed_ms,
        )

    def _finish(self, step: Step, total_ms: float) -> pb.Finish:
        f = step.finish
        return pb.Finish(
            reason=FINISH_REASONS[f.reason],
            stop=f.stop or "",
            usage=pb.Usage(
                prompt_tokens=f.prompt_tokens,
                generated_tokens=f.generated_tokens,
                cached_prompt_tokens=f.cached_prompt_tokens,
            ),
            timings=pb.Timings(
                queue_ms=f.queue_s * 1000,
                prefill_ms=f.prefill_s * 1000,
                ttft_ms=f.ttft_s * 1000,
                mean_itl_ms=f.mean_itl_s * 1000,
                total_ms=total_ms,
            ),
            seed=f.seed,
        )


class _Generation:
    """One request's view of its engine sequence: turns its outputs into GenerateEvents (request id, token
    index, timings), and knows how a Session continues it under a newer request."""

    def __init__(self, service: InferenceService, request):
        self.service = service
        self.request_id = request.request_id or uuid.uuid4().hex[:16]
        self.prompt_text = request.prompt.text if request.prompt.WhichOneof("input") == "text" else None
        self.request_key = _request_key(request)
        self.seq = None
        self.produced = ""  # text handed out so far under this request id
        self.index = 0
        self.arrived = self.last = time.perf_counter()

    def event(self, step) -> pb.GenerateEvent:
        if isinstance(step, Exception):
            raise engine_failure(step)
        now = time.perf_counter()
        event = pb.GenerateEvent(request_id=self.request_id, text=step.text)
        self.produced += step.text
        if step.token is not None:
            event.token.CopyFrom(self.service._token(step, self.index, (now - self.last) * 1000))
            self.index, self.last = self.index + 1, now
        if step.finish:
            event.finish.CopyFrom(self.service._finish(step, (now - self.arrived) * 1000))
            self.service.metrics.observe_finish(step.finish)
            note(request_id=self.request_id, detail=_request_summary(step))
        return event

    def continues_into(self, request) -> bool:
        """Is `request` this one's prompt plus text this generation already produced (same parameters)?"""
        if self.seq.finished or self.seq.cancelled or self.prompt_text is None:
            return False
        if request.prompt.WhichOneof("input") != "text" or _request_key(request) != self.request_key:
            return False
        text = request.prompt.text
        return text.startswith(self.prompt_text) and self.produced.startswith(text[len(self.prompt_text) :])

    def supersede_event(self) -> pb.GenerateEvent:
        """The final event of this request id when a newer request takes over its generation."""
        seq, now = self.seq, time.perf_counter()
        finish = pb.Finish(
            reason=pb.FINISH_REASON_SUPERSEDED,
            usage=pb.Usage(
                prompt_tokens=len(seq.prompt_ids),
                generated_tokens=seq.generated,
                cached_prompt_tokens=seq.cached_prompt_tokens,
            ),
            timings=pb.Timings(total_ms=(now - self.arrived) * 1000),
            seed=seq.sampler.seed,
        )
        return pb.GenerateEvent(request_id=self.request_id, finish=finish)

    def rename(self, request_id: str, prompt_text: str) -> pb.GenerateEvent:
        """Continue under `request_id`; returns the event carrying the produced text not yet typed."""
        rest = self.produced[len(prompt_text) - len(self.prompt_text) :]
        self.request_id, self.prompt_text, self.produced, self.index = request_id, prompt_text, rest, 0
        self.arrived = self.last = time.perf_counter()
        return pb.GenerateEvent(request_id=request_id, text=rest)

    def cancel_unless_finished(self) -> None:
        """Cancelled, past its deadline, or disconnected: the engine drops the sequence at its next step."""
        if self.seq is not None and not self.seq.finished:
            self.service.runner.cancel(self.seq)
            self.service.metrics.observe_error("CANCELLED")
            note(detail=f"cancelled by the client after {self.index} tokens")


def _request_key(request) -> bytes:
    """Everything of a request but its id and prompt: two requests with equal keys generate alike."""
    rest = pb.GenerateRequest()
    rest.CopyFrom(request)
    rest.ClearField("prompt")
    rest.ClearField("request_id")
    return rest.SerializeToString(deterministic=True)


def _session_error(request_id: str, e: RequestError) -> pb.SessionEvent:
    field = _proto_field(e.field) if e.field else ""
    error = pb.SessionError(request_id=request_id, code=e.code.name, message=e.message, field=field)
    return pb.SessionEvent(error=error)


def _proto_field(name: str) -> str:
    """The proto path of a SamplingParams / engine field name."""
    if name in SAMPLING_FIELDS:
        return "sampling." + name
    return name


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _request_summary(step: Step) -> str:
    """What the access-log line of a generation says about it."""
    f = step.finish
    rate = 1 / f.mean_itl_s if f.mean_itl_s else 0.0
    return (
        f"{f.prompt_tokens} prompt ({f.cached_prompt_tokens} cached) + {f.generated_tokens} generated tokens, "
        f"finish={f.reason}, queue={f.queue_s * 1000:.0f} ms, ttft={f.ttft_s * 1000:.0f} ms, {rate:.1f} tokens/s"
    )
