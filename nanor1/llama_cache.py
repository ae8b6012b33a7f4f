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
        self.source = torch.arange(n_slots, device=device)  # slot s reads positions < shared[s] from source[s]
        self.shared = torch.zeros(n_slots, dtype=torch.long, device=device)

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
            self.source[dst], self.shared[dst] = src, torch.where(src != dst, self.lengths[dst], 0)
            return
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def release(self, slot: int) -> None:
        readers = ((self.source == slot) & (self.shared > 0)).nonzero()[:, 0]
        readers = readers[readers != slot]
        if len(readers):  # they keep decoding: give them their own copy of the prompt
            n = int(self.shared[readers].max())
            self.k[:, readers, :, :n] = self.k[:, slot, None, :, :n]
            self.v[:, readers, :, :n] = self.v[:, slot, None, :, :n]
            self.source[readers], self.shared[readers] = readers, 0
        self.source[slot], self.shared[slot], self.lengths[slot] = slot, 0, 0
