"""The bridge between the asyncio server and the synchronous engine.

One background thread owns the ``LLMEngine``: nothing else touches it (its tokenizer included). The
event loop hands it work through an inbox of callables (admit a request, abort one, run a function
between steps); the thread applies the inbox, runs one ``step()``, and posts each request's new text to
that request's asyncio queue with a single ``loop.call_soon_threadsafe`` per step.

Requests are bounded: at most ``max_num_seqs`` sequences run and at most ``max_waiting`` more wait; a
request that would go past that is refused with QueueFull (429) instead of growing an unbounded queue.

Streaming text never shows part of a stop string: while a choice with stop strings is unfinished, its
last ``len(longest stop) - 1`` characters are held back (the engine cuts a stop string only once it is
complete).

Echo: a choice's first delta, sent once its first token is generated (its prompt is scored by then),
starts with the prompt's text and, when asked for, its tokens' log-probabilities. With ``max_tokens`` 0
the engine still generates one token, which is never sent: the answer is the prompt alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from ..engine.sequence import SamplingParams, Sequence
from .errors import EngineFailure, InvalidRequest, QueueFull, ServiceUnavailable
from .token_text import TokenText

if TYPE_CHECKING:
    from ..engine.llm import LLMEngine

log = logging.getLogger("atomq.serve")


@dataclass(frozen=True)
class GenerationRequest:
    """What one HTTP request asks of the engine: ``n`` choices for each prompt.

    params: how to sample (its max_tokens and seed are set per choice from the fields below; with
    ``prompt_logprobs`` the prompt's tokens are scored too);
    max_tokens: per choice; None = up to the end of the context; 0 (with echo) = the prompt alone. Choice
    j of a prompt samples with ``params.seed + j`` (when seeded), so the n choices differ but are
    reproducible.
    add_special_tokens: passed to the tokenizer for string prompts (False for rendered chat templates,
    which carry their own BOS).
    echo: every choice starts with its prompt (a string as it came, token ids as their exact text).
    """

    prompts: list[str | list[int]]
    params: SamplingParams
    n: int = 1
    max_tokens: int | None = 16
    add_special_tokens: bool = True
    echo: bool = False

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class TokenInfo:
    """One token as the client sees it: its text, exact bytes, log-probability, and the most likely
    tokens' (text, bytes, log-probability), most likely first (token_text.py). An echoed prompt's first
    token has no log-probability (None) and no top tokens: nothing predicts it."""

    text: str
    raw: bytes
    logprob: float | None
    top: tuple[tuple[str, bytes, float], ...]
    span: int | None = None  # characters of the choice's text it covers (None: len(text); an echoed BOS: 0)


@dataclass(frozen=True)
class Delta:
    """New output of one choice: ``text`` since the last delta, ``num_tokens`` generated so far, and
    the log-probabilities of the tokens generated since (when the request asked for them). With echo the
    first delta's text and log-probabilities start with the prompt's."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenInfo, ...] = ()


@dataclass(frozen=True)
class _Admitted:
    prompt_tokens: list[int]  # per prompt


_END = object()  # the last event of every request


class RequestHandle:
    """The event loop's side of one request: await ``admitted()``, then ``async for deltas in handle``."""

    def __init__(self, bridge: "AsyncEngine", request_id: str, request: GenerationRequest):
        self.bridge, self.request_id, self.request = bridge, request_id, request
        self.prompt_tokens: list[int] = []
        self._events: asyncio.Queue = asyncio.Queue()
        self._closed = False  # finished, failed or aborted: nothing more to ask of the engine

    async def admitted(self) -> None:
        """Wait until the engine thread has validated and queued the request; raise InvalidRequest for a
        prompt the model cannot take (too long, bad token ids, max_tokens past the context)."""
        event = await self._events.get()
        if isinstance(event, Exception):
            self._closed = True
            raise event
        self.prompt_tokens = event.prompt_tokens

    async def __aiter__(self) -> AsyncIterator[list[Delta]]:
        """Each step's deltas (one per choice that has news) until every choice has finished."""
        while True:
            event = await self._events.get()
            if event is _END:
                self._closed = True
                return
            if isinstance(event, Exception):
                self._closed = True
                raise event
            yield event

    def abort(self) -> None:
        """Stop generating for this request (a client that went away); frees its KV blocks. Idempotent."""
        if not self._closed:
            self._closed = True
            self.bridge._send(lambda: self.bridge._abort(self))


LOGPROB_FLOOR = -9999.0  # reported for a probability that underflows fp32 (JSON has no -inf)


class _Live:
    """The engine thread's side of one admitted request: its sequences and what was sent so far.

    echoes: per sequence, the prompt text its first delta starts with (None: no echo); echo_spans: the
    characters of that text each prompt token covers (prompt_char_spans; None: each token's own text)."""

    def __init__(self, handle: RequestHandle, seqs: list[Sequence], token_text: Any = None,
                 echoes: list[str | None] | None = None, echo_spans: list[list[int] | None] | None = None):
        self.handle, self.seqs, self.token_text = handle, seqs, token_text
        self.echoes = echoes or [None] * len(seqs)  # set to None once sent
        self.echo_spans = echo_spans or [None] * len(seqs)  # per sequence: its prompt tokens' spans, or None
        self.prompt_only = handle.request.max_tokens == 0  # the one generated token is never sent
        self.sent_chars = [0] * len(seqs)
        self.sent_logprobs = [0] * len(seqs)
        self.counted_tokens = [0] * len(seqs)
        self.done = [False] * len(seqs)
        stops = handle.request.params.stop
        self.holdback = max((len(s) for s in stops), default=1) - 1

    def collect(self) -> tuple[list[Delta], int, list[Sequence]]:
        """(deltas since the last call, tokens generated since, sequences that finished since)."""
        deltas, new_tokens, finished = [], 0, []
        for i, seq in enumerate(self.seqs):
            if self.done[i]:
                continue
            num = len(seq.output_token_ids)
            if not self.prompt_only:  # a prompt-only choice's one token is never sent
                new_tokens += num - self.counted_tokens[i]
            self.counted_tokens[i] = num
            chunk, infos = ("", ()) if self.prompt_only else self._output(i, seq)
            if self.echoes[i] is not None and (num or seq.is_finished):
                prompt, prompt_infos = self._echo(i, seq)
                chunk, infos = prompt + chunk, prompt_infos + infos
            if chunk or infos or seq.is_finished:
                reason = ("length" if self.prompt_only else seq.finish_reason) if seq.is_finished else None
                deltas.append(Delta(i, chunk, 0 if self.prompt_only else num, reason, infos))
            if seq.is_finished:
                self.done[i] = True
                finished.append(seq)
        return deltas, new_tokens, finished

    @property
    def finished(self) -> bool:
        return all(self.done)

    def _output(self, i: int, seq: Sequence) -> tuple[str, tuple[TokenInfo, ...]]:
        """Sequence i's text and token log-probabilities not sent yet (the text held back as needed)."""
        text = seq.detok.text
        end = len(text) if seq.is_finished else max(self.sent_chars[i], len(text) - self.holdback)
        chunk, self.sent_chars[i] = text[self.sent_chars[i]:end], end
        infos = ()
        if seq.logprobs is not None and len(seq.logprobs) > self.sent_logprobs[i]:
            infos = tuple(self._info(e) for e in seq.logprobs[self.sent_logprobs[i]:])
            self.sent_logprobs[i] = len(seq.logprobs)
        return chunk, infos

    def _echo(self, i: int, seq: Sequence) -> tuple[str, tuple[TokenInfo, ...]]:
        """Sequence i's prompt text, and its tokens' log-probabilities when asked for (complete once a
        token is generated: the step that samples it scores the prompt's last positions)."""
        prompt, self.echoes[i] = self.echoes[i], None
        if seq.prompt_logprobs is None:
            return prompt, ()
        infos = (TokenInfo(*self.token_text(seq.prompt_token_ids[0]), None, ()),
                 *(self._info(e) for e in seq.prompt_logprobs[1:]))
        spans = self.echo_spans[i]
        if spans is not None:  # offsets into the prompt as sent (a BOS the tokenizer added covers nothing)
            infos = tuple(dataclasses.replace(t, span=n) for t, n in zip(infos, spans))
        return prompt, infos

    def _info(self, entry: Any) -> TokenInfo:
        """A TokenLogprobs as texts and bytes (token_text.TokenText) and finite log-probabilities."""
        text = self.token_text
        return TokenInfo(*text(entry.token_id), max(entry.logprob, LOGPROB_FLOOR),
                         tuple((*text(t), max(lp, LOGPROB_FLOOR)) for t, lp in entry.top))


def prompt_char_spans(prompt: str, mapping: list[tuple[int, int]]) -> list[int]:
    """How many characters of ``prompt`` each of its tokens covers, from the tokenizer's offset mapping
    (character (begin, end) per token; tokens it adds, such as a BOS, cover none), so that echoed text
    offsets index the prompt as sent."""
    starts, covered, seen = [], 0, False  # covered: the end of the text the real tokens so far cover
    for begin, end in mapping:
        if begin == end == 0 and (not seen or covered):  # a token the tokenizer added (BOS, EOS): no text
            starts.append(covered)
        else:  # the first real token also takes any leading text its offsets leave out (whitespace)
            starts.append(max(begin, starts[-1]) if seen else 0)
            covered, seen = max(covered, end), True
    return [b - a for a, b in zip(starts, starts[1:] + [len(prompt)])]


def _encode(tokenizer: Any, prompt: str, add_special_tokens: bool, offsets: bool) -> Any:
    """The tokenizer's encoding of ``prompt``, with character offsets when asked for and the tokenizer
    gives them (a slow one raises NotImplementedError: then without)."""
    if offsets:
        try:
            return tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):
            pass
    return tokenizer(prompt, add_special_tokens=add_special_tokens)


