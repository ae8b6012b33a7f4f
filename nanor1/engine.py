"""The one sampling engine: batched generation with a KV cache, for rollouts, evaluation, chat and serving.

Requests wait in a queue, get a cache slot, are prefilled together and then decoded one token per `step()`
alongside every other running request (continuous batching). `generate()` is that loop run to completion.
The model side is a `Backend`: `ModelBackend` for nanor1 models (MLA latent cache, per-slot positions);
`nanor1.hf_backend.HFBackend` runs any Hugging Face causal LM through the same interface.
"""

from __future__ import annotations

import collections
import itertools
import random
from dataclasses import dataclass, field
from typing import Protocol

import torch

from nanor1.common import NanoR1Error, round_up


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    stop_token_ids: tuple[int, ...] = ()  # the tokenizer's EOS always stops too
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None  # per-request generator: same seed, same sample, whatever the batch

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise NanoR1Error(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise NanoR1Error(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise NanoR1Error(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise NanoR1Error(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # generated ids, the stop token excluded
    text: str  # decoded ids, cut before a stop string
    finish_reason: str  # "stop" or "length"
    logprobs: list[float]  # log p(token) under softmax(logits / temperature) (T = 1 for greedy)
    stop_token_id: int | None = None  # the stop token that ended it, if any (GRPO trains on it too)
    stop_logprob: float | None = None


@dataclass
class StepOutput:
    request_id: int
    token_id: int | None
    logprob: float | None
    text_delta: str
    finished: bool
    finish_reason: str | None


class Backend(Protocol):
    """What the engine needs from a model: slot-addressed prefill and one-token decode, logits as (B, V)."""
    max_seq_len: int
    n_slots: int
    continuous: bool  # can a new request join while others decode?

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor: ...
    def decode(self, tokens: torch.Tensor, slots: list[int]) -> torch.Tensor: ...
    def release(self, slot: int) -> None: ...


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct prompts in first-seen order, and for each prompt the index of its distinct copy: a GRPO
    group's G rows share one prompt, which prefill then runs once and copies."""
    index: dict[tuple[int, ...], int] = {}
    inverse = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(k) for k in index], torch.tensor(inverse)


class ModelBackend:
    """A model with a per-slot cache (nanor1's Transformer and its MLA latents, or a Llama-family Hugging Face
    model run by `nanor1.hf_llama.FastLlama`): any request may join at any step."""
    continuous = True

    def __init__(self, model, n_slots: int, max_seq_len: int | None = None):
        self.model = model
        self.n_slots = n_slots
        self.max_seq_len = min(max_seq_len or model.max_seq_len, model.max_seq_len)
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(n_slots, self.max_seq_len)
        self.recording = None  # a nanor1.replay.Recording to fill (a FastLlama model only), or None

    def _slots(self, slots: list[int]):
        # a contiguous run of slots is a view of the cache; anything else is gathered
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self.device)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        distinct, inverse = distinct_prompts(prompts)
        first = [slots[int((inverse == u).nonzero()[0])] for u in range(len(distinct))]  # where each runs
        # right padding up to SHAPE_MULTIPLE, so the prefill's matmul shapes recur from batch to batch
        T = min(round_up(max(len(p) for p in distinct)), self.max_seq_len)
        idx = torch.zeros(len(distinct), T, dtype=torch.long)
        for i, p in enumerate(distinct):
            idx[i, : len(p)] = torch.tensor(p)
        last = torch.tensor([len(p) - 1 for p in distinct], device=self.device)
        logits = self._run(self.model.prefill, (idx.to(self.device), self.cache, self._slots(first), last),
                           lambda outputs: self.recording.add_prefill(slots, inverse, outputs))
        slot_t, src = torch.tensor(slots, device=self.device), torch.tensor(first, device=self.device)[inverse]
        self.cache.lengths[slot_t] = torch.tensor([len(p) for p in prompts], device=self.device)
        if len(distinct) < len(prompts):  # the repeats take the cache rows of their prompt's first row
            self.cache.copy_rows(src, slot_t, T)
        return logits[inverse.to(self.device)]

    def decode(self, tokens: torch.Tensor, slots: list[int]) -> torch.Tensor:
        slot_t = torch.tensor(slots, device=self.device)
        positions = self.cache.lengths[slot_t]
        logits = self._run(self.model.decode, (tokens.to(self.device), self.cache, self._slots(slots), positions),
                           lambda outputs: self.recording.add_decode(slots, outputs))
        self.cache.lengths[slot_t] += 1
        return logits

    def release(self, slot: int) -> None:
        self.cache.release(slot)

    def _run(self, forward, args: tuple, add) -> torch.Tensor:
        """forward(*args); while recording, its matmul outputs go to `add`."""
        if self.recording is None:
            return forward(*args)
        outputs: list[torch.Tensor] = []
        logits = forward(*args, record=outputs)
        add(outputs)
        return logits


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    rng: random.Random  # the request's own stream of uniforms, one per sampled token
    stop_ids: frozenset[int]
    track_text: bool
    limit: int  # ends for length at this many generated tokens (max_new_tokens, or the context's end)
    slot: int = -1
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    emitted: str = ""  # text already handed out by step()
    finish_reason: str | None = None
    stop_token_id: int | None = None
    stop_logprob: float | None = None


@dataclass
class _Settings:
    key: tuple[int, ...]  # the requests' ids, in row order
    temperature: torch.Tensor
    top_k: torch.Tensor | None  # None where no row filters (sample_tokens then skips the pass)
    top_p: torch.Tensor | None


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                  top_p: torch.Tensor | None, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (tokens, logprobs under softmax(logits / T)).

    Rows with temperature 0 are greedy. Top-k then top-p filter the distribution (None: no row filters); the
    draw inverts the filtered distribution's CDF at the row's uniform number u (B,) in [0, 1], which the engine
    takes from the request's own random stream, so a row's sample does not depend on its batch-mates (and costs
    one random number, not one per vocabulary entry as Gumbel-max would).
    """
    logits = logits.float()
    # the settings come from Python lists, so on the CPU; the logits may be on a GPU
    temperature = temperature.to(logits.device)
    greedy = temperature <= 0
    n_greedy = int(greedy.sum())  # one sync for the three cases: none, some or every row greedy
    scaled = logits / (torch.where(greedy, 1.0, temperature) if n_greedy else temperature).unsqueeze(1)
    logprobs = torch.log_softmax(scaled, dim=-1)
    filtered = logprobs
    V = logits.shape[-1]
    if top_k is not None and bool((top_k > 0).any()):
        top_k = top_k.to(logits.device)
        k = torch.where(top_k > 0, top_k.clamp(max=V), V)
        kth = filtered.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p is not None and bool((top_p < 1).any()):
        top_p = top_p.to(logits.device)
        sorted_lp, order = filtered.sort(dim=-1, descending=True)
        probs = sorted_lp.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) > top_p.unsqueeze(1)  # keep the smallest set reaching top_p
        filtered = filtered.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if n_greedy == len(greedy):  # no noise to draw: every row takes its argmax
        tokens = logits.argmax(-1)
        return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    u = u.to(logits.device, torch.float32).unsqueeze(1)
    cdf = filtered.exp().cumsum_(-1)  # filtering removed mass: the CDF ends at the kept total, not 1
    total = cdf[:, -1:]
    # kept below the total even where u x total rounds up to it, so some CDF entry always exceeds it
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # the first token whose CDF exceeds the target: filtered-out tokens add nothing, so they are never the first
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled) if n_greedy else sampled
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 64, max_seq_len: int | None = None,
                 backend: Backend | None = None, seed: int = 0):
        self.tokenizer = tokenizer
        self.backend = backend if backend is not None else ModelBackend(model, max_batch, max_seq_len)
        self.max_seq_len = self.backend.max_seq_len
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[int, _Request] = {}  # slot -> request
        self.free_slots = list(range(self.backend.n_slots))
        self._ids = itertools.count()
        self._rng = random.Random(seed)
        self._by_id: dict[int, _Request] = {}
        self._last_settings: _Settings | None = None

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: list[int], params: SamplingParams, stream: bool = False) -> int:
        params.validate()
        if not prompt_ids:
            raise NanoR1Error("empty prompt: give at least one token")
        if len(prompt_ids) >= self.max_seq_len:
            raise NanoR1Error(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.max_seq_len} "
                              "tokens; shorten it")
        rng = random.Random(params.seed if params.seed is not None else self._rng.getrandbits(63))
        stop = set(params.stop_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            stop.add(self.tokenizer.eos_id)
        req = _Request(next(self._ids), list(prompt_ids), params, rng, frozenset(stop),
                       track_text=stream or bool(params.stop_strings),
                       limit=min(params.max_new_tokens, self.max_seq_len - len(prompt_ids)))
        self.waiting.append(req)
        self._by_id[req.id] = req
        return req.id

    def abort(self, request_id: int) -> None:
        req = self._by_id.pop(request_id, None)
        if req is None:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        elif req.slot >= 0 and self.running.get(req.slot) is req:
            self._free(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _free(self, req: _Request) -> None:
        del self.running[req.slot]
        self.backend.release(req.slot)
        self.free_slots.append(req.slot)
        self.free_slots.sort()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        decoding = list(self.running.values())
        if decoding:
            tokens = torch.tensor([r.ids[-1] for r in decoding])
            logits = self.backend.decode(tokens, [r.slot for r in decoding])
            outputs += self._accept(decoding, logits)
        admitted = self._admit()
        if admitted:
            logits = self.backend.prefill([r.prompt_ids for r in admitted], [r.slot for r in admitted])
            outputs += self._accept(admitted, logits)
        return outputs

    def _admit(self) -> list[_Request]:
        if not self.backend.continuous and self.running:
            return []
        admitted = []
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            req.slot = self.free_slots.pop(0)
            self.running[req.slot] = req
            admitted.append(req)
        return admitted

    def _accept(self, reqs: list[_Request], logits: torch.Tensor) -> list[StepOutput]:
        s = self._settings(reqs, logits.shape[-1])
        tokens, logprobs = sample_tokens(logits, s.temperature, s.top_k, s.top_p,
                                         torch.tensor([r.rng.random() for r in reqs]))
        outs = []
        for req, tok, lp in zip(reqs, tokens.tolist(), logprobs.tolist()):
            if req.track_text or tok in req.stop_ids or len(req.ids) + 1 >= req.limit:
                outs.append(self._append(req, tok, lp))
            else:  # _append's common case, inlined (it runs for every row at every token): one more token
                req.ids.append(tok)
                req.logprobs.append(lp)
                outs.append(StepOutput(req.id, tok, lp, "", False, None))
        return outs

    def _settings(self, reqs: list[_Request], V: int) -> _Settings:
        """The requests' sampling settings as tensors. Decode steps run the same requests until one finishes or
        joins, so the last ones built are reused while the list is the same."""
        key = tuple(r.id for r in reqs)
        if self._last_settings is None or self._last_settings.key != key:
            p = [r.params for r in reqs]
            top_k = [min(x.top_k, V) for x in p]  # a top_k above V keeps every token (and overflows int64)
            self._last_settings = _Settings(
                key, torch.tensor([x.temperature for x in p]),
                torch.tensor(top_k) if any(top_k) else None,
                torch.tensor([x.top_p for x in p]) if any(x.top_p < 1 for x in p) else None)
        return self._last_settings

    def _append(self, req: _Request, tok: int, lp: float) -> StepOutput:
        if tok in req.stop_ids:
            req.finish_reason, req.stop_token_id, req.stop_logprob = "stop", tok, lp
            return self._finish(req, None, None)
        req.ids.append(tok)
        req.logprobs.append(lp)
        text = ""
        if req.track_text:  # only streams and stop strings need the text at every token
            text = self.tokenizer.decode(req.ids)
            cut = min((i for s in req.params.stop_strings if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                req.finish_reason = "stop"
                return self._finish(req, tok, lp, final_text=text[:cut])
        if len(req.ids) >= req.limit:
            req.finish_reason = "length"
            return self._finish(req, tok, lp)
        return StepOutput(req.id, tok, lp, self._safe_delta(req, text) if req.track_text else "", False, None)

    def _safe_delta(self, req: _Request, text: str) -> str:
        """New text, holding back a trailing partial UTF-8 character or a possible stop-string prefix."""
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in req.params.stop_strings:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        delta = text[len(req.emitted):safe] if safe > len(req.emitted) else ""
        req.emitted += delta
        return delta

    def _finish(self, req: _Request, tok, lp, final_text: str | None = None) -> StepOutput:
        text = final_text if final_text is not None else (self.tokenizer.decode(req.ids) if self.tokenizer else "")
        req.text = text
        delta = text[len(req.emitted):] if req.track_text and text.startswith(req.emitted) else ""
        self._free(req)
        return StepOutput(req.id, tok, lp, delta, True, req.finish_reason)

    # ------------------------------------------------------------------ whole batches
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 progress: bool = False) -> list[Completion]:
        """Run every prompt to completion; results come back in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise NanoR1Error(f"{len(prompts)} prompts but {len(plist)} sampling params")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        reqs = [self._by_id[i] for i in ids]
        bar = None
        if progress:
            from nanor1.common import progress as make_bar
            bar = make_bar(total=len(prompts), desc="generate", unit="seq")
        try:
            while any(r.finish_reason is None for r in reqs):
                done = sum(o.finished for o in self.step())
                if bar is not None and done:
                    bar.update(done)
        except BaseException:
            for i in ids:
                self.abort(i)
            raise
        finally:
            if bar is not None:
                bar.close()
        out = []
        for r in reqs:
            self._by_id.pop(r.id, None)
            out.append(Completion(r.prompt_ids, r.ids, r.text, r.finish_reason, r.logprobs, r.stop_token_id,
                                  r.stop_logprob))
        return out
