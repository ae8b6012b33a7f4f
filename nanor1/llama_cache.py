"""The KV cache of FastLlama (nanor1/hf_llama.py): keys and values per layer and slot, grown in blocks, with
prompts that several slots repeat kept once where the CPU decode kernels read it (nanor1/cpu_decode.py)."""

from __future__ import annotations

import torch

from nanor1.common import round_up

_BLOCK = 16  # cache positions are added this many at a time


class LlamaCache:
    """Keys and values of every layer per slot: k, v (n_layers, n_slots, n_kv_heads, capacity, head_dim).

    Capacity grows in small blocks as sequences lengthen (a model's context is often far longer than a rollout),
    and decode attends over the whole capacity with a mask, so no step copies a strided slice of the cache and
    at most a block of masked keys is read for nothing. A growth copies the cache once per block of tokens.

    With `share_prompts` (the decode-attention kernel reads the cache, nanor1/cpu_decode.py), rows that
    repeat a prompt (GRPO's group) keep no copy of it: slot s reads its first shared[s] positions from slot
    source[s]. Reading the cache is most of that attention's time, and the prompt is most of the cache. A source
    released while rows still read from it copies its prompt to them first, so its slot can take a new prompt.
    """

    def __init__(self, n_layers: int, n_slots: int, n_kv: int, head_dim: int, max_len: int, dtype, device,
                 share_prompts: bool = False):
        self.shape = (n_layers, n_slots, n_kv, 0, head_dim)
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.k = torch.zeros(self.shape, dtype=dtype, device=device)
        self.v = torch.zeros(self.shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.share_prompts = share_prompts
        # slot s reads its positions below shared[s] from slot source[s]; Python lists, as releases and admissions
        # change single entries, and the decode kernel takes them per step as (B,) tensors (`sharing`)
        self.source, self.shared = list(range(n_slots)), [0] * n_slots

    def ensure(self, length: int) -> None:
        cap = self.k.shape[3]
        if length <= cap:
            return
        new = min(self.max_len, round_up(length, _BLOCK))
        shape = (*self.shape[:3], new, self.shape[4])
        for name in ("k", "v"):
            grown = torch.zeros(shape, dtype=self.dtype, device=self.device)  # zeros: masked keys stay finite
            grown[:, :, :, :cap] = getattr(self, name)
            setattr(self, name, grown)

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Rows dst take the first `length` positions of rows src, their prompts' (dst's lengths already set)."""
        if self.share_prompts:
            for s, d, n in zip(src.tolist(), dst.tolist(), self.lengths[dst].tolist()):
                if s != d:
                    self.source[d], self.shared[d] = s, n
            return
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def sharing(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, shared) of these slots, as (B,) tensors for the decode kernel."""
        return (torch.tensor([self.source[r] for r in rows], device=self.device),
                torch.tensor([self.shared[r] for r in rows], device=self.device))

    def release(self, slot: int) -> None:
        readers = [d for d, s in enumerate(self.source) if s == slot and d != slot]
        if readers:  # they keep decoding: give them their own copy of the prompt
            n, index = max(self.shared[d] for d in readers), torch.tensor(readers, device=self.device)
            self.k[:, index, :, :n] = self.k[:, slot, None, :, :n]
            self.v[:, index, :, :n] = self.v[:, slot, None, :, :n]
            for d in readers:
                self.source[d], self.shared[d] = d, 0
        self.source[slot], self.shared[slot] = slot, 0  # a reader itself: its next prompt is its own
        self.lengths[slot] = 0
