"""How one linear input of K channels is split into INT4 groups and high-precision outlier channels.

After Atom's reorder the input channels are "normal first, outliers last": channels [0, K - n_out) are
quantized in groups of ``group_size`` (or per row when it is None) and channels [K - n_out, K) are the
outliers (INT8). Real models have K that the requested numbers cannot serve (SmolLM2: K = 576, and
576 - 128 = 448 is not a multiple of 128), so ``plan_split`` adapts them by this documented rule:

1. outliers are capped at K // 4 (a tiny model keeps most channels in 4 bits);
2. if K - n_out is not a multiple of the group size, the group size is halved (128 -> 64 -> 32);
3. if no group size >= 32 divides it, outliers grow until K - n_out is a multiple of 32 (then step 2
   again), as long as they stay at most K // 2;
4. per-row (group_size None) needs only an even K - n_out (INT4 pairs); outliers grow by one if needed.

The result is recorded per linear in the checkpoint (it is implied by the tensor shapes too).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_GROUP = 32


@dataclass(frozen=True)
class Split:
    """The split of one linear input: k channels, the last n_outliers are outliers."""

    k: int
    n_outliers: int
    group_size: int | None  # None: one scale per row over the normal channels

    @property
    def k_normal(self) -> int:
        return self.k - self.n_outliers

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size is None else self.k_normal // self.group_size


def plan_split(k: int, n_outliers: int, group_size: int | None) -> Split:
    """Adapt (n_outliers, group_size) to an input of k channels (rule in the module docstring)."""
    if k < 2:
        raise ValueError(f"cannot quantize a linear with {k} input channels")
    if n_outliers < 0:
        raise ValueError(f"n_outliers must be >= 0, got {n_outliers}")
    if group_size is not None and (group_size < MIN_GROUP or group_size & (group_size - 1)):
        raise ValueError(f"group_size must be a power of two >= {MIN_GROUP} or None, got {group_size}")
    n_out = min(n_outliers, k // 4)
    if group_size is None:
        if (k - n_out) % 2:
            n_out += 1
        return Split(k, n_out, None)
    for extra in (0, (k - n_out) % MIN_GROUP):
        g = group_size
        while g >= MIN_GROUP:
            if k - n_out - extra > 0 and (k - n_out - extra) % g == 0 and n_out + extra <= max(k // 2, n_out):
                return Split(k, n_out + extra, g)
            g //= 2
    raise ValueError(
        f"input dimension {k} cannot be split into groups of {group_size} (or halves down to {MIN_GROUP}) "
        f"with about {n_outliers} outlier channels; choose another --group-size or --outliers"
    )
