"""Muon: momentum SGD whose update is orthogonalised, for the model's matrices (Jordan et al. 2024, "Muon: An
optimizer for hidden layers in neural networks"; Liu et al. 2025, "Muon is Scalable for LLM Training").

The update of each weight matrix is replaced by the nearest semi-orthogonal matrix (all singular values ~1),
found with five Newton-Schulz iterations, so every direction of the matrix learns at the same rate. Embeddings,
the output head, norms and the router stay on AdamW, as in both papers. `torch.optim.Muon` takes only 2-D
parameters; the routed experts here are stacked as one (experts, out, in) tensor, so this version treats a
stack as a batch of matrices (one orthogonalisation per expert) and otherwise follows torch's step exactly
(tests/test_train.py checks the two agree on matrices). The learning rate is scaled by 0.2 sqrt(max(out, in))
("match_rms_adamw", Liu et al. section 2.2), so Muon reuses the AdamW learning rate and weight decay.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz, steepest at zero (Jordan et al.)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """~U V^T of g = U S V^T for a matrix or each matrix of a (..., m, n) stack, in bf16 as the reference."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "nesterov": nesterov, "ns_steps": ns_steps, "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon takes matrices or stacks of them, got a {p.dim()}-D parameter")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - m)
            updates = torch._foreach_lerp(grads, bufs, m) if group["nesterov"] else bufs
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            # matrices of one shape are orthogonalised as one batch: a small model has dozens of them, and one
            # batched iteration costs about what one matrix's does
            by_shape: dict[tuple[int, int], list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape[-2:]), []).append(i)
            for shape, idx in by_shape.items():
                stack = torch.cat([updates[i].reshape(-1, *shape) for i in idx])
                ortho = orthogonalize(stack, group["ns_steps"], group["eps"]).split(
                    [params[i].numel() // (shape[0] * shape[1]) for i in idx])
                for i, o in zip(idx, ortho):
                    params[i].add_(o.view_as(params[i]).to(params[i].dtype),
                                   alpha=-lr * 0.2 * math.sqrt(max(shape)))


class Optimizers:
    """Several optimizers stepped as one (Muon for matrices, AdamW for the rest): one list of param_groups for
    the learning-rate schedule, one state_dict in torch's format (parameters numbered across all of them)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:  # read through: load_state_dict replaces each optimizer's group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def _offsets(self) -> list[int]:
        counts = [sum(len(g["params"]) for g in o.param_groups) for o in self.optimizers]
        return [sum(counts[:i]) for i in range(len(counts))]

    def state_dict(self) -> dict:
        state, groups = {}, []
        for o, off in zip(self.optimizers, self._offsets()):
            sd = o.state_dict()
            state.update({pid + off: st for pid, st in sd["state"].items()})
            groups += [{**g, "params": [pid + off for pid in g["params"]]} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups = iter(sd["param_groups"])
        for o, off in zip(self.optimizers, self._offsets()):
            mine = [next(groups) for _ in o.param_groups]
            ids = {pid for g in mine for pid in g["params"]}
            o.load_state_dict({"state": {pid - off: st for pid, st in sd["state"].items() if pid in ids},
                               "param_groups": [{**g, "params": [pid - off for pid in g["params"]]} for g in mine]})
