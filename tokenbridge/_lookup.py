"""The exact CPU lookup behind `DimensionwiseQuantizer` (see tokenbridge/quantizer.py for the definition).

A float32 latent's index is the number of float32 midpoints below it. `cell_tables` turns that count into a table
read keyed by the float's top 16 bits plus a few comparisons; `fused_lookup` / `fused_lookup_shared` do the whole
lookup in one pass per element with numba (optional: `pip install tokenbridge[fast]`); without numba the quantizer
runs the same lookup as a few torch ops per chunk of `CHUNK` elements. `lookup` runs either on flat latents.

`released_search` is the quantizer's other arithmetic: the released TokenBridge code's float32 map and nearest
float32 value (`released_map`, `released_values`), on any device.
"""
from __future__ import annotations

import math

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

try:  # optional (`pip install tokenbridge[fast]`): one fused pass per element instead of ~8 torch ops per chunk
    import numba
except ImportError:
    numba = None

# CPU lookup: elements per step. Working buffers stay in L2 cache, and torch runs ops this small on the calling
# thread (its parallel grain is 32768), so there is no thread hand-off per op, which is slow on a busy machine.
CHUNK = 1 << 15
# A float32 is looked up by its top 16 bits (sign, exponent, 7 mantissa bits): key = (int32 bits >> 16) + 2**15.
KEY_SHIFT = 16
KEYS = 1 << (32 - KEY_SHIFT)  # table entries per row
KEY_OFFSET = KEYS // 2
# Beyond this many comparisons per element the lookup is no faster than a binary search over the midpoints
# (measured on one core: depth 52 lookup 1.5x faster than the search, depth 119 even, depth 205 3x slower)...
MAX_DEPTH = 64
# ... and beyond this size the tables cost more memory than they are worth (B = 65536 default levels: ~30 MB).
MAX_TABLE_BYTES = 256 * 2**20


def _key_ranges() -> tuple[np.ndarray, np.ndarray]:
    """The closed interval [lo, hi] of float32 values that each of the 2**16 keys covers, `[2**16]` each.

    The keys of +inf/-inf get lo = hi = +inf/-inf: a finite float64 latent beyond the float32 range becomes
    +-inf when cast, and must count all midpoints (+inf, last index) or none (-inf, index 0). The other
    exponent-all-ones keys hold only NaNs, which the quantizer rejects, so any entry will do for them.
    """
    top = np.arange(-KEY_OFFSET, KEY_OFFSET, dtype=np.int32) << KEY_SHIFT  # the bits of each key's floats
    ends = np.stack([top.view(np.float32), (top | ((1 << KEY_SHIFT) - 1)).view(np.float32)])
    with np.errstate(invalid="ignore"):
        lo, hi = ends.min(0), ends.max(0)
    finite = np.isfinite(lo) & np.isfinite(hi)
    infinite = np.where(top < 0, -np.inf, np.inf).astype(np.float32)  # sign bit set: the -inf key
    return np.where(finite, lo, infinite), np.where(finite, hi, infinite)


