"""The engine thread and the server's metrics.

The engine is not thread-safe, so one thread owns it: requests and aborts reach it through a queue, and each
token goes back to its request through a callback (the server's is `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Callable

import torch

from nanor1.engine import Engine, SamplingParams, StepOutput

log = logging.getLogger("nanor1.serve")

Deliver = Callable[[StepOutput | BaseException], None]


class EngineLoop:
    """Runs `engine.step()` in one thread while anything is unfinished; new requests join the running batch
    (continuous batching). `submit` and `abort` may be called from any thread."""

    def __init__(self, engine: Engine, idle_poll_s: float = 0.5):
        self.engine = engine
        self.idle_poll_s = idle_poll_s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.tickets: dict[int, tuple[int, Deliver]] = {}  # ticket -> (engine request id, deliver)
        self.by_request: dict[int, int] = {}  # engine request id -> ticket
        self.n_waiting = self.n_running = self.last_batch = 0  # published after each step, for /metrics
        self.steps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="nanor1-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, ticket: int, prompt_ids: list[int], params: SamplingParams, deliver: Deliver) -> None:
        self.start()
        self.inbox.put(("add", ticket, prompt_ids, params, deliver))

    def abort(self, ticket: int) -> None:
        self.inbox.put(("abort", ticket))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    self._step()
                self.n_waiting, self.n_running = len(self.engine.waiting), len(self.engine.running)
        for ticket in list(self.tickets):  # shutting down: nobody will finish these
            self._fail(ticket, RuntimeError("the server is shutting down"))

    def _drain(self, block: bool) -> None:
        try:
            cmd = self.inbox.get(timeout=self.idle_poll_s) if block else self.inbox.get_nowait()
            while True:
                self._handle(cmd)
                cmd = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, ticket, prompt_ids, params, deliver = cmd
            try:
                rid = self.engine.add_request(prompt_ids, params, stream=True)
            except Exception as e:  # a bad request (NanoR1Error): only its sender hears of it
                deliver(e)
                return
            self.tickets[ticket] = (rid, deliver)
            self.by_request[rid] = ticket
        elif cmd[0] == "abort" and cmd[1] in self.tickets:
            rid, _ = self.tickets.pop(cmd[1])
            self.by_request.pop(rid, None)
            self.engine.abort(rid)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed step leaves the batch in an unknown state: fail all of it, go on
            log.exception("engine step failed")
            for ticket in list(self.tickets):
                self._fail(ticket, e)
            return
        self.steps += 1
        self.last_batch = len(outputs)
        for out in outputs:
            ticket = self.by_request.get(out.request_id)
            if ticket is None:
                continue
            _, deliver = self.tickets[ticket]
            if out.finished:
                del self.tickets[ticket], self.by_request[out.request_id]
            deliver(out)

    def _fail(self, ticket: int, error: BaseException) -> None:
        rid, deliver = self.tickets.pop(ticket)
        self.by_request.pop(rid, None)
        try:
            self.engine.abort(rid)
        except Exception:
            log.exception("abort after a failed step")
        deliver(error)


# ----------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, x: float) -> None:
        self.sum += x
        self.count += 1
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        lines = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return lines + [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


class Metrics:
    """Counters for /metrics in the Prometheus text format (version 0.0.4)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.tokens: Counter[str] = Counter()  # prompt, completion, reasoning
        self.aborted = 0
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] += 1
            self.latency.setdefault(route, Histogram()).observe(seconds)

    def add_tokens(self, prompt: int, completion: int, reasoning: int) -> None:
        with self.lock:
            self.tokens.update(prompt=prompt, completion=completion, reasoning=reasoning)

    def observe_first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def add_aborted(self, n: int = 1) -> None:
        with self.lock:
            self.aborted += n

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        def head(name: str, kind: str, help_text: str) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

        with self.lock:
            out = head("nanor1_requests_total", "counter", "HTTP requests by route and status code.")
            out += [f'nanor1_requests_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            for kind in ("prompt", "completion", "reasoning"):
                name = f"nanor1_{kind}_tokens_total"
                out += head(name, "counter", f"{kind.capitalize()} tokens processed.")
                out.append(f"{name} {self.tokens[kind]}")
            out += head("nanor1_aborted_requests_total", "counter", "Generations stopped by a client disconnect.")
            out.append(f"nanor1_aborted_requests_total {self.aborted}")
            out += head("nanor1_request_latency_seconds", "histogram", "Time from request to last byte, by route.")
            for route, h in sorted(self.latency.items()):
                out += h.render("nanor1_request_latency_seconds", f'route="{route}"')
            out += head("nanor1_time_to_first_token_seconds", "histogram", "Time from request to its first token.")
            out += self.ttft.render("nanor1_time_to_first_token_seconds")
        for name, (help_text, value) in gauges.items():
            out += head(name, "gauge", help_text) + [f"{name} {value}"]
        return "\n".join(out) + "\n"
