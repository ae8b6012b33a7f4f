"""Fast sampling for Llama-family Hugging Face models (Llama, Mistral, Qwen2, Qwen3; SmolLM2 is a Llama).

For sampling, transformers runs these one generic module at a time and grows a `DynamicCache` by concatenation
at every token; on a CPU at GRPO's batch sizes that overhead costs as much as the matmuls. `FastLlama` runs the
same weights with q|k|v and gate|up packed into one matmul each (on CPUs in bf16, also laid out once in oneDNN's
blocked format, `nanor1.common.pack_frozen`), over a per-slot KV cache that grows in blocks,
behind the `prefill` / `decode` / `new_cache` interface of nanor1's own Transformer, so the engine's
`ModelBackend` drives it with continuous batching; `compile=True` runs each decode step as one compiled graph.
GRPO's update runs the same concatenated weights with
gradients (`continuation_logits`): each prompt once, its group's completions attending to its keys, the
concatenated weights cast once for both passes. That update's time is mostly its matmuls, so it gains less
(bench/README.md, GRPO); with mu = 1 it can take those matmuls' outputs from the rollout instead, which records
them (`record` and `replay` below, nanor1/replay.py). Tests pin the logits and gradients to transformers' forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanor1 import cpu_decode
from nanor1.common import compiled, linear, pack_frozen, version_key
from nanor1.llama_cache import LlamaCache
from nanor1.model.mla import causal_attention_cpu, continuation_keep, masked_attention
from nanor1.replay import replay_linear

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def supports(model, max_seq_len: int, training: bool = False) -> bool:
    """Whether `model` is a causal LM that FastLlama reproduces exactly up to `max_seq_len` tokens (`training`:
    in train mode too, which needs attention without dropout)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    if training and getattr(cfg, "attention_dropout", 0.0):
        return False
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "mlp_bias", False) or not hasattr(model, "model"):
        return False
    for layer in model.model.layers:
        window = getattr(layer.self_attn, "sliding_window", None)
        if window is None and cfg.model_type == "mistral":
            window = getattr(cfg, "sliding_window", None)
        if window is not None and window < max_seq_len:  # a window that can bind is transformers' job
            return False
    return True


@dataclass
class _Layer:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    norm1: torch.nn.Module
    norm2: torch.nn.Module
    q_norm: torch.nn.Module | None  # Qwen3 normalises each head of q and k
    k_norm: torch.nn.Module | None


def _cat(*ts):
    return None if ts[0] is None else torch.cat(ts)


