"""Re-quantizing a merged weight without losing what the adapter changed: arithmetic for backend authors.

A backend that declares ``requantize_policies = POLICIES`` implements ``requantize(module, weight, policy=...)`` with
these pieces and :func:`by_policy`; the built-in bnb, hqq and torchao backends do.

A merged weight is ``W' = deq(Q(W)) + dW``: the de-quantized base (which lies exactly on the base's quantization
grid) plus the adapter's change. Quantizing ``W'`` afresh (what PEFT's ``merge_and_unload`` does) computes new
scales from ``W'``; the grid moves a little, so *every* weight is rounded again and the merged layer carries a new
quantization error of the size of the original one -- usually far larger than ``dW`` itself.

The policy here (``"best"``), per quantization unit (an 8-bit row, an HQQ group, a bitsandbytes 4-bit block):

1. ``grid``: keep the original scale (and zero), round ``W'`` to the nearest point of that same grid. A weight that the
   adapter moved by less than half a step keeps its code; the error is at most ``|dW|`` per weight, so this alone is
   never worse than not merging at all.
2. ``refit``: keep the codes of (1) and re-fit the unit's scale (and zero) by least squares, then round again: it keeps
   the part of ``dW`` that is a rescaling of the unit (IA3, DoRA's magnitude, row-scaled LoRA updates).
3. ``fresh``: the backend's own quantization of ``W'`` (PEFT's result).

and keeps, per unit, the candidate with the smallest ``||deq(Q(W')) - W'||``. Since ``fresh`` is a candidate, the
merged layer's weight error is never above PEFT's; the backends check that on the finished layer too (its real
de-quantization) and fall back to ``fresh`` if rounding of stored scales ever made it otherwise.

Nearest rounding is the least-squares optimum for a fixed grid, so rounding "towards dW" cannot lower this error
(it was measured: see docs/merging.md).
"""

from __future__ import annotations

POLICIES = ("best", "grid", "fresh")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown requantize policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return policy


def pick(errors, values):
    """Per unit (rows of ``errors``, shape (candidates, units)), the candidate with the smallest error.

    ``values`` is a list (one per candidate) of tensors with the unit along dim 0; returns the mixed tensor and the
    chosen index per unit. Ties go to the earlier candidate.
    """
    import torch

    choice = torch.stack(errors).argmin(dim=0)
    out = values[0].clone()
    for index in range(1, len(values)):
        mask = choice == index
        out[mask] = values[index][mask]
    return out, choice


def unit_error(deq, target):
    """Squared error per unit (row) of two (units, n) tensors."""
    return (deq.float() - target.float()).pow(2).sum(dim=1)


# ------------------------------------------------------------------------------------------ symmetric per-row int8
def int8_rows(target, scale, qmin, qmax, deq):
    """Candidates ``grid`` and ``refit`` for a symmetric per-row integer format.

    :param target: (rows, cols) float32 ``W'``.
    :param scale: (rows,) the original per-row scale in the format's own units.
    :param deq: ``deq(codes, scale) -> float32`` exactly as the format de-quantizes; ``scale`` (rows,).
    :param qmin/qmax: code range.
    :return: list of (codes, scale) candidates.
    """
    import torch

    step = deq(torch.ones_like(target[:, :1]), scale).squeeze(1)  # value of code 1: the grid step per row
    grid_codes = torch.clamp(torch.round(target / step.view(-1, 1)), qmin, qmax)
    # least-squares step for these codes, then round again with it
    qq = (grid_codes * grid_codes).sum(dim=1)
    ls_step = torch.where(qq > 0, (grid_codes * target).sum(dim=1) / qq.clamp_min(1), step)
    ls_scale = scale * (ls_step / step.clamp_min(1e-30))
    ls_scale = torch.where(torch.isfinite(ls_scale) & (ls_scale > 0), ls_scale, scale).to(scale.dtype)
    ls_step = deq(torch.ones_like(target[:, :1]), ls_scale).squeeze(1)
    ls_codes = torch.clamp(torch.round(target / ls_step.view(-1, 1)), qmin, qmax)
    return [(grid_codes, scale), (ls_codes, ls_scale)]


def best_rows(target, candidates, deq):
    """Mix (codes, scale) candidates per row; returns (codes, scale, choice, per-candidate errors)."""
    errors = [unit_error(deq(codes, scale), target) for codes, scale in candidates]
    codes, choice = pick(errors, [codes for codes, _ in candidates])
    scale, _ = pick(errors, [scale for _, scale in candidates])
    return codes, scale, choice, errors