class AsyncEngine:
    """Runs an LLMEngine in one thread and serves it to asyncio code.

    ``start()`` in the event loop, ``submit()`` requests, ``shutdown()`` to drain. ``metrics``: an object
    with ``on_admitted(prompt_tokens)``, ``on_tokens(n)``, ``on_finished(seq)``, ``on_step(engine)``
    (metrics.ServerMetrics), called from the engine thread.
    """

    def __init__(self, engine: LLMEngine, *, max_waiting: int = 256, metrics: Any = None):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine, self.metrics = engine, metrics
        self.capacity = engine.config.max_num_seqs + max_waiting
        self.outstanding = 0  # sequences submitted and not yet ended (event-loop side)
        self._inbox: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._live: dict[int, _Live] = {}  # id(handle) -> state (engine thread only)
        self._token_text: TokenText | None = None  # made by the engine thread on the first logprobs request
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ event-loop side
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="atomq-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest, request_id: str) -> RequestHandle:
        """Queue a request (call from the event loop). Raises QueueFull when the waiting queue is full,
        InvalidRequest when it could never fit, ServiceUnavailable while shutting down."""
        if self._stopping or not self.is_alive:
            raise ServiceUnavailable("the server is shutting down" if self._stopping else "the engine is not running")
        k = request.num_sequences
        if k > self.capacity:
            raise InvalidRequest(f"the request asks for {k} sequences (prompts x n); this server holds at most "
                                 f"{self.capacity} at once", param="n")
        if self.outstanding + k > self.capacity:
            raise QueueFull(f"the server is busy ({self.outstanding} sequences running or waiting, at most "
                            f"{self.capacity}); retry later")
        self.outstanding += k
        handle = RequestHandle(self, request_id, request)
        self._send(lambda: self._admit(handle))
        return handle

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` in the engine thread between two steps and return its result."""
        return await asyncio.wrap_future(self.call_threadsafe(fn))

    def call_threadsafe(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """``call`` for any thread but the engine's: a concurrent Future of ``fn(engine)``."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(self.engine))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        self._send(run)
        return future

    async def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the running and waiting ones finish (abort what is left after
        ``timeout`` seconds), then stop the thread."""
        self._stopping = True
        self._send(lambda: None)  # wake the thread
        if self._thread is None:
            return
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            log.warning("shutdown: aborting %d unfinished requests", len(self._live))
            self._send(self._abort_all)
            await asyncio.to_thread(self._thread.join)

    def _deliver(self, batch: list[tuple[RequestHandle, Any]]) -> None:
        """Event loop: hand each event to its request; account for requests that ended."""
        for handle, event in batch:
            handle._events.put_nowait(event)
            if event is _END or isinstance(event, Exception):
                self.outstanding -= handle.request.num_sequences

    # --------------------------------------------------------------------------------- engine side
    def _send(self, command: Callable[[], None]) -> None:
        with self._cond:
            self._inbox.append(command)
            self._cond.notify()

    def _post(self, batch: list[tuple[RequestHandle, Any]]) -> None:
        if batch and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while not self._inbox and not eng.has_unfinished() and not self._stopping:
                    self._cond.wait()
                commands, self._inbox = list(self._inbox), deque()
                if self._stopping and not commands and not eng.has_unfinished():
                    return
            for command in commands:
                try:
                    command()
                except Exception:  # a bug in a command must not stop the engine thread
                    log.exception("engine command failed")
            if eng.has_unfinished():
                try:
                    eng.step()
                except Exception as exc:  # a bug: fail what is in flight, keep serving new requests
                    log.exception("engine step failed")
                    self._fail_all(EngineFailure(f"the engine failed: {type(exc).__name__}: {exc}"))
            self._publish()

    def _admit(self, handle: RequestHandle) -> None:
        """Validate every prompt of a request, then queue all its sequences (all or nothing)."""
        try:
            batch = [self._validate(prompt, handle.request) for prompt in handle.request.prompts]
        except ValueError as exc:
            self._post([(handle, InvalidRequest(str(exc)))])
            return
        except Exception as exc:  # never leave a client waiting on a request the thread dropped
            log.exception("admission failed")
            self._post([(handle, EngineFailure(f"admission failed: {type(exc).__name__}: {exc}"))])
            return
        req, seqs = handle.request, []
        for ids, max_tokens, _ in batch:
            for j in range(req.n):
                seed = None if req.params.seed is None else req.params.seed + j
                # max_tokens 0 (echo): the engine generates one token, which _Live drops
                params = dataclasses.replace(req.params, max_tokens=max(max_tokens, 1), seed=seed)
                seqs.append(self.engine.add_request(ids, params, f"{handle.request_id}-{len(seqs)}"))
        if self._token_text is None and (req.params.logprobs is not None or req.echo):
            self._token_text = TokenText(self.engine.tokenizer)
        echoes = spans = None
        if req.echo:  # a string prompt as it came, token ids as their exact text
            texts = [p if isinstance(p, str) else self._token_text.join(ids) for p, (ids, _, _) in zip(req.prompts, batch)]
            echoes = [text for text in texts for _ in range(req.n)]
            per_prompt = [None if m is None else prompt_char_spans(p, m) for p, (_, _, m) in zip(req.prompts, batch)]
            spans = [x for x in per_prompt for _ in range(req.n)]
        self._live[id(handle)] = _Live(handle, seqs, self._token_text, echoes, spans)
        if self.metrics is not None:
            self.metrics.on_admitted(sum(len(ids) for ids, _, _ in batch))
        self._post([(handle, _Admitted([len(ids) for ids, _, _ in batch]))])

    def _validate(self, prompt: str | list[int], req: GenerationRequest
                  ) -> tuple[list[int], int, list[tuple[int, int]] | None]:
        """(token ids, max_tokens, the tokens' character offsets in a string prompt when an echo with
        log-probabilities needs them and the tokenizer gives them, else None) of one prompt, or ValueError
        with the reason the engine refuses it."""
        eng, mapping = self.engine, None
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("the prompt is not valid Unicode text (it holds a lone surrogate)") from None
            offsets = req.echo and req.params.prompt_logprobs is not None
            enc = _encode(eng.tokenizer, prompt, req.add_special_tokens, offsets)
            ids, mapping = enc["input_ids"], enc.get("offset_mapping") if offsets else None
        else:
            ids = prompt
        eng.make_sequence(ids, req.params)  # the engine's own checks: empty, token ids, context length
        room = eng.max_model_len - len(ids)
        if room == 0 and req.max_tokens != 0:  # (a prompt-only echo needs no room: its one token is dropped)
            raise ValueError(f"the prompt fills the whole context ({eng.max_model_len} tokens): no room to generate")
        if req.max_tokens is not None and req.max_tokens > room:
            raise ValueError(f"max_tokens {req.max_tokens} + the prompt's {len(ids)} tokens exceed the model's "
                             f"context of {eng.max_model_len} tokens")
        max_tokens = room if req.max_tokens is None else req.max_tokens
        if req.params.min_tokens > max_tokens:
            raise ValueError(f"min_tokens {req.params.min_tokens} is more than the {max_tokens} tokens this "
                             f"prompt may generate")
        return ids, max_tokens, mapping

    def _abort(self, handle: RequestHandle) -> None:
        live = self._live.pop(id(handle), None)
        if live is None:
            return
        for seq in live.seqs:
            if self.engine.abort_request(seq) and self.metrics is not None:
                self.metrics.on_finished(seq)
        self._post([(handle, _END)])

    def _abort_all(self) -> None:
        for live in list(self._live.values()):
            self._abort(live.handle)

    def _fail_all(self, error: Exception) -> None:
        for key, live in list(self._live.items()):
            for seq in live.seqs:
                if self.engine.abort_request(seq) and self.metrics is not None:
                    self.metrics.on_finished(seq)
            del self._live[key]
            self._post([(live.handle, error)])

    def _publish(self) -> None:
        """Post every request's news of this step in one batch."""
        batch, tokens = [], 0
        for key, live in list(self._live.items()):
            deltas, new_tokens, finished = live.collect()
            tokens += new_tokens
            if deltas:
                batch.append((live.handle, deltas))
            if self.metrics is not None:
                for seq in finished:
                    self.metrics.on_finished(seq)
            if live.finished:
                batch.append((live.handle, _END))
                del self._live[key]
        if self.metrics is not None:  # before posting: a client that got its answer sees up-to-date metrics
            self.metrics.on_tokens(tokens)
            self.metrics.on_step(self.engine)
        self._post(batch)
