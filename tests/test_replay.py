"""nanor1.replay: GRPO's first update takes its forward's matmul outputs from the rollout that sampled the tokens.
Replayed, the update must give the log-probs and gradients of computing its forward afresh."""

from unittest import mock

import pytest
import torch

from test_hf_llama import VOCAB, _family

from nanor1.engine import Engine, ModelBackend, SamplingParams
from nanor1.grpo import Rollouts, _logp, build_batch
from nanor1.hf_llama import FastLlama
from nanor1.policy import Policy
from nanor1.replay import Recording


class _Tokenizer:
    eos_id, pad_id = 3, 0

    def decode(self, ids):
        return ""


def _sample(model, prompts, G, n_slots, step_function, max_new_tokens=20):
    """G completions of each prompt from the engine, recorded; rows stop at different steps (8 of the 97 tokens
    stop them). `step_function`: decode through the function the compiled decode compiles, run eagerly."""
    backend = ModelBackend(FastLlama(model, compile=step_function), n_slots=n_slots)
    backend.recording = recording = Recording()
    rows = [p for p in prompts for _ in range(G)]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=i, stop_token_ids=list(range(4, 12)))
              for i in range(len(rows))]
    with mock.patch("nanor1.hf_llama._compiled_decode", return_value=FastLlama._decode_step):
        comps = Engine(None, _Tokenizer(), backend=backend).generate(rows, params)
    return comps, recording


def assert_replay_matches(model, step_function: bool, compiled_update: bool, cases, max_new_tokens: int = 20) -> None:
    """Three groups of G = 2 (the first and third share a prompt, which prefill runs once), sampled on the model's
    device with completions of 0 to 20 tokens: the update's log-probs and gradients from the recording (its forward
    compiled or not) against its own eager forward's, for the whole batch and for a micro-batch of the third group
    alone; `cases`: (autocast dtype, log-prob tolerance, gradient tolerance relative to each gradient's largest)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    p0, p1 = (torch.randint(12, VOCAB, (n,), generator=g).tolist() for n in (5, 9))
    prompts, G = [p0, p1, p0], 2
    comps, recording = _sample(model, prompts, G, 6, step_function, max_new_tokens)
    lengths = [len(c.ids) for c in comps]
    assert recording.complete and (len(set(lengths)) > 2 and max(lengths) > 1 or max_new_tokens == 1)
    ro = Rollouts(*build_batch(prompts, comps, 0, False, 16), {}, comps, recording)
    policy = Policy(model, _Tokenizer(), "hf", None)
    for dtype, tol, grad_tol in cases:
        for ps, sl in ((torch.arange(3), torch.arange(6)), (torch.tensor([2]), torch.tensor([4, 5]))):
            got = []
            for compile_, replay in ((compiled_update, True), (False, False)):
                logp = _logp(policy, ro, ps, sl, 1.0, device, dtype, compile_, replay)[0]
                real = ro.real[sl, : logp.shape[1]].to(device)
                (logp * real).sum().backward()
                got.append((logp.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters()}))
                model.zero_grad(set_to_none=True)
            (a, ga), (b, gb) = got
            assert (a - b).abs().max() < tol, dtype
            for n in gb:
                assert (ga[n] - gb[n]).abs().max() <= grad_tol * gb[n].abs().max(), (dtype, n)


@pytest.mark.parametrize("step_function", [False, True], ids=["eager_decode", "compiled_decode_step"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])  # qwen2 has q|k|v biases, qwen3 q and k norms
def test_replayed_update_gives_the_recomputed_log_probs_and_gradients(name, step_function):
    """In float32, to rounding."""
    assert_replay_matches(_family(name).train(), step_function, False, [(torch.float32, 1e-5, 1e-4)])


def test_replay_of_a_rollout_through_the_cpu_decode_kernels():
    """A bf16 Llama with head_dim 32 samples through nanor1/cpu_decode.py's kernels (shared prompts, sources
    released while their group still decodes): its recording replays to the recomputed bf16 log-probs and
    gradients, to bf16's rounding (the kernels round as the ops do, the update's norms in float32)."""
    from nanor1 import cpu_decode
    if cpu_decode.library() is None:
        pytest.skip("no C compiler or no AVX-512 BF16 on this CPU")
    assert_replay_matches(_family("llama", hidden_size=128).to(torch.bfloat16).train(), False, False,
                          [(torch.bfloat16, 0.05, 0.1)])


def test_a_recording_of_requests_admitted_in_turns_is_not_replayed():
    """More requests than slots: the later ones join as the first finish, so decode steps no longer line up with
    each completion's positions; the recording says so and refuses to replay."""
    model = _family("llama").eval()
    _, recording = _sample(model, [[20, 21, 22], [30, 31]], 3, 4, False)
    assert not recording.complete
    with pytest.raises(ValueError, match="incomplete"):
        recording.replay(torch.arange(2) * 3, torch.arange(6), 16, torch.tensor([2, 1]), 15, 2)


@pytest.mark.slow
def test_compiled_replayed_update_gives_the_recomputed_log_probs_and_gradients():
    """GRPOConfig.compile: the replaying forward under torch.compile (ReplayLinear traced into the graph) against
    the eager forward that computes its matmuls, in float32 and under bf16 autocast, to their rounding."""
    assert_replay_matches(_family("llama").train(), True, True,
                          [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 0.05, 0.1)])


def test_replay_pads_what_the_context_cut_short():
    """A context of 12 positions: prefill runs the 9-token prompt padded to 12, not to the batch's 16, and the
    completions stop after 3 and 7 tokens where the batch is 15 wide; the recording pads both with zeros, which no
    loss reads, and still gives the recomputed log-probs and gradients."""
    assert_replay_matches(_family("llama", max_position_embeddings=12).train(), False, False,
                          [(torch.float32, 1e-5, 1e-4)])


def test_replay_of_completions_that_end_at_their_first_token():
    """max_new_tokens=1: every completion is the token prefill sampled, so the engine never decodes; the replay's
    continuation pass is all padding and its first log-prob comes from the prompt pass's head."""
    assert_replay_matches(_family("llama").train(), False, False, [(torch.float32, 1e-5, 1e-4)], max_new_tokens=1)
