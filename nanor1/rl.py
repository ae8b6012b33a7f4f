"""GRPO math as pure tensor functions: group advantages, the clipped surrogate with a k3 KL, loss aggregation.

Everything here is stateless and works on tensors the trainer (nanor1/grpo.py) builds; see docs/grpo.md for
the options. Tested by tests/test_rl.py against hand-computed numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

from nanor1.common import NanoR1Error

ADV_EPS = 1e-4  # added to the group std; as TRL, so an all-equal group gets advantage 0, not 0/0


class AdvantageScale(enum.Enum):
    GROUP_STD = "group_std"  # GRPO (DeepSeekMath §4.1.2, R1 eq. 3): divide by the group's reward std
    NONE = "none"            # Dr. GRPO (Liu et al. 2025, §3.1): only centre; 1/std overweights too easy/hard prompts


class LossAggregation(enum.Enum):
    SEQUENCE_MEAN = "sequence_mean"  # GRPO (DeepSeekMath eq. 3): 1/G sum_i 1/|o_i| sum_t
    TOKEN_MEAN = "token_mean"        # DAPO (Yu et al. 2025, §3.3): every token weighs the same, long or short answer
    CONSTANT_NORM = "constant_norm"  # Dr. GRPO (Liu et al. 2025, §3.1): sum / (G * max_len), no length bias at all


@dataclass
class GRPOLossConfig:
    """The GRPO objective's knobs. Defaults are GRPO as in DeepSeekMath / R1 (symmetric PPO clip, per-sequence
    mean, std-scaled advantages, R1-Zero's KL weight). eps_high=0.28 + beta=0 + TOKEN_MEAN is DAPO;
    beta=0 + CONSTANT_NORM + adv_scale NONE is Dr. GRPO. Call validate() after loading it from YAML."""

    # PPO trust region (Schulman 2017; DeepSeekMath eq. 3): a token with A < 0 is pushed down to pi/pi_old = 1-eps_low
    eps_low: float = 0.2
    # ... and one with A > 0 up to 1+eps_high; 0.28 is DAPO's clip-higher (§3.1): rare good tokens can grow more,
    # which fights entropy collapse.
    eps_high: float = 0.2
    # Weight of the k3 KL to the reference policy (DeepSeekMath eq. 4; R1-Zero used 0.001); 0 skips the ref model.
    beta: float = 0.001
    # How per-token losses become one number; decides how long vs short answers are weighted (see LossAggregation).
    loss_agg: LossAggregation = LossAggregation.SEQUENCE_MEAN
    # Whether advantages are divided by the group std (GRPO) or only centred (Dr. GRPO).
    adv_scale: AdvantageScale = AdvantageScale.GROUP_STD

    def validate(self) -> None:
        if not 0.0 <= self.eps_low < 1.0:
            raise NanoR1Error(f"eps_low={self.eps_low} must be in [0, 1): the ratio's lower bound is 1 - eps_low")
        if self.eps_high < 0.0:
            raise NanoR1Error(f"eps_high={self.eps_high} must be >= 0: the ratio's upper bound is 1 + eps_high")
        if self.beta < 0.0:
            raise NanoR1Error(f"beta={self.beta} must be >= 0 (0 turns the KL penalty off)")

    @property
    def needs_ref(self) -> bool:
        """A reference model is only worth a forward pass when the KL term has weight."""
        return self.beta > 0.0


# ----------------------------------------------------------------------------- advantages

def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """rewards (B*G,) or (B, G) -> (B, G), checking the group size."""
    if group_size < 2:
        raise NanoR1Error(f"group_size={group_size}: GRPO needs at least 2 samples per prompt to form a baseline")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards have groups of {rewards.shape[1]}, expected group_size={group_size}")
        return rewards
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int,
                     scale: AdvantageScale = AdvantageScale.GROUP_STD, eps: float = ADV_EPS) -> Tensor:
    """GRPO outcome advantages, R1 eq. 3 / DeepSeekMath §4.1.2: A_i = (r_i - mean(r)) / (std(r) + eps) within
    each group of `group_size` samples of one prompt; scale=NONE is Dr. GRPO's A_i = r_i - mean(r).

    std is the *sample* std (Bessel, divide by G-1). The papers write std() without saying which; we follow TRL
    (and torch.std's default) so runs compare with the reference implementation; advantages are then a constant
    sqrt((G-1)/G) times those from the population std. Returns float32 shaped like `rewards`: (B*G,) or (B, G).
    """
    # in float64, where the mean of a group of equal float32 rewards is exact: their advantages are then exactly 0
    # (in float32 eight rewards of 0.1 gave +-7e-5), which lets the update skip such groups (nanor1/grpo.py)
    r = _grouped(rewards, group_size).double()  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale is AdvantageScale.GROUP_STD:
        adv = adv / (r.std(dim=1, keepdim=True, correction=1) + eps)
    return adv.float().view(rewards.shape)


def zero_variance_groups(rewards: Tensor, group_size: int) -> tuple[Tensor, float]:
    """DAPO dynamic sampling (Yu et al. 2025, §3.2): groups whose rewards are all equal have zero advantage and
    give no gradient. Returns (bool (B,), True where the group is all-equal; fraction of such groups)."""
    r = _grouped(rewards, group_size).float()  # (B, G)
    flat = torch.isclose(r.max(dim=1).values, r.min(dim=1).values)
    return flat, flat.float().mean().item()


# ----------------------------------------------------------------------------- the objective

def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token unbiased, non-negative KL(pi || pi_ref) estimate (Schulman 2020 "k3"; DeepSeekMath eq. 4):
    pi_ref/pi - log(pi_ref/pi) - 1 = exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def _aggregate(per_token: Tensor, mask: Tensor, agg: LossAggregation, max_len: int | None,
               num_seqs: int | None, num_tokens: int | None) -> Tensor:
    """Reduce a masked (N, T) per-token loss to a scalar; see LossAggregation. per_token is 0 where mask is."""
    n = num_seqs if num_seqs is not None else per_token.shape[0]
    if agg is LossAggregation.SEQUENCE_MEAN:
        lengths = mask.sum(dim=1).clamp(min=1)
        return (per_token.sum(dim=1) / lengths).sum() / n
    if agg is LossAggregation.TOKEN_MEAN:
        tokens = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
        return per_token.sum() / tokens
    if agg is LossAggregation.CONSTANT_NORM:
        if max_len is None:
            raise ValueError("CONSTANT_NORM needs max_len, the generation budget (max_new_tokens)")
        return per_token.sum() / (n * max_len)
    raise ValueError(f"unknown loss aggregation {agg!r}")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                eps_low: float = 0.2, eps_high: float = 0.2, ref_logp: Tensor | None = None, beta: float = 0.0,
                loss_agg: LossAggregation = LossAggregation.SEQUENCE_MEAN, max_len: int | None = None,
                num_seqs: int | None = None, num_tokens: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Negated GRPO objective (DeepSeekMath eq. 3; R1 eq. 1) with DAPO's decoupled clip, to minimise:
    per token  -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_k3,  rho = exp(logp - old_logp),
    then reduced over tokens by `loss_agg`.

    logp (N, T) carries the gradient; old_logp, ref_logp (N, T) and advantages (N,) are treated as constants;
    mask (N, T) is 1 on completion tokens. max_len is the constant of CONSTANT_NORM. When a batch is split
    into micro-batches, pass the full batch's num_seqs / num_tokens so the micro-batch losses sum to its loss.
    Returns (loss, stats): detached scalars pg_loss, kl (when ref_logp is given), clip_frac (tokens where the
    clipped term won and so gives no gradient), clip_low_frac, clip_high_frac, ratio_mean, ratio_max, tokens.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"shapes: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
                         f"mask {tuple(mask.shape)} must be (N, T) and advantages {tuple(advantages.shape)} (N,)")
    valid = mask.bool()
    # Zero the log-ratio off the mask *before* exp, so padding (even inf/nan logps) cannot leak nan into the grad.
    log_ratio = torch.where(valid, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)                                    # (N, T)
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)           # (N, 1), one advantage for all of o_i's tokens
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    pg_per_token = torch.where(valid, -surrogate, torch.zeros_like(surrogate))
    pg_loss = _aggregate(pg_per_token, valid, loss_agg, max_len, num_seqs, num_tokens)
    loss = pg_loss
    kl_per_token = None
    if ref_logp is not None:
        d = torch.where(valid, ref_logp.detach() - logp, torch.zeros_like(logp))
        kl_per_token = torch.exp(d) - d - 1.0                       # k3_kl, written on the masked difference
        if beta != 0.0:
            loss = loss + beta * _aggregate(kl_per_token, valid, loss_agg, max_len, num_seqs, num_tokens)
    elif beta != 0.0:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")

    with torch.no_grad():
        count = valid.sum().clamp(min=1)
        low = (ratio < 1.0 - eps_low) & (adv < 0) & valid           # clipped from below: A < 0 cannot push further
        high = (ratio > 1.0 + eps_high) & (adv > 0) & valid         # clipped from above: A > 0 cannot push further
        stats = {
            "pg_loss": pg_loss.detach(),
            "clip_frac": (low | high).sum() / count,
            "clip_low_frac": low.sum() / count,
            "clip_high_frac": high.sum() / count,
            "ratio_mean": (ratio * valid).sum() / count,
            "ratio_max": ratio.masked_fill(~valid, float("-inf")).max() if valid.any() else ratio.new_tensor(1.0),
            "tokens": valid.sum(),
        }
        if kl_per_token is not None:
            stats["kl"] = (kl_per_token * valid).sum() / count
    return loss, stats


# ----------------------------------------------------------------------------- log-probs and entropy

def gather_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                    chunk_values: int = 1 << 24) -> Tensor:
    """log softmax(logits / temperature)[tokens] in float32: logits (N, T, V), tokens (N, T) -> (N, T).

    Computed as z[token] - logsumexp(z), which never materialises the (N, T, V) log-softmax; low-precision
    logits are upcast a few sequences at a time (at most `chunk_values` values), which bounds the float32
    temporaries for a large vocabulary and costs a few ops, not a handful per sequence, for a small one. Use
    the rollout's temperature: the engine's logprobs (old_logp) are under softmax(logits / temperature).
    """
    if temperature <= 0:
        raise NanoR1Error(f"temperature={temperature}: log-probs need temperature > 0 (greedy rollouts "
                          "make every sample of a group identical, so GRPO cannot learn from them)")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree")
    tokens = tokens.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        z = logits if temperature == 1.0 else logits / temperature
        return (z.gather(-1, tokens).squeeze(-1) - torch.logsumexp(z, dim=-1)).float()
    per_chunk = max(1, chunk_values // max(1, logits.shape[1] * logits.shape[2]))
    parts = []
    for z_part, t_part in zip(logits.split(per_chunk), tokens.split(per_chunk)):  # (n, T, V), (n, T, 1)
        z = z_part.float() if temperature == 1.0 else z_part.float() / temperature  # x / 1 == x: skip the pass
        parts.append(z.gather(-1, t_part).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@torch.no_grad()
def token_entropy(logits: Tensor, mask: Tensor, temperature: float = 1.0, chunk: int = 1024) -> Tensor:
    """Mean entropy H = -sum_v p_v log p_v over masked positions of logits (N, T, V) (a diagnostic: entropy
    collapse is what DAPO's clip-higher fights). Uses H = logsumexp(z) - sum_v p_v z_v on `chunk` rows at a
    time in float32, and only on masked rows. Returns a float32 scalar (0 when the mask is empty)."""
    flat = logits.reshape(-1, logits.shape[-1])                     # (N*T, V)
    rows = mask.reshape(-1).bool().nonzero().squeeze(1)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for s in range(0, rows.numel(), chunk):
        z = flat[rows[s:s + chunk]].float() / temperature           # (chunk, V)
        log_z = torch.logsumexp(z, dim=-1, keepdim=True)
        p = torch.exp(z - log_z)
        pz = torch.where(p > 0, p * z, torch.zeros_like(z))         # 0 * -inf (a masked-out vocab entry) is 0
        total += (log_z.squeeze(-1) - pz.sum(-1)).sum()
    return total / max(rows.numel(), 1)
