"""Fault, fuzz and load tests of the server: a schemathesis fuzz of its OpenAPI spec, random bytes and wrong
types, and 64 concurrent clients mixing streaming, non-streaming and cancellation; afterwards the server is
idle and still gives the engine's reference answer."""

import asyncio
import json
import time

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanor1.engine import Engine, SamplingParams
from nanor1.serve.protocol import ServeLimits
from serve_helpers import make_tokenizer, metric, model_server, scripted_server, tiny_model

LIMITS = ServeLimits(max_tokens=16, default_max_tokens=8, max_n=2, max_prompt_tokens=128)
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def fuzz_server(tok):
    server, _, _ = scripted_server(tok, limits=LIMITS)
    with server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case, fuzz_server):
    """Every generated request gets a documented status, content type and body: never a 5xx. (Schema-valid
    requests may still be refused: the limits of a running server, e.g. prompt tokens, are not in the schema.)"""
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    if response.status_code >= 400:
        assert set(response.json()["error"]) == ERROR_KEYS


def _assert_error(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert set(r.json()["error"]) == ERROR_KEYS


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=200))
def test_random_bytes_are_rejected_cleanly(fuzz_server, body):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(fuzz_server.url + path, content=body, headers={"content-type": "application/json"})
        try:
            json.loads(body)
        except ValueError:
            _assert_error(r)  # garbage is a 400, never a crash


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                   max_size=3), max_leaves=6)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(["messages", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
                              "stream_options", "model", "top_k"]), value=JSONISH)
def test_wrong_types_are_rejected_cleanly(fuzz_server, field, value):
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, field: value}
    # Python's json writes NaN and Infinity, which Python's json (and so the server) reads back
    r = httpx.post(fuzz_server.url + "/v1/chat/completions", content=json.dumps(body),
                   headers={"content-type": "application/json"})
    if r.status_code == 200:
        assert r.headers["content-type"].startswith(("application/json", "text/event-stream"))
    else:
        _assert_error(r)


# ----------------------------------------------------------------------------- load with cancellation

async def _one(client: httpx.AsyncClient, k: int) -> str:
    body = {"model": "tiny", "max_tokens": 12, "temperature": 1.0, "seed": k}
    kind = k % 4
    if kind in (0, 1):  # chat / completion, streaming, read to the end
        path = "/v1/chat/completions" if kind == 0 else "/v1/completions"
        body = {**body, "stream": True, **({"messages": [{"role": "user", "content": f"hi {k}"}]} if kind == 0
                                          else {"prompt": f"the fox {k}"})}
        async with client.stream("POST", path, json=body) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        return "streamed"
    if kind == 2:  # streaming, the client hangs up after the first event
        body = {**body, "max_tokens": 16, "stream": True, "prompt": "the lazy dog"}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                break
        return "cancelled"
    try:  # non-streaming; some give up early (the server must abort them)
        r = await client.post("/v1/completions", json={**body, "prompt": "hello"}, timeout=0.05 if k % 8 == 3 else 30)
    except httpx.TimeoutException:
        return "timed out"
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    return "done"


def test_64_concurrent_mixed_clients_then_still_correct(tok):
    model = tiny_model(tok)
    server, engine, _ = model_server(tok, model, limits=LIMITS, max_batch=16)

    async def run(url):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(_one(client, k) for k in range(64)))

    with server:
        outcomes = asyncio.run(run(server.url))
        assert outcomes.count("streamed") == 32 and outcomes.count("cancelled") == 16
        deadline = time.time() + 5
        while time.time() < deadline:
            text = httpx.get(server.url + "/metrics").text
            if metric(text, "nanor1_in_flight_requests") == 0 and not engine.has_unfinished():
                break
        assert metric(text, "nanor1_in_flight_requests") == 0 and not engine.has_unfinished()
        assert metric(text, "nanor1_running_requests") == 0 and metric(text, "nanor1_queue_length") == 0
        assert metric(text, "nanor1_aborted_requests_total") >= 8  # hung-up clients were aborted, not run out
        # after all of it the answers are still exactly the engine's
        ref = Engine(model, tok).generate([tok.encode("the quick")], SamplingParams(max_new_tokens=10, temperature=0))
        r = httpx.post(server.url + "/v1/completions",
                       json={"model": "tiny", "prompt": "the quick", "max_tokens": 10, "temperature": 0})
        assert r.json()["choices"][0]["text"] == ref[0].text