# ------------------------------------------------------------------------------------------ affine groups (HQQ)
def affine_groups(target, scale, zero, nbits, deq, iterations: int = 2):
    """Candidates ``grid`` and ``refit`` for an asymmetric grouped format ``w = (q - zero) * scale``.

    :param target: (groups, group_size) float32.
    :param scale, zero: (groups, 1) as stored.
    :param deq: ``deq(q, scale, zero) -> float32``, the format's own arithmetic (its dtype rounding included).
    :return: list of (codes, scale, zero) candidates.
    """
    import torch

    qmax = 2**nbits - 1
    s, z = scale.float(), zero.float()
    grid = torch.clamp(torch.round(target / s + z), 0, qmax)
    candidates = [(grid, scale, zero)]
    q = grid
    for _ in range(iterations):
        # least squares w ~ a * q + b per group; scale = a, zero = -b / a
        mq, mw = q.mean(dim=1, keepdim=True), target.mean(dim=1, keepdim=True)
        var = ((q - mq) ** 2).sum(dim=1, keepdim=True)
        cov = ((q - mq) * (target - mw)).sum(dim=1, keepdim=True)
        ok = (var > 0) & (cov.abs() > 0)
        a = torch.where(ok, cov / var.clamp_min(1e-30), s)
        b = torch.where(ok, mw - a * mq, -s * z)
        a_safe = torch.where(a.abs() > 1e-30, a, s)
        new_s = torch.where(ok & (a > 0), a_safe, s).to(scale.dtype)
        new_z = torch.where(ok & (a > 0), -b / a_safe, z).to(zero.dtype)
        q = torch.clamp(torch.round(target / new_s.float() + new_z.float()), 0, qmax)
        candidates.append((q, new_s, new_z))
    return candidates


def best_groups(target, candidates, deq):
    errors = [unit_error(deq(q, s, z), target) for q, s, z in candidates]
    q, choice = pick(errors, [c[0] for c in candidates])
    s, _ = pick(errors, [c[1] for c in candidates])
    z, _ = pick(errors, [c[2] for c in candidates])
    return q, s, z, choice, errors


# ------------------------------------------------------------------------------------------ bitsandbytes 4-bit
def sorted_code(code):
    """``(order, ordered, midpoints)`` of a 1-D code table: ``ordered = code[order]`` ascending, and the midpoints
    between neighbours, so that ``order[torch.bucketize(x, midpoints)]`` is the index of the nearest code (sorted
    once, not per call)."""
    import torch

    order = torch.argsort(code)
    ordered = code[order]
    return order, ordered, (ordered[1:] + ordered[:-1]) / 2


