"""Serving throughput: total generated tokens/s for 1 client vs 16 concurrent clients, same requests.

The server runs in its own process (a `speedrun`-preset random model unless --model names a checkpoint);
every request has its own seed, so both runs generate exactly the same tokens. Run:
    python bench/serve_bench.py [--model CKPT] [--requests 32] [--max-tokens 64] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import httpx

TEXTS = ["the quick brown fox jumps over the lazy dog", "what is 12 + 30? <think> 12 + 30 = 42 </think> "
         "<answer> 42 </answer>", "a conversation between user and assistant about numbers and words"] * 50


def run_server(args) -> None:
    """The server process: a random speedrun model with a small tokenizer, or a checkpoint."""
    import torch

    from nanor1.common import tune_cpu
    from nanor1.engine import Engine
    from nanor1.serve.protocol import ServeLimits
    from nanor1.serve.server import BackgroundServer, create_app, load_engine
    tune_cpu()
    torch.manual_seed(0)
    if args.model:
        engine, tok = load_engine(args.model, max_batch=args.clients)
    else:
        from nanor1.model import ModelConfig, Transformer
        from nanor1.tokenizer import train_tokenizer
        tok = train_tokenizer(TEXTS, 512)
        cfg = ModelConfig.preset("speedrun", vocab_size=tok.vocab_size)
        engine = Engine(Transformer(cfg).init_weights(0).eval(), tok, max_batch=args.clients)
    app = create_app(engine, tok, "bench", limits=ServeLimits(max_tokens=args.max_tokens, max_waiting=4096))
    with BackgroundServer(app, port=args.port) as server:
        print(server.url, flush=True)
        while True:
            time.sleep(3600)


async def load(url: str, n_requests: int, clients: int, max_tokens: int) -> dict:
    """Send n_requests chat completions with at most `clients` in flight; total tokens over wall time."""
    sem = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(k: int) -> int:
            async with sem:
                r = await client.post("/v1/chat/completions", json={
                    "model": "bench", "messages": [{"role": "user", "content": f"what is {k} + {k}?"}],
                    "max_tokens": max_tokens, "temperature": 1.0, "seed": k})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(k) for k in range(n_requests)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": n_requests, "tokens": sum(tokens), "seconds": round(wall, 3),
            "tokens_per_s": round(sum(tokens) / wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a nanor1 checkpoint (default: random speedrun-preset model)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_only:
        return run_server(args)
    cmd = [sys.executable, __file__, "--serve-only", "--clients", str(args.clients), "--max-tokens",
           str(args.max_tokens)] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = server.stdout.readline().strip()
        if not url:
            raise SystemExit("the server process did not start")
        asyncio.run(load(url, 4, args.clients, 8))  # warm-up
        results = [asyncio.run(load(url, args.requests, c, args.max_tokens)) for c in (1, args.clients)]
    finally:
        server.kill()
        server.wait()
    one, many = results
    assert one["tokens"] == many["tokens"], "per-request seeds should make both runs generate the same tokens"
    print(f"{'clients':>8} {'requests':>9} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for r in results:
        print(f"{r['clients']:>8} {r['requests']:>9} {r['tokens']:>7} {r['seconds']:>8} {r['tokens_per_s']:>9}")
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    print(f"{args.clients} concurrent clients: {ratio:.1f}x the total tokens/s of one client")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "ratio": round(ratio, 2)}, f, indent=2)


if __name__ == "__main__":
    main()