def cell_tables(midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Tables that count the midpoints below a float32 x from x's top 16 bits and at most a few comparisons.

    Every 16-bit key covers a closed interval [lo, hi] of float32 values (same sign, exponent and leading
    mantissa bits). For x in that interval, #{m < x} = #{m < lo} + #{m in [lo, x)}, and the midpoints that can lie
    in [lo, x) are the ones in [lo, hi): so count(x) = base[key] + sum_j (cell_mids[j, key] < x), exactly, with no
    arithmetic on x. Keys are relative cells, so they are finest where the Gaussian bins are: one comparison
    (depth 1) suffices up to B = 256 levels; more levels get more comparisons, still exact.

    Args:
        midpoints: `[R, B-1]` float32, finite and ascending along each row (one row per channel, or one shared row).
    Returns:
        base `[R * 2**16]` (uint8 for B <= 256, else int32) and cell_mids `[depth, R * 2**16]` float32 (+inf where
        a cell has fewer midpoints than depth). Row r's entries start at r * 2**16. None when the tables would
        need more than MAX_DEPTH comparisons or MAX_TABLE_BYTES (the quantizer then uses the binary search).
    """
    # Built with numpy: 2**16-element torch ops would each start a thread pool, which costs more than the work.
    mids = midpoints.detach().cpu().float().numpy()
    rows, count = mids.shape
    lo, hi = _key_ranges()
    # depth first, one row at a time, so that tables that are too large are never allocated
    depth = max([int((np.searchsorted(row, hi) - np.searchsorted(row, lo)).max()) for row in mids] + [1])
    base_dtype = np.uint8 if count < 256 else np.int32
    if depth > MAX_DEPTH or rows * KEYS * (4 * depth + np.dtype(base_dtype).itemsize) > MAX_TABLE_BYTES:
        return None
    base = np.empty((rows, KEYS), dtype=base_dtype)
    cell_mids = np.empty((depth, rows, KEYS), dtype=np.float32)
    for r, row in enumerate(mids):
        below = np.searchsorted(row, lo)  # midpoints below the whole cell
        base[r] = below
        padded = np.concatenate([row, np.full(depth, np.inf, dtype=np.float32)])
        for j in range(depth):
            cell_mids[j, r] = padded[below + j]
    return torch.from_numpy(base.reshape(-1)), torch.from_numpy(cell_mids.reshape(depth, -1))


def fused_lookup(x, base, cell_mids, latent_values, channels, indices, values) -> bool:
    """The `cell_tables` lookup of a float32 slice `x` (starting at channel 0) in one pass: writes the int64
    `indices` and, when `values` is non-empty, the float32 latents at them. Returns False if x holds NaN or inf."""
    rows, depth = latent_values.shape[0], cell_mids.shape[0]
    with_values = values.size > 0
    bits = x.view(np.int32)
    nonfinite = 0
    for i in range(x.size):
        nonfinite |= (bits[i] & 0x7F800000) == 0x7F800000  # exponent all ones: inf or NaN
        row = i % channels if rows > 1 else 0
        key = (bits[i] >> KEY_SHIFT) + KEY_OFFSET + row * KEYS
        index = np.int64(base[key])
        for j in range(depth):
            index += np.int64(cell_mids[j, key] < x[i])
        indices[i] = index
        if with_values:
            values[i] = latent_values[row, index]
    return nonfinite == 0


def fused_lookup_shared(x, base, cell_mids, latent_values, channels, indices, values) -> bool:
    """`fused_lookup` for the default quantizer (one shared row, one comparison per value, with values): the
    same integers, about 20% faster without the per-element branches."""
    bits, mids, row_values = x.view(np.int32), cell_mids[0], latent_values[0]
    nonfinite = 0
    for i in range(x.size):
        nonfinite |= (bits[i] & 0x7F800000) == 0x7F800000
        key = (bits[i] >> KEY_SHIFT) + KEY_OFFSET
        index = np.int64(base[key]) + np.int64(mids[key] < x[i])
        indices[i] = index
        values[i] = row_values[index]
    return nonfinite == 0


def fused_released(x, values, a_min, inverse, two_r, r, indices) -> None:
    """`released_search` of a float32 slice `x` in one pass (numba): every operand is a float32 (`a_min`, the
    reciprocal `inverse` of a_max - a_min, 2r and r), so each operation rounds to float32 as the released code's
    do; writes the int64 `indices`. x must be finite."""
    last = values.size - 1
    for i in range(x.size):
        x_hat = ((x[i] - a_min) * inverse) * two_r - r
        x_hat = min(max(x_hat, -r), r)
        lo, hi = 0, values.size  # binary search: the number of values below x_hat
        while lo < hi:
            mid = (lo + hi) >> 1
            if values[mid] < x_hat:
                lo = mid + 1
            else:
                hi = mid
        below, above = max(lo - 1, 0), min(lo, last)
        indices[i] = below if abs(x_hat - values[below]) <= abs(x_hat - values[above]) else above


if numba is not None:
    # nogil: the quantizer's threads each run one on their own slice; cache: compiled once per install
    fused_lookup = numba.njit(nogil=True, cache=True)(fused_lookup)
    fused_lookup_shared = numba.njit(nogil=True, cache=True)(fused_lookup_shared)
    fused_released = numba.njit(nogil=True, cache=True)(fused_released)


class Tables(NamedTuple):
    """A quantizer's lookup tables (R rows: one per channel, or one shared row; B levels)."""

    base: torch.Tensor  # [R * 2**16] uint8 or int32, from cell_tables
    cell_mids: torch.Tensor  # [depth, R * 2**16] float32, from cell_tables
    latent_values: torch.Tensor  # [R, B] float32, the reconstruction values on the latent scale (Eq. 5)
    flat_latent_values: torch.Tensor  # [R * B], the same flattened
    key_offsets: torch.Tensor  # [R] int32: row * 2**16 + 2**15
    value_offsets: torch.Tensor  # [R] int64: row * B


def lookup(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None, channels: int, tables: Tables,
           fused: bool) -> bool:
    """Fill `indices` `[N]` (int64 in [0, B)) and, unless None, `values` `[N]` (float32 latents at them) for the
    flat channel-last CPU latents `flat` `[N]` (any float dtype, N > 0 a multiple of `channels`), by the numba
    kernel when `fused` and numba is installed, else by torch ops. Returns False when `flat` may hold NaN or inf
    (then the caller checks exactly: a float64 beyond the float32 range or a sum that overflowed reads so too)."""
    if fused and numba is not None:
        return _lookup_fused(flat, indices, values, channels, tables)
    step = max(CHUNK // channels, 1) * channels  # chunks start at channel 0
    x_chunks = flat.split(step)
    sums = torch.empty(len(x_chunks), dtype=torch.float32)  # NaN and inf propagate into a chunk's sum
    v_chunks = values.split(step) if values is not None else [None] * len(x_chunks)
    jobs = list(zip(x_chunks, indices.split(step), v_chunks, sums.unbind()))
    workers = min(torch.get_num_threads(), len(jobs))
    if workers > 1:
        # Each op releases the GIL, so threads that each take every workers-th chunk run in parallel.
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda w: _lookup_chunks(jobs[w::workers], step, tables), range(workers)))
    else:
        _lookup_chunks(jobs, step, tables)
    return bool(torch.isfinite(sums).all())


