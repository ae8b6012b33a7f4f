"""The GRPO update's first forward pass, taken from the rollout (Llama-family policies, nanor1/hf_llama.py).

GRPO's update (with mu = 1, its only one) runs the policy on exactly the tokens the rollout just sampled, with the
weights it sampled them with: the same matmuls the engine computed, a token at a time. So the engine records the outputs
of its matmuls (prefill and decode: every q|k|v, output, gate|up and down projection and the head), and the
update's forward takes them instead of computing them again. Autograd still runs the whole backward, from the
update's own norms, rotations, attention and SwiGLU over the recorded values; only the forward's matmuls, a third
of the update's, are saved. A recorded value differs from a recomputed one by rounding only (the decode adds up
each dot product in another order, and in the rollout's dtype), as two runs of the same forward at other batch
sizes do (bench/README.md, GRPO). With mu > 1 GRPO recomputes: a later update's ratio divides by the old
log-probs, and only a forward in the same numerics as its own keeps that ratio free of the rounding difference.
"""

from __future__ import annotations

import torch


class ReplayLinear(torch.autograd.Function):
    """y = x @ w.T + b with y already known: the forward returns it, the backward is linear's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.bias_dtype = None if b is None else b.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dt = dy.dtype  # the autocast dtype under autocast, as linear's backward computes in
        flat = dy.reshape(-1, dy.shape[-1])  # 2-D: a strided dy (a slice of the logits) would make matmul expand w
        dx = (flat @ w.to(dt)).view(*dy.shape[:-1], -1).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (flat.t() @ x.reshape(-1, x.shape[-1]).to(dt)).to(w.dtype) if ctx.needs_input_grad[1] else None
        db = flat.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def replay_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return ReplayLinear.apply(x, w, b, y)


def bytes_per_token(model) -> int:
    """What a recording holds per token of a transformers Llama-family model: every matmul's output, per element
    of the model's dtype."""
    width = model.lm_head.out_features
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        width += sum(p.out_features for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj,
                                               m.down_proj))
    return width * model.lm_head.weight.element_size()


class Recording:
    """The matmul outputs of one `Engine.generate` that admitted every request in one prefill (GRPO's rollout),
    filled by `nanor1.engine.ModelBackend`: each list is in the model's call order, per layer its q|k|v, output,
    gate|up and down projections, then the head."""

    def __init__(self):
        self.slots: list[int] | None = None  # each request's cache slot, in request order
        self.prompt_row: torch.Tensor | None = None  # each request's row in the prefill (repeated prompts share)
        self.prefill: list[torch.Tensor] = []  # (n_distinct, T, W) each, the head's (n_distinct, V) at the last
        self.steps: list[tuple[list[int], list[torch.Tensor]]] = []  # per decode step: its slots, (B, W) each
        self.complete = True  # False when requests joined later: the steps then do not line up with positions
        self._decoded: list[torch.Tensor] | None = None

    def add_prefill(self, slots: list[int], prompt_row: torch.Tensor, outputs: list[torch.Tensor]) -> None:
        if self.slots is not None:
            self.complete = False
            return
        self.slots, self.prompt_row, self.prefill = list(slots), prompt_row, outputs

    def add_decode(self, slots: list[int], outputs: list[torch.Tensor]) -> None:
        self.steps.append((slots, [o.reshape(len(slots), -1) for o in outputs]))  # (B, 1, W) -> (B, W)

    def _decode_outputs(self) -> list[torch.Tensor]:
        """Per matmul, (N, steps, W) over the requests in order: step t holds input token t of each completion;
        a request that had finished by then has zeros there (its later positions take no loss)."""
        if self._decoded is None:
            n, where = len(self.slots), {s: i for i, s in enumerate(self.slots)}
            per_step = []
            for slots, outs in self.steps:
                if len(slots) == n and slots == self.slots:
                    per_step.append(outs)
                    continue
                rows = torch.tensor([where[s] for s in slots], device=outs[0].device)
                per_step.append([o.new_zeros(n, o.shape[-1]).index_copy_(0, rows, o) for o in outs])
            self._decoded = [torch.stack(col, 1) for col in zip(*per_step)] if per_step else \
                [o.new_zeros(n, 0, o.shape[-1]) for o in self.prefill]  # every request stopped at its first token
        return self._decoded

    def replay(self, first_rows: torch.Tensor, rows: torch.Tensor, P: int, last: torch.Tensor, T: int,
               n_layers: int) -> list[torch.Tensor]:
        """The recorded outputs in the order `FastLlama._continuation` calls its matmuls, for prompts (n, P)
        whose last tokens sit at `last` (n,), each the prompt of request `first_rows` (n,), and continuations
        (B, T) of requests `rows` (B,): the prompt pass (its last layer past q|k|v at `last` only), its head, the
        continuation pass, its head."""
        if not self.complete or self.slots is None:
            raise ValueError("an incomplete recording cannot be replayed")
        pre = self.prompt_row[first_rows].to(last.device)
        out = []
        for i, o in enumerate(self.prefill[:-1]):
            layer, kind = divmod(i, 4)
            if layer == n_layers - 1 and kind > 0:  # the last layer's output projection and MLP: last rows only
                out.append(o[pre, last][:, None])
            else:  # the prefill's width may stop short of the batch's where the context caps it: padding
                out.append(_pad(o[pre, :P], P))
        out.append(self.prefill[-1][pre])
        if T == 0:
            return out
        everyone = len(rows) == len(self.slots) and bool((rows == torch.arange(len(rows))).all())
        for o in self._decode_outputs():  # the batch's width may round up past the last decoded token: padding
            out.append(_pad((o if everyone else o[rows])[:, :T], T))
        return out


def _pad(o: torch.Tensor, width: int) -> torch.Tensor:
    """o (B, <= width, W) with zeros after its positions up to `width`: padding positions take no loss."""
    if o.shape[1] == width:
        return o
    return torch.cat((o, o.new_zeros(o.shape[0], width - o.shape[1], o.shape[2])), dim=1)
