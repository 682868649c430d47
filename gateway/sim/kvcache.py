"""The KV cache of one simulated replica: prompt blocks under chained hashes, reused as a prefix
and evicted least recently used, as vLLM's v1 block pool does.

What was read in vLLM (vllm-project/vllm), and what the sim keeps of it:
- `vllm/config/cache.py` @002f10e (`CacheConfig.DEFAULT_BLOCK_SIZE = 16`,
  `enable_prefix_caching = True`): 16-token blocks, prefix caching on by default.
- `vllm/v1/core/kv_cache_manager.py` @003df29 (`get_computed_blocks`): a hit is the longest run
  of leading full blocks whose hash is cached, capped at `prompt_tokens - 1` tokens because the
  last prompt token is always recomputed for its logits; the stats count every prompt token as
  queried and the hit's tokens as hits, once per scheduled request.
- `vllm/v1/core/block_pool.py` (`free_blocks`, `get_usage`): a block no request holds goes to the
  tail of the free queue, the head is evicted first; a request's blocks are freed last block
  first, so a shared prefix outlives its tails; usage is `1 - free / total`, where cached blocks
  no request holds count as free.

Simplifications: only full prompt blocks are hashed (vLLM also caches blocks its decode fills,
which a next turn can hit only if the chat template renders the answer identically); a request
reserves the blocks of its whole sequence (prompt and planned output) when it is admitted, so it
never grows into a full cache and nothing is preempted: a request that does not fit waits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["KVCache", "KVLease", "block_hashes"]

# The parent of a prompt's first block: any fixed value, so equal prompts hash alike everywhere.
_ROOT_HASH = 0


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """One hash per full block of `token_ids`, each chained over the blocks before it.

    Chaining makes a block's hash name its whole prefix: one changed token changes the hash
    of its block and of every block after it. A partial last block gets no hash.

    Python's hash of a tuple of ints does not depend on PYTHONHASHSEED, so every process (and
    every replica) gives a prompt the same hashes.
    """
    hashes: list[int] = []
    parent = _ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return tuple(hashes)


@dataclass(frozen=True, slots=True)
class KVLease:
    """The blocks one admitted request holds until it ends, and how much of its prompt hit."""

    hashes: tuple[int, ...]  # its full prompt blocks, shared with any request that hits them
    unhashed: int  # its partial prompt block and its output blocks, its own alone
    prompt_tokens: int
    cached_tokens: int  # leading prompt tokens found in the cache: no prefill for them

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class KVCache:
    """`capacity` blocks of `block_size` tokens; cached prompt blocks outlive their requests.

    A hashed block is resident while it is in `_refs` (with the number of running requests
    that hold it); one no request holds is also in `_free`, oldest first, and is evicted
    from there when a new block needs room.
    """

    def __init__(self, capacity: int, block_size: int) -> None:
        if capacity < 1 or block_size < 1:
            raise ValueError(
                f"capacity and block_size must be >= 1, got {capacity!r} and {block_size!r}"
            )
        self.capacity = capacity
        self.block_size = block_size
        self._refs: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict()
        self._unhashed = 0
        # vLLM's prefix cache stats, in tokens (PrefixCacheStats.queries / .hits).
        self.queries = 0
        self.hits = 0

    @property
    def blocks_in_use(self) -> int:
        """Blocks held by running requests; cached blocks nobody holds are not counted."""
        return len(self._refs) - len(self._free) + self._unhashed

    @property
    def cached_blocks(self) -> int:
        """Hashed blocks resident, held or not: what a next prompt could hit."""
        return len(self._refs)

    @property
    def usage(self) -> float:
        """vLLM's KV-cache usage: the share of blocks running requests hold (0..1)."""
        return self.blocks_in_use / self.capacity

    def cached_prefix_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are resident now."""
        count = 0
        for block in hashes:
            if block not in self._refs:
                break
            count += 1
        return count

    def allocate(
        self, hashes: Sequence[int], prompt_tokens: int, total_tokens: int
    ) -> KVLease | None:
        """Admit a sequence of `total_tokens` whose prompt's full blocks are `hashes`.

        None when the blocks it needs beyond those it can share do not fit, even after evicting
        every block no request holds: the request must wait. A sequence longer than the whole
        cache is cut to it (vLLM refuses to start with a context window that does not fit).
        """
        size = self.block_size
        blocks = min(-(-max(total_tokens, prompt_tokens) // size), self.capacity)
        hashes = tuple(hashes[:blocks])
        # At least the last prompt token is computed again, for its logits.
        hit = min(self.cached_prefix_blocks(hashes), max(prompt_tokens - 1, 0) // size)
        resident = [block for block in hashes if block in self._refs]
        revived = sum(1 for block in resident if self._refs[block] == 0)
        unhashed = blocks - len(hashes)
        new = len(hashes) - len(resident) + unhashed
        if new + revived > self.capacity - self.blocks_in_use:
            return None
        # Take the resident blocks first, so making room for the new ones cannot evict them.
        for block in resident:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        for block in hashes:
            if block not in self._refs:
                self._make_room()
                self._refs[block] = 1
        for _ in range(unhashed):
            self._make_room()
            self._unhashed += 1
        self.queries += prompt_tokens
        self.hits += hit * size
        return KVLease(hashes, unhashed, prompt_tokens, hit * size)

    def free(self, lease: KVLease) -> None:
        """Give back a finished request's blocks; its prompt blocks stay cached until evicted."""
        # Last block first: the tail is evicted before the prefix other prompts may share.
        for block in reversed(lease.hashes):
            count = self._refs[block] - 1
            self._refs[block] = count
            if count == 0:
                self._free[block] = None
        self._unhashed -= lease.unhashed

    def _make_room(self) -> None:
        if len(self._refs) + self._unhashed >= self.capacity:
            oldest, _ = self._free.popitem(last=False)
            del self._refs[oldest]