def blockwise_4bit(target, absmax_candidates, code, elements: int = 1 << 22):
    """For each block (row of ``target``, shape (blocks, blocksize)) and each candidate absmax (blocks, k), the
    nearest 4-bit codes; returns (codes (blocks, blocksize), chosen candidate index (blocks,), its error (blocks,)).

    De-quantization is ``code[q] * absmax`` in float32, as bitsandbytes does. Works on ``elements`` candidate values
    at a time (in place where it can: this search is most of a bitsandbytes merge's time on CPU).
    """
    import torch

    blocks, k = absmax_candidates.shape
    n = target.shape[1]
    best_q = torch.empty(target.shape, dtype=torch.uint8, device=target.device)
    best_k = torch.empty(blocks, dtype=torch.long, device=target.device)
    best_e = torch.empty(blocks, dtype=torch.float32, device=target.device)
    order, ordered, mids = sorted_code(code)
    step = max(1, elements // (k * n))
    for start in range(0, blocks, step):
        t = target[start : start + step]  # (b, n)
        a = absmax_candidates[start : start + step].float()  # (b, k)
        safe = torch.where(a.abs() > 0, a, torch.ones_like(a))
        x = (t.unsqueeze(1) / safe.unsqueeze(2)).clamp_(-1, 1)  # (b, k, n)
        rank = torch.bucketize(x, mids, out_int32=True)  # index into the sorted table
        error = ordered[rank].mul_(a.unsqueeze(2)).sub_(t.unsqueeze(1)).square_().sum(dim=2)  # (b, k)
        e, idx = error.min(dim=1)
        best_k[start : start + step] = idx
        best_e[start : start + step] = e
        chosen = torch.gather(rank, 1, idx.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1).long()
        best_q[start : start + step] = order[chosen].to(torch.uint8)
    return best_q, best_k, best_e


# ------------------------------------------------------------------------------------------ output-aware rounding
def gptq_on_grid(target, hessian, round_column, damp: float = 0.01, block: int = 128):
    """Round ``target`` (out, in) onto a FIXED grid column by column, feeding each column's rounding error forward
    to the columns not yet rounded (GPTQ's update with the inverse Hessian), so that the layer's OUTPUT error on the
    inputs ``hessian`` = X^T X describes is small rather than the weight error.

    :param round_column: ``(j, values (out,)) -> (out,)`` the nearest grid values for column ``j``.
    :return: (out, in) float32 grid values; rounding them onto the grid again gives them back.
    """
    import torch

    weight = target.float().clone()
    columns = weight.shape[1]
    h = hessian.float().clone().to(weight.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.diag(h).mean() * torch.eye(columns, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(weight)
    # GPTQ's lazy batch update: within a block of columns every column's error goes to the block's later columns at
    # once; the block's errors reach the columns after it in one matrix product (the same arithmetic as updating all
    # later columns after each column, with far less memory traffic: the same rounding 4x faster on a 512 x 1024 layer on CPU)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part = weight[:, start:end].clone()
        errors = torch.empty_like(part)
        for i in range(end - start):  # few kernels per column: on a GPU this loop is bound by their launches
            j = start + i
            column = part[:, i]
            rounded = round_column(j, column)
            out[:, j] = rounded
            error = errors[:, i]
            torch.sub(column, rounded, out=error).div_(hinv[j, j])
            part[:, i + 1 :].addr_(error, hinv[j, j + 1 : end], alpha=-1)
        if end < columns:
            weight[:, end:] -= errors @ hinv[start:end, end:]
    return out


def output_error(deq, target, hessian):
    """tr(E H E^T) for E = deq - target: the squared output error on the inputs ``hessian`` describes."""
    e = deq.float() - target.float()
    return ((e @ hessian.float().to(e.device)) * e).sum().item()


def affine_columns(scale, zero, qmin, qmax):
    """``round_column`` for ``w = (clamp(round(w / s + z)) - z) * s`` with per-element maps ``scale``/``zero`` (out, in)."""
    import torch

    def round_column(j, values):
        s, z = scale[:, j], zero[:, j]
        return torch.round(values / s + z).clamp_(qmin, qmax).sub_(z).mul_(s)

    return round_column


def codebook_columns(absmax, code):
    """``round_column`` for bitsandbytes' ``code[q] * absmax`` with a per-element map ``absmax`` (out, in)."""
    import torch

    _, ordered, mids = sorted_code(code)
    safe = torch.where(absmax.abs() > 0, absmax, torch.ones_like(absmax))

    def round_column(j, values):
        return ordered[torch.bucketize((values / safe[:, j]).clamp_(-1, 1), mids)].mul_(absmax[:, j])

    return round_column


def by_policy(backend, policy, weight, hessian, fresh, on_grid, on_grid_with_inputs):
    """The policy logic every backend shares, given its own pieces.

    :param fresh: the layer quantized afresh (PEFT's result).
    :param on_grid: ``on_grid(policy)``: the layer rounded onto the original grid (``"grid"``) or the best per unit
        (``"best"``); None where the layout is not covered (then ``fresh`` stands).
    :param on_grid_with_inputs: ``on_grid_with_inputs()``: GPTQ-style rounding with ``hessian``, or None.
    """
    check_policy(policy)
    if policy == "fresh":
        return fresh
    kept = on_grid(policy)
    if kept is None or policy == "grid":
        return kept if kept is not None else fresh
    candidates = [fresh, kept]
    if hessian is not None:
        candidates.append(on_grid_with_inputs())
    return closest(backend, candidates, weight, hessian)


def closest(backend, candidates, target, hessian=None):
    """The candidate layer whose real de-quantized weight is closest to ``target``: in output error on the inputs
    ``hessian`` describes when given, else in weight error. Ties go to the earlier candidate."""
    best, best_error = None, None
    for layer in candidates:
        if layer is None:
            continue
        deq = backend.dequantize(layer)
        t = target.float().to(deq.device)
        error = output_error(deq, t, hessian) if hessian is not None else (deq - t).norm().item()
        if best_error is None or error < best_error:
            best, best_error = layer, error
    return best
