"""Paged KV blocks: allocation, reference counts and prefix caching. Pure Python (no tensors).

A block holds ``block_size`` (16) token slots of every layer's K/V pool. A sequence owns the blocks of
its ``block_table`` in order; token ``i`` lives in slot ``block_table[i // bs] * bs + i % bs``.

Prefix caching: once a *full* block's K/V has been computed, the block is registered under a hash
chained over all tokens up to its end (``hash((parent_hash, tokens))``), so a later sequence with the
same prefix takes the block by reference instead of recomputing it. Only computed, full blocks are
registered, so a shared block is never written again (new tokens always land in a private block).
A freed block keeps its hash until it is handed out for something else (a free list in LRU order), so
a finished request's prefix stays reusable while memory allows.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import PLACEHOLDER, Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed
    token_ids: tuple[int, ...] = ()  # the tokens behind ``hash`` (guards against hash collisions)


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.hash_to_block: dict[int, int] = {}

    # ---------------------------------------------------------------------------------------- queries
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest registered prefix of seq's tokens, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:  # scores every prompt token
            return []
        hits, parent, bs = [], None, self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = chain_hash(parent, tokens)
            bid = self.hash_to_block.get(parent)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # cached but on the free list
        return fresh + revived <= self.num_free_blocks

    # ------------------------------------------------------------------------------------ allocation
    def _take_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.hash is not None and self.hash_to_block.get(blk.hash) == bid:
            del self.hash_to_block[blk.hash]  # evict: its content is about to be overwritten
        blk.hash, blk.token_ids, blk.ref_count = None, (), 1
        return bid

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached prefix blocks; sets num_computed_tokens."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError("allocate() called without free blocks; check can_allocate() first")
        hits = self._cached_prefix(seq)
        for bid in hits:
            blk = self.blocks[bid]
            if blk.ref_count == 0:
                del self.free[bid]
            blk.ref_count += 1
        seq.block_table = hits + [self._take_free() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Make room for num_new_tokens more computed tokens (a block when a page boundary is crossed)."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError("append() called without free blocks; check can_append() first")
        seq.block_table.extend(self._take_free() for _ in range(max(need, 0)))

    def free_seq(self, seq: Sequence) -> None:
        """Drop seq's references (finish or preemption); blocks reaching 0 go to the free list's end."""
        for bid in reversed(seq.block_table):  # tail first: the prefix blocks are evicted last
            blk = self.blocks[bid]
            blk.ref_count -= 1
            if blk.ref_count < 0:
                raise RuntimeError(f"block {bid} freed more often than allocated")
            if blk.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    def register_computed(self, seq: Sequence) -> None:
        """Register seq's newly computed full blocks in the prefix cache (call after each step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            if PLACEHOLDER in tokens:  # a token still in flight (asynchronous steps): registered once it lands
                break
            h = chain_hash(parent, tokens)
            blk = self.blocks[seq.block_table[i]]
            blk.hash, blk.token_ids = h, tokens
            self.hash_to_block.setdefault(h, blk.block_id)  # an equal block registered first stays
            parent = h
            seq.num_hashed_blocks = i + 1

    # ------------------------------------------------------------------------------------ invariants
    def check(self, live: list[Sequence]) -> None:
        """Assert the bookkeeping is consistent with the live sequences (tests call this)."""
        counts = [0] * self.num_blocks
        for seq in live:
            if len(set(seq.block_table)) != len(seq.block_table):
                raise AssertionError(f"sequence {seq.seq_id} holds a block twice")
            for bid in seq.block_table:
                counts[bid] += 1
        for blk, n in zip(self.blocks, counts):
            if blk.ref_count != n:
                raise AssertionError(f"block {blk.block_id}: ref_count {blk.ref_count}, referenced {n} times")
            if (n == 0) != (blk.block_id in self.free):
                raise AssertionError(f"block {blk.block_id}: ref_count {n} but free-list membership wrong")
            if n > 1 and blk.hash is None:
                raise AssertionError(f"block {blk.block_id} is shared but not a registered full block")
        for h, bid in self.hash_to_block.items():
            if self.blocks[bid].hash != h:
                raise AssertionError(f"hash table points at block {bid}, which holds other content")
