"""The bodies of /v1/chat/completions and /v1/completions: request -> engine jobs -> JSON or an SSE stream.

Chat output is split into `reasoning_content` and `content` (DeepSeek's API); usage counts reasoning tokens
in `completion_tokens_details.reasoning_tokens`, as OpenAI's reasoning models do.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from nanor1.common import NanoR1Error
from nanor1.engine import SamplingParams
from nanor1.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, OutputText,
                                   ReasoningSplitter, encode_chat, usage)


@dataclass
class Job:
    chat: bool
    runs: list[tuple[list[int], SamplingParams]]  # one per choice
    prompt_tokens: int
    stream: bool
    include_usage: bool
    opened: bool = False  # the chat prompt itself ends with <think>: the output starts inside the reasoning


class ClientGone(Exception):
    pass


def model_card(srv) -> dict:
    return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "nanor1"}


def chat_job(srv, body: ChatCompletionRequest) -> Job:
    srv.check_model(body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        ids = encode_chat(srv.tokenizer, messages)
    except NanoR1Error as e:
        raise APIError(400, str(e), param="messages") from None
    srv.check_prompt(ids, "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = srv.sampling(body, 1, max_tokens)
    opened = srv.tokenizer.decode(ids[-4:]).rstrip().endswith("<think>")
    return Job(True, [(ids, p) for p in params], len(ids), bool(body.stream), _include_usage(body), opened)


def text_job(srv, body: CompletionRequest) -> Job:
    srv.check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt is an empty list; give at least one prompt", param="prompt")
    params = srv.sampling(body, len(prompts), body.max_tokens)
    # Raw prompts are user text: "<think>" or "<|eos|>" in them stays plain text, never a control token.
    ids = [srv.tokenizer.encode(p, allow_special=False) for p in prompts]
    for x in ids:
        srv.check_prompt(x, "prompt")
    runs = [(x, p) for x in ids for p in params]  # choice index = prompt index * n + sample index
    return Job(False, runs, sum(len(x) for x in ids), bool(body.stream), _include_usage(body))


def _include_usage(body) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


async def respond(srv, request: Request, job: Job):
    if job.stream:
        return StreamingResponse(_stream(srv, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await run_to_end(request, _collect(srv, job))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the status shows in /metrics


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_to_end(request: Request, work):
    """Await `work` unless the client disconnects first; then it is cancelled, which aborts its generations."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        task.cancel()
        watch.cancel()


class _Choices:
    """Per-choice accumulators shared by the JSON and the streaming paths."""

    def __init__(self, job: Job, tokenizer):
        n = len(job.runs)
        self.job = job
        self.splitters = [ReasoningSplitter(job.opened) for _ in range(n)]
        self.texts = [OutputText(tokenizer) for _ in range(n)]
        self.tokens, self.finish = [0] * n, [None] * n

    def feed(self, i: int, out) -> tuple[str, str]:
        """(reasoning delta, content delta) of this StepOutput; for text completions all of it is content."""
        delta = self.texts[i].add(out)
        self.tokens[i] += out.token_id is not None
        if out.finished:
            self.finish[i] = out.finish_reason
        if not self.job.chat:
            return "", delta
        r, c = self.splitters[i].feed(delta, out.token_id is not None)
        if out.finished:
            r2, c2 = self.splitters[i].finish()
            r, c = r + r2, c + c2
        return r, c

    def usage(self) -> dict:
        reasoning = sum(s.reasoning_tokens for s in self.splitters) if self.job.chat else 0
        return usage(self.job.prompt_tokens, sum(self.tokens), reasoning)

    def count(self, srv) -> None:
        u = self.usage()
        srv.metrics.add_tokens(u["prompt_tokens"], u["completion_tokens"],
                               u["completion_tokens_details"]["reasoning_tokens"])


async def _collect(srv, job: Job) -> dict:
    acc = _Choices(job, srv.tokenizer)
    n = len(job.runs)
    reasoning, content = [""] * n, [""] * n
    try:
        async for i, out in srv.events(job.runs):
            r, c = acc.feed(i, out)
            reasoning[i] += r
            content[i] += c
    finally:
        acc.count(srv)
    head = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": srv.model_name}
    if job.chat:
        choices = [{"index": i, "finish_reason": acc.finish[i], "logprobs": None,
                    "message": {"role": "assistant", "content": content[i],
                                "reasoning_content": reasoning[i] if acc.splitters[i].thought else None}}
                   for i in range(n)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": acc.usage()}
    choices = [{"index": i, "text": content[i], "finish_reason": acc.finish[i], "logprobs": None} for i in range(n)]
    return {**head, "object": "text_completion", "choices": choices, "usage": acc.usage()}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(srv, job: Job):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. With include_usage every chunk
    has "usage": null and one last chunk with no choices carries the usage."""
    acc = _Choices(job, srv.tokenizer)
    base = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if job.chat else "text_completion", "created": int(time.time()),
            "model": srv.model_name}
    extra = {"usage": None} if job.include_usage else {}

    def chunk(i: int, finish: str | None = None, **fields) -> str:
        return _sse({**base, "choices": [{"index": i, **fields, "logprobs": None, "finish_reason": finish}], **extra})

    try:
        if job.chat:
            for i in range(len(job.runs)):
                yield chunk(i, delta={"role": "assistant", "content": ""})
        async for i, out in srv.events(job.runs):
            r, c = acc.feed(i, out)
            finish = out.finish_reason if out.finished else None
            if not job.chat:
                if c or finish:
                    yield chunk(i, finish, text=c)
                continue
            delta = {**({"reasoning_content": r} if r else {}), **({"content": c} if c else {})}
            if delta:
                yield chunk(i, delta=delta)
            if finish:
                yield chunk(i, finish, delta={})
        if job.include_usage:
            yield _sse({**base, "choices": [], "usage": acc.usage()})
        yield _sse("[DONE]")
    except APIError as e:  # the headers are sent already: the error goes in the stream, as OpenAI does
        yield _sse(e.body())
        yield _sse("[DONE]")
    finally:
        acc.count(srv)