def _lookup_fused(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None, channels: int,
                  tables: Tables) -> bool:
    """`lookup` by the numba kernel: one contiguous slice per thread, each starting at channel 0."""
    x = flat.float().contiguous().numpy()
    out_i, out_v = indices.numpy(), (values.numpy() if values is not None else np.empty(0, np.float32))
    arrays = (tables.base.numpy(), tables.cell_mids.numpy(), tables.latent_values.numpy())
    n = x.size
    workers = max(1, min(torch.get_num_threads(), n // CHUNK))
    step = -(-(n // channels) // workers) * channels
    slices = [slice(start, min(start + step, n)) for start in range(0, n, step)]

    shared = arrays[2].shape[0] == 1 and arrays[1].shape[0] == 1 and out_v.size
    kernel = fused_lookup_shared if shared else fused_lookup

    def run(part: slice) -> bool:
        return kernel(x[part], *arrays, channels, out_i[part], out_v[part] if out_v.size else out_v)

    if len(slices) > 1:
        with ThreadPoolExecutor(len(slices)) as pool:
            return all(pool.map(run, slices))
    return run(slices[0])


def _lookup_chunks(jobs: list, step: int, tables: Tables) -> None:
    """Fill (indices, values, sum) of each (x, indices, values or None, sum) chunk of at most `step` elements."""
    rows = tables.latent_values.shape[0]
    buffers = dict(
        keys=torch.empty(step, dtype=torch.int32),
        count=torch.empty(step, dtype=tables.base.dtype),
        mids=torch.empty(step, dtype=torch.float32),
        below=torch.empty(step, dtype=tables.base.dtype),
        x=torch.empty(step, dtype=torch.float32),
        flat=torch.empty(step if rows > 1 else 0, dtype=torch.int64),
    )
    cell_mids = tables.cell_mids.unbind()
    for xc, ic, vc, total in jobs:
        b = buffers if xc.numel() == step else {k: v[: xc.numel()] for k, v in buffers.items()}  # last chunk
        if xc.dtype != torch.float32:
            xc = b["x"].copy_(xc)  # a float64 beyond the float32 range becomes +-inf: see _key_ranges
        torch.sum(xc, 0, out=total)
        keys, count, mids, below = b["keys"], b["count"], b["mids"], b["below"]
        torch.bitwise_right_shift(xc.view(torch.int32), KEY_SHIFT, out=keys)
        keys.view(-1, rows).add_(tables.key_offsets)  # + row * 2**16 + 2**15
        torch.index_select(tables.base, 0, keys, out=count)
        for table in cell_mids:
            torch.index_select(table, 0, keys, out=mids)
            torch.lt(mids, xc, out=below)
            count.add_(below)
        ic.copy_(count)
        if vc is not None:
            if rows > 1:
                ic = torch.add(ic.view(-1, rows), tables.value_offsets, out=b["flat"].view(-1, rows))
            torch.index_select(tables.flat_latent_values, 0, ic.view(-1), out=vc)


def released_values(levels: int, std_range: float = 3.0, tails: str = "clamped") -> torch.Tensor:
    """The Gaussian bins' reconstruction values [B] as the released code holds them: float32, the truncated normal
    means computed in float32 from float32 boundaries (they differ from the float64 values by up to ~5e-6 at
    B = 64)."""
    probs = torch.linspace(0.0, 1.0, levels + 1, dtype=torch.float32).double()
    bounds = torch.special.ndtri(probs).float()
    if tails == "clamped":
        bounds = bounds.clamp(-std_range, std_range)
    density = torch.exp(-0.5 * bounds**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(bounds / math.sqrt(2)))
    return (density[:-1] - density[1:]) / (cdf[1:] - cdf[:-1])


def released_map(x: torch.Tensor, value_range: tuple[float, float], std_range: float) -> torch.Tensor:
    """Eq. 1 as the released code computes it, (x - a_min) / (a_max - a_min) * 2r - r in float32, with the division
    done as the GPU that code ran on does it: PyTorch's CUDA kernels divide by a Python number by multiplying with
    its float32 reciprocal (on the CPU the same expression divides exactly, which differs in the last bit for ~20 %
    of the values). Any device gives the same floats here. x: float tensor (cast to float32); not clipped."""
    a_min, a_max = value_range
    f32 = torch.float32
    inverse = torch.tensor(1.0, dtype=f32) / torch.tensor(a_max - a_min, dtype=f32)  # 1.0f / 10.0f
    shifted = x.to(f32) - torch.tensor(a_min, dtype=f32, device=x.device)
    return (shifted * inverse.to(x.device)) * (2 * std_range) - std_range


def released_search(x: torch.Tensor, values: torch.Tensor, value_range: tuple[float, float], std_range: float,
                    fused: bool = False) -> torch.Tensor:
    """Indices [...] (int64) of finite latents x [...]: argmin_i |released_map(x) clipped to [-r, r] - values_i|
    over the float32 `values` [B] (ascending), the first i on ties, as the released code takes it. Rounding is
    monotone, so a value beyond the two that bracket x_hat is never nearer than the bracketing one next to it
    (their distances differ by a whole bin, far more than float32 rounding): the argmin over all B is the nearer
    of the bracketing pair, the lower one on a tie. Chunked, so that memory stays small; on the CPU with `fused`
    and numba installed, by the `fused_released` kernel (the same integers)."""
    flat = x.detach().reshape(-1)
    if fused and numba is not None and x.device.type == "cpu" and flat.numel():
        return _released_fused(flat, values, value_range, std_range).view(x.shape)
    out = torch.empty(flat.shape, dtype=torch.int64, device=x.device)
    last = values.numel() - 1
    for start in range(0, flat.numel(), CHUNK):  # CHUNK: no thread hand-off per op (see there)
        x_hat = released_map(flat[start : start + CHUNK], value_range, std_range)
        x_hat = x_hat.clamp_(-std_range, std_range)
        above = torch.searchsorted(values, x_hat)  # values below x_hat: the upper bracketing index
        below = (above - 1).clamp_(min=0)
        above = above.clamp_(max=last)
        lower_wins = (x_hat - values[below]).abs_() <= (x_hat - values[above]).abs_()
        out[start : start + CHUNK] = torch.where(lower_wins, below, above)
    return out.view(x.shape)


def _released_fused(flat: torch.Tensor, values: torch.Tensor, value_range: tuple[float, float],
                    std_range: float) -> torch.Tensor:
    """`released_search` by the numba kernel, one contiguous slice per thread."""
    x = flat.float().contiguous().numpy()
    out = np.empty(x.size, dtype=np.int64)
    a_min, a_max = value_range
    f32 = np.float32
    constants = (f32(a_min), f32(1.0) / f32(a_max - a_min), f32(2 * std_range), f32(std_range))  # as released_map
    table = values.float().cpu().contiguous().numpy()
    workers = max(1, min(torch.get_num_threads(), x.size // CHUNK))
    step = -(-x.size // workers)
    slices = [slice(start, min(start + step, x.size)) for start in range(0, x.size, step)]

    def run(part: slice) -> None:
        fused_released(x[part], table, *constants, out[part])

    with ThreadPoolExecutor(len(slices)) as pool:
        list(pool.map(run, slices))
    return torch.from_numpy(out)