def _gather(model, pack) -> list[_Layer]:
    """Each layer's weights with q|k|v and gate|up concatenated, each passed through `pack` (`pack_frozen` for
    sampling; for training a cast, through which the gradients reach the parameters)."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out.append(_Layer(qkv=pack(torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight))),
                          qkv_bias=_cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                          o=pack(a.o_proj.weight), o_bias=a.o_proj.bias,
                          gate_up=pack(torch.cat((m.gate_proj.weight, m.up_proj.weight))),
                          down=pack(m.down_proj.weight),
                          norm1=layer.input_layernorm, norm2=layer.post_attention_layernorm,
                          q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None)))
    return out


class FastLlama(torch.nn.Module):
    """A transformers Llama-family causal LM behind nanor1's model interface (see `Transformer.prefill`)."""

    def __init__(self, model, compile: bool = False):
        super().__init__()
        # compile: decode steps under torch.compile (see _decode_step), unless the CPU decode kernel runs them
        # (bf16 on CPUs with AVX-512 BF16, nanor1/cpu_decode.py), which is faster (bench/README.md, GRPO)
        self.hf, self.compile = model, compile
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = getattr(model.model.layers[0].self_attn, "scaling", self.head_dim ** -0.5)
        self.max_seq_len = int(getattr(cfg, "max_position_embeddings", None) or 1 << 30)
        self._layers, self._key, self._head_weight = None, None, None
        self._params = list(model.parameters())  # listed once: walking the modules costs more than a decode op
        self._rope = None  # (cos, sin) for positions 0..n-1, see _rope_tables

    def layers(self) -> list[_Layer]:
        """Concatenated weights for inference (in oneDNN's layout, `pack_frozen`, unless decode steps are compiled,
        as a graph takes plain tensors only), kept while the parameters are unchanged: training and `load_state_dict`
        change them in place, and their version counters (or storage, after `.to()`) say so. A parameter object
        swapped for a new one is not seen; build a new FastLlama after that."""
        key = version_key(self._params)
        if key != self._key:
            # compiled, Inductor's matmuls re-lay the plain weights out at each call (bench/README.md, GRPO)
            pack = torch.Tensor.detach if self._decode_compiled() else pack_frozen
            with torch.no_grad():
                self._layers, self._key = _gather(self.hf, pack), key
                self._head_weight = pack(self.hf.lm_head.weight)
        return self._layers

    def new_cache(self, n_slots: int, max_len: int | None = None) -> LlamaCache:
        w = self.hf.model.embed_tokens.weight
        # the decode kernels read shared prompts; the compiled step and the ops read whole rows
        return LlamaCache(len(self.hf.model.layers), n_slots, self.n_kv, self.head_dim,
                          min(max_len or self.max_seq_len, self.max_seq_len), w.dtype, w.device,
                          share_prompts=self._runs_kernels(w.device, w.dtype))

    def _runs_kernels(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether decode steps over a cache of this device and dtype run nanor1/cpu_decode.py's CPU kernels
        (`_decode_with_kernels`): bf16 throughout, where they were built."""
        return (cpu_decode.supports(device, dtype, self.head_dim)
                and self.hf.model.norm.weight.dtype == torch.bfloat16)

    def _decode_compiled(self) -> bool:
        w = self.hf.model.embed_tokens.weight
        return self.compile and not self._runs_kernels(w.device, w.dtype)

    def _qkv(self, layer: _Layer, x: torch.Tensor, cos, sin, record=None, replay=None):
        """Projected, normalised and rotated q (B, H, T, D), k and v (B, KV, T, D). `record` and `replay`, here
        and below: see `_linear`."""
        B, T, _ = x.shape
        qkv = _linear(_norm(layer.norm1, x), layer.qkv, layer.qkv_bias, record, replay).view(B, T, -1, self.head_dim)
        qk, v = qkv.split((self.n_heads + self.n_kv, self.n_kv), dim=2)
        if layer.q_norm is not None:
            q, k = qk.split((self.n_heads, self.n_kv), dim=2)
            qk = torch.cat((_norm(layer.q_norm, q), _norm(layer.k_norm, k)), dim=2)
        q, k = _rope(qk.transpose(1, 2), cos, sin).split((self.n_heads, self.n_kv), dim=1)  # one rotation for both
        return q, k, v.transpose(1, 2)

    def _finish(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor, record=None, replay=None) -> torch.Tensor:
        """Residual output projection, then the SwiGLU MLP; attn: (B, T, H * D)."""
        x = x + _linear(attn, layer.o, layer.o_bias, record, replay)
        gate, up = _linear(_norm(layer.norm2, x), layer.gate_up, None, record, replay).chunk(2, dim=-1)
        return x + _linear(F.silu(gate) * up, layer.down, None, record, replay)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, cache: LlamaCache, slots, last: torch.Tensor,
                record: list | None = None) -> torch.Tensor:
        """Right-padded prompts (B, T) from position 0 into cache rows `slots`; returns (B, V) logits at the
        positions `last` (each prompt's final token). Padding sits after each prompt, so causal attention
        never lets a real token see it; the caller sets cache.lengths. `record` collects every matmul's output
        (nanor1/replay.py)."""
        B, T = idx.shape
        cache.ensure(T)
        x = self.hf.model.embed_tokens(idx)
        cos, sin = self._rope_tables(x, torch.arange(T, device=idx.device)[None].expand(B, T))
        g = self.n_heads // self.n_kv
        for i, layer in enumerate(self.layers()):
            q, k, v = self._qkv(layer, x, cos, sin, record)
            cache.k[i, slots, :, :T], cache.v[i, slots, :, :T] = k, v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=g > 1)
            x = self._finish(layer, x, o.transpose(1, 2).reshape(B, T, -1), record)
        return self._head(x[torch.arange(B, device=idx.device), last], record=record).float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: LlamaCache, slots, positions: torch.Tensor,
               record: list | None = None) -> torch.Tensor:
        """One token per sequence: tokens (B,) at `positions` (B,) in cache rows `slots`; returns (B, V).
        `record` collects every matmul's output (nanor1/replay.py)."""
        B = tokens.shape[0]
        cache.ensure(int(positions.max()) + 1)
        rows = torch.arange(slots.start, slots.stop, device=tokens.device) if isinstance(slots, slice) else slots
        x = self.hf.model.embed_tokens(tokens[:, None])
        cos, sin = self._rope_tables(x, positions[:, None])
        kernels = self._runs_kernels(cache.k.device, cache.dtype)
        if self.compile and not kernels:
            logits, k, v, outputs = _compiled_decode()(self, self.layers(), x, cache.k[:, slots], cache.v[:, slots],
                                                       cos, sin, positions, record is not None)
            cache.k[:, rows, :, positions], cache.v[:, rows, :, positions] = k, v
            if record is not None:
                record += outputs
            return logits
        if kernels:
            return self._decode_with_kernels(x, cache, rows, positions, cos, sin, record)
        assert not cache.share_prompts, "a cache with shared prompts is read by the kernel alone"
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        keep = torch.arange(cache.k.shape[3], device=tokens.device)[None, :] <= positions[:, None]
        bias = torch.zeros(keep.shape, dtype=cache.dtype, device=tokens.device).masked_fill_(~keep, float("-inf"))
        bias = bias[:, None, None]  # (B, 1, 1, capacity)
        for i, layer in enumerate(self.layers()):
            q, k, v = self._qkv(layer, x, cos, sin, record)
            cache.k[i, rows, :, positions], cache.v[i, rows, :, positions] = k[:, :, 0], v[:, :, 0]
            keys, values = cache.k[i, slots], cache.v[i, slots]  # (B, KV, capacity, D)
            # grouped-query attention without repeating keys: each kv head serves H // KV query heads
            scores = torch.matmul(q.reshape(B, KV, H // KV, D), keys.transpose(-1, -2)).mul_(self.scale)
            o = torch.matmul(torch.softmax(scores.add_(bias), dim=-1), values)  # (B, KV, H // KV, D)
            x = self._finish(layer, x, o.reshape(B, 1, H * D), record)
        return self._head(x[:, 0], record=record).float()

    def _decode_with_kernels(self, x: torch.Tensor, cache: LlamaCache, rows: torch.Tensor, positions: torch.Tensor,
                             cos, sin, record: list | None) -> torch.Tensor:
        """`decode`'s layers where nanor1/cpu_decode.py's kernels run: the attention (which rotates q and k, writes
        the new keys and values and reads shared prompts), each residual add with the RMSNorm after it, and
        SwiGLU's product, one call each in place of a few torch ops, whose launches are most of an eager step's
        time besides its matmuls at GRPO's sizes. The same roundings as the ops'; `record` as in `decode`."""
        B, H, KV, D = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        layers = self.layers()
        norms = [layer.norm1 for layer in layers[1:]] + [self.hf.model.norm]  # the norm after each layer
        source, shared = cache.sharing(rows.tolist())
        h = cpu_decode.add_rms_norm(x, None, layers[0].norm1.weight, layers[0].norm1.variance_epsilon)
        for i, (layer, norm) in enumerate(zip(layers, norms)):
            qkv = _linear(h, layer.qkv, layer.qkv_bias, record).view(B, -1, D)  # (B, H + 2 KV, D)
            if layer.q_norm is not None:
                q, k, v = qkv.split((H, KV, KV), dim=1)
                qkv = torch.cat((_norm(layer.q_norm, q), _norm(layer.k_norm, k), v), dim=1)
            # the kernel rotates q and k, and writes k and v into the cache
            o = cpu_decode.attend(qkv, cos, sin, cache.k[i], cache.v[i], rows, source, shared, positions, self.scale,
                                  KV)
            y = _linear(o.reshape(B, 1, H * D), layer.o, layer.o_bias, record)
            h = cpu_decode.add_rms_norm(x, y, layer.norm2.weight, layer.norm2.variance_epsilon)  # x += y
            y = _linear(cpu_decode.silu_mul(_linear(h, layer.gate_up, None, record)), layer.down, None, record)
            h = cpu_decode.add_rms_norm(x, y, norm.weight, norm.variance_epsilon)
        return _linear(h[:, 0], self._head_weight, self.hf.lm_head.bias, record).float()

    def _decode_step(self, layers: list[_Layer], x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos, sin,
                     positions: torch.Tensor, record: bool):
        """`decode`'s layers as one pure function, for torch.compile: x (B, 1, C) at `positions`, the cache's keys
        and values (n_layers, B, KV, capacity, D) before this token. Each query attends to the cached keys below
        its position and to its own new key, kept apart, and the new keys and values are returned, (B, n_layers,
        KV, D) each, for the caller to write: a graph that wrote into its input cache would copy it whole.
        Returns (B, V) float logits too, and with `record` every matmul's output (`decode`'s record), else []."""
        B = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        below = torch.arange(keys.shape[3], device=x.device)[None, :] < positions[:, None]
        bias = torch.zeros(below.shape, device=x.device).masked_fill_(~below, float("-inf"))[:, None, None]
        new_k, new_v, outputs = [], [], [] if record else None
        for layer, K, V in zip(layers, keys, values):
            q, k, v = self._qkv(layer, x, cos, sin, outputs)
            q, k, v = q.reshape(B, KV, H // KV, D), k.reshape(B, KV, 1, D), v.reshape(B, KV, 1, D)
            new_k.append(k[:, :, 0])
            new_v.append(v[:, :, 0])
            scores = torch.cat((torch.matmul(q, K.transpose(-1, -2)).float(),
                                (q.float() * k.float()).sum(-1, keepdim=True)), dim=-1)
            p = torch.softmax(scores * self.scale + F.pad(bias, (0, 1)), dim=-1).to(V.dtype)
            o = torch.matmul(p[..., :-1], V) + p[..., -1:] * v  # (B, KV, H // KV, D)
            x = self._finish(layer, x, o.reshape(B, 1, H * D), outputs)
        logits = self._head(x[:, 0], record=outputs).float()
        return logits, torch.stack(new_k, 1), torch.stack(new_v, 1), outputs or []

    def continuation_logits(self, prompts: torch.Tensor, prompt_lens: torch.Tensor, inputs: torch.Tensor,
                            attention: torch.Tensor, compile: bool = False,
                            replay: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The GRPO update's forward, with gradients: `Policy.continuation_logits` (each of n right-padded prompts
        (n, P) run once, its G = B // n continuations (B, T) attending to its keys), on the model's own
        parameters. Returns (B, T + 1, V) logits, as `nanor1.hf_backend.shared_prompt_logits` does with
        transformers' forward. `compile`: run the tensor work under torch.compile (see `compiled`). `replay`: the
        matmuls' outputs, recorded when the rollout sampled these tokens (`nanor1.replay.Recording.replay`)."""
        P, T = prompts.shape[1], inputs.shape[1]
        dev = prompts.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else \
            self.hf.model.embed_tokens.weight.dtype
        # the rotation in the dtype q and k come out of their projection in; the tables are looked up here, as
        # their size depends on the positions' values, which a compiled graph cannot branch on
        probe = prompts.new_empty(0, dtype=dt)
        rope = self._rope_tables(probe, torch.arange(P, device=prompts.device)[None])
        rope_continuation = None
        if T:
            pos = prompt_lens.repeat_interleave(inputs.shape[0] // prompts.shape[0], 0)[:, None] + \
                torch.arange(T, device=inputs.device)
            rope_continuation = self._rope_tables(probe, pos)
        forward = compiled(FastLlama._continuation) if compile else FastLlama._continuation
        return forward(self, prompts, prompt_lens, inputs, rope, rope_continuation, dt,
                       None if replay is None else tuple(y.to(dt) for y in replay))

    def _continuation(self, prompts, prompt_lens, inputs, rope, rope_continuation, dt, replay) -> torch.Tensor:
        n, P = prompts.shape
        replay = None if replay is None else iter(replay)
        B, T = inputs.shape
        g = B // n
        x = self.hf.model.embed_tokens(prompts)
        # the concatenated weights cast once for both passes (autocast would cast them at each use)
        layers = _gather(self.hf, lambda w: w.to(dt))
        rows, last = torch.arange(n, device=x.device), prompt_lens - 1
        keep_prompt = torch.arange(P, device=x.device)[None, :] < prompt_lens[:, None]  # (n, P)
        prefix = []
        for i, layer in enumerate(layers):
            q, k, v = self._qkv(layer, x, *rope, replay=replay)
            prefix.append((k, v))
            k, v = self._expand_kv(k), self._expand_kv(v)
            if i < len(layers) - 1:
                o = causal_attention_cpu(q, k, v, self.scale) if x.device.type == "cpu" else \
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
                x = self._finish(layer, x, o.transpose(1, 2).reshape(n, P, -1), replay=replay)
            else:  # past its keys and values, the last layer needs only each prompt's last position, which
                # predicts the first completion token: that query alone attends and goes through the MLP
                o = masked_attention(q[rows, :, last][:, :, None], k, v, self.scale, keep_prompt[:, None, None])
                x = self._finish(layer, x[rows, last][:, None], o.transpose(1, 2).reshape(n, 1, -1), replay=replay)
        head = self.hf.lm_head.weight
        first = self._head(x[:, 0], head, replay=replay).repeat_interleave(g, 0)[:, None]
        if T == 0:
            return first
        x = self.hf.model.embed_tokens(inputs)
        keep = continuation_keep(keep_prompt, g, T)  # (B, 1, T, P + T)
        for layer, (pk, pv) in zip(layers, prefix):
            q, k, v = self._qkv(layer, x, *rope_continuation, replay=replay)
            k = self._expand_kv(torch.cat((pk.repeat_interleave(g, 0), k), dim=2))
            v = self._expand_kv(torch.cat((pv.repeat_interleave(g, 0), v), dim=2))
            o = masked_attention(q, k, v, self.scale, keep)
            x = self._finish(layer, x, o.transpose(1, 2).reshape(B, T, -1), replay=replay)
        return torch.cat((first, self._head(x, head, replay=replay)), dim=1)

    def _expand_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """(B, KV, S, D) -> (B, H, S, D): each kv head repeated for the query heads it serves."""
        return kv if self.n_kv == self.n_heads else kv.repeat_interleave(self.n_heads // self.n_kv, dim=1)

    def _head(self, h: torch.Tensor, weight: torch.Tensor | None = None, record=None, replay=None) -> torch.Tensor:
        return _linear(_norm(self.hf.model.norm, h), self._head_weight if weight is None else weight,
                       self.hf.lm_head.bias, record, replay)

    def _rope_tables(self, x: torch.Tensor, positions: torch.Tensor):
        """cos, sin (B, 1, T, D) in x's dtype from the model's own rotary embedding (with any rope scaling).

        Each position's angles depend on that position alone, so rows of one table computed for positions
        0..n-1 equal what the embedding gives per call, at one lookup per step instead of its five ops. Rope
        types whose frequencies follow the sequence length (dynamic NTK, LongRoPE) are called per step."""
        rotary = self.hf.model.rotary_emb
        if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
            cos, sin = rotary(x, positions)
            return cos[:, None], sin[:, None]
        need = int(positions.max()) + 1
        table = self._rope
        if table is None or table[0].shape[0] < need or (table[0].dtype, table[0].device) != (x.dtype, x.device):
            n = max(need, min(max(256, 2 * (0 if table is None else table[0].shape[0])), self.max_seq_len))
            cos, sin = rotary(x, torch.arange(n, device=x.device)[None])
            self._rope = table = cos[0], sin[0]
        return table[0][positions][:, None], table[1][positions][:, None]


@functools.cache
def _compiled_decode():
    """FastLlama._decode_step under torch.compile, shared by every instance. Dynamo's default for sizes suits
    decoding: a static graph first, then one with the dimension that changed (cache capacity, batch) symbolic.
    Inductor's default inlines the rotation of q into the attention scores, recomputing it for every key; buffers
    that take more than a few ops are kept instead (bench/README.md, GRPO: 0.56x of eager's step time, not
    0.78x)."""
    return torch.compile(FastLlama._decode_step, options={"realize_opcount_threshold": 4})


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, record: list | None = None,
            replay=None) -> torch.Tensor:
    """`linear`, whose output `record` (a list) collects, or which takes its output from `replay` (an iterator
    over a recording, in call order) and computes only its backward (nanor1/replay.py)."""
    if replay is not None:
        return replay_linear(x, w, b, next(replay))
    y = linear(x, w, b)
    if record is not None:
        record.append(y)
    return y


def rms_norm_train(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The family's RMSNorm with gradients, in float32: the result in the autocast dtype under autocast (every
    reader is a matmul), else in x's and weight's. The same values as the family's own for float32 x (the
    residual stream); for lower-precision x this rounds once where the family rounds x / rms(x) first."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(x.dtype,
                                                                                                      weight.dtype)
    return _RMSNormFunction.apply(x, weight, eps, dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm's forward and backward in a few whole-tensor passes. PyTorch's CPU `rms_norm` is a composite of
    casts and elementwise ops, and autograd's backward through it is longer still: this is 2x faster forward plus
    backward at the GRPO bench's shapes (bench/README.md, GRPO)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = xf * r
        ctx.save_for_backward(normed, r, weight)
        ctx.x_dtype = x.dtype
        return (normed * weight).to(dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        # y = w * n with n = x * r, r = (mean(x^2) + eps)^-1/2:
        # dx = r * (g - n * mean(g * n)) with g = dy * w, and dw = sum over rows of dy * n
        normed, r, weight = ctx.saved_tensors
        d = normed.shape[-1]
        g = (dy * weight).to(normed.dtype)  # a no-op for a float32 weight
        dw = (dy * normed).reshape(-1, d).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        c = torch.linalg.vecdot(g, normed).unsqueeze_(-1).div_(d)
        dx = torch.addcmul(g, normed, c, value=-1).mul_(r).to(ctx.x_dtype)
        return dx, dw, None, None


def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorm (weight * x / rms(x), eps inside the root): nanor1's training one (a shorter
    backward) where gradients flow, else the family's own ops. PyTorch's CPU `rms_norm` is a composite with more
    casts: at decode sizes its launches cost 11% of a GRPO bench rollout, the family's ops about half that."""
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad) and \
            not torch.compiler.is_compiling():  # compiled, Inductor fuses the ops below, forward and backward
        return rms_norm_train(x, norm.weight, norm.variance_epsilon)
    xf = x.float()
    return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the "rotate half" layout of the Hugging Face Llama family."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
