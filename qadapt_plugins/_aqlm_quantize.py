"""AQLM's first stage, written for qadapt: residual k-means codebooks, greedy code refinement, per-row scales.

The ``aqlm`` pip package runs AQLM layers but has no quantizer; the authors' quantizer (github.com/Vahe1994/AQLM,
``src/aq.py``) initialises every layer this way and then fine-tunes codes (beam search against calibration
activations) and codebooks (Adam). This module does the initialisation faithfully and replaces the calibrated stage
with cheap data-free refinement that minimises the weight's own squared error:

1. the weight is cut into groups of ``out_group_size x in_group_size`` values; each output group is divided by its
   norm (AQLM's ``scale_nbits=0`` per-output-channel scales);
2. residual k-means: k-means on the groups gives codebook 1; the assigned centroid is subtracted and k-means on the
   residual gives codebook 2, and so on (``init_aq_kmeans``);
3. a few refinement passes, each: re-assign every codebook's code to the nearest entry given the others (greedy
   coordinate descent: a beam search of width 1), re-fit the codebooks by least squares given the codes, and re-fit
   each row's scale by least squares.

Everything here is torch only (no ``aqlm`` import): the result is handed to :func:`to_aqlm_layout` and then to an
``aqlm.QuantizedLinear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-9
#: distance computations are chunked so that one chunk's (points x centroids) matrix stays below this many floats
_CHUNK_FLOATS = 1 << 24


@dataclass
class AQResult:
    codes: torch.Tensor  # [num_out_groups, num_in_groups, num_codebooks], int64 in [0, codebook_size)
    codebooks: torch.Tensor  # [num_codebooks, codebook_size, out_group_size, in_group_size], float32
    scales: torch.Tensor  # [num_out_groups, 1, 1, 1], float32
    capped_kmeans: bool  # True when the codebook had more entries than there were groups to cluster


def _groups(weight: torch.Tensor, out_group_size: int, in_group_size: int) -> torch.Tensor:
    """[out, in] -> [num_out_groups, num_in_groups, out_group_size, in_group_size] (AQLM's layout)."""
    out_features, in_features = weight.shape
    return weight.reshape(
        out_features // out_group_size, out_group_size, in_features // in_group_size, in_group_size
    ).swapaxes(1, 2)


def _ungroup(groups: torch.Tensor) -> torch.Tensor:
    num_out_groups, num_in_groups, out_group_size, in_group_size = groups.shape
    return groups.swapaxes(1, 2).reshape(num_out_groups * out_group_size, num_in_groups * in_group_size)


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) for every point; chunked to bound memory."""
    centroid_norms = (centroids * centroids).sum(-1)
    chunk = max(1, _CHUNK_FLOATS // max(1, centroids.shape[0]))
    out = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    for start in range(0, points.shape[0], chunk):
        block = points[start : start + chunk]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin
        distances = centroid_norms[None, :] - 2.0 * block @ centroids.T
        out[start : start + chunk] = distances.argmin(dim=1)
    return out


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, bool]:
    """Lloyd's k-means with centroids initialised from random points (as AQLM's ``fit_kmeans``).

    Returns ``(centroids [k, dim], capped)``. When there are no more points than centroids, every point becomes its
    own centroid (exact) and the remaining entries are filled with more copies of random points: ``capped`` is True,
    and the codebook then costs more storage than it saves (see ``bits_per_parameter``).
    """
    n, dim = points.shape
    if n <= k:
        extra = points[torch.randint(0, n, (k - n,), generator=generator).to(points.device)]
        return torch.cat([points, extra], dim=0).clone(), True
    # the random draws come from the (CPU) generator whatever the points' device: one seed, one initialisation
    centroids = points[torch.randperm(n, generator=generator)[:k].to(points.device)].clone()
    previous = None
    for _ in range(iterations):
        assignment = nearest(points, centroids)
        if previous is not None and torch.equal(assignment, previous):
            break  # converged: the centroids would not move
        previous = assignment
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).to(points.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # re-seed empty clusters on random points
            centroids[empty] = points[torch.randint(0, n, (int(empty.sum()),), generator=generator).to(points.device)]
    return centroids, False


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of the selected codebook entries: codes [N, M] -> [N, dim] (no scales)."""
    num_codebooks, codebook_size = codebooks.shape[:2]
    flat = codebooks.reshape(num_codebooks * codebook_size, -1)
    offsets = torch.arange(num_codebooks, device=codes.device) * codebook_size
    return flat[codes + offsets].sum(dim=1)


def assign_codes(targets: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor | None, passes: int) -> torch.Tensor:
    """Codes [N, M] whose codebook sum is close to ``targets`` [N, dim].

    Without ``codes``, start greedily (residual assignment, codebook by codebook); then ``passes`` rounds of
    coordinate descent: each codebook's code becomes the nearest entry to what the other codebooks leave over.
    Each step can only lower every group's squared error.
    """
    num_codebooks = codebooks.shape[0]
    flat_books = codebooks.flatten(2)  # [M, K, dim]
    if codes is None:
        codes = torch.zeros(targets.shape[0], num_codebooks, dtype=torch.long, device=targets.device)
        residual = targets.clone()
        for m in range(num_codebooks):
            codes[:, m] = nearest(residual, flat_books[m])
            residual -= flat_books[m][codes[:, m]]
    else:
        codes = codes.clone()
    if num_codebooks == 1:
        if passes > 0:
            codes[:, 0] = nearest(targets, flat_books[0])
        return codes
    for _ in range(passes):
        total = reconstruct(codes, codebooks)
        for m in range(num_codebooks):
            others = total - flat_books[m][codes[:, m]]
            codes[:, m] = nearest(targets - others, flat_books[m])
            total = others + flat_books[m][codes[:, m]]
    return codes


def refit_codebooks(targets: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Least-squares codebooks for fixed codes: minimise ||sum_m C_m[codes_m] - targets||^2.

    With one codebook this is the cluster mean. With several and a small total size (M*K <= 4096) the normal
    equations are solved jointly; otherwise each codebook is refit in turn on what the others leave over.
    Entries no group uses keep their values.
    """
    num_codebooks, codebook_size = codebooks.shape[:2]
    dim = targets.shape[1]
    flat_books = codebooks.reshape(num_codebooks, codebook_size, dim).clone()
    if num_codebooks > 1 and num_codebooks * codebook_size <= 4096:
        size = num_codebooks * codebook_size
        device = targets.device
        index = codes + torch.arange(num_codebooks, device=device) * codebook_size  # [N, M] in [0, size)
        gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        for a in range(num_codebooks):
            for b in range(num_codebooks):
                pair = index[:, a] * size + index[:, b]
                gram.view(-1).index_add_(0, pair, torch.ones(pair.shape[0], dtype=torch.float64, device=device))
        rhs = torch.zeros(size, dim, dtype=torch.float64, device=device)
        for a in range(num_codebooks):
            rhs.index_add_(0, index[:, a], targets.double())
        used = gram.diagonal() > 0
        # a small ridge towards the current values keeps unused / collinear entries where they are
        ridge = 1e-6 * (gram.diagonal().mean() + 1.0)
        current = flat_books.reshape(size, dim).double()
        solution = torch.linalg.solve(
            gram + ridge * torch.eye(size, dtype=torch.float64, device=device), rhs + ridge * current
        )
        solution[~used] = current[~used]
        return solution.to(codebooks.dtype).reshape_as(codebooks)
    total = reconstruct(codes, codebooks)
    for m in range(num_codebooks):
        others = total - flat_books[m][codes[:, m]]
        sums = torch.zeros(codebook_size, dim, device=targets.device).index_add_(0, codes[:, m], targets - others)
        counts = torch.bincount(codes[:, m], minlength=codebook_size).to(targets.dtype)
        used = counts > 0
        flat_books[m][used] = sums[used] / counts[used][:, None]
        total = others + flat_books[m][codes[:, m]]
    return flat_books.reshape_as(codebooks)


def quantize_weight(
    weight: torch.Tensor,
    *,
    in_group_size: int = 8,
    out_group_size: int = 1,
    num_codebooks: int = 1,
    nbits_per_codebook: int = 8,
    kmeans_iterations: int = 20,
    refine_passes: int = 3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> AQResult:
    """AQLM-quantize one ``[out_features, in_features]`` weight; the fitting runs on ``device`` (a CUDA GPU makes the
    k-means of a large model minutes instead of hours) and the result is on the CPU. The random initialisation comes
    from one CPU generator on every device, so a seed gives the same starting centroids anywhere; the fitted values
    then agree up to float rounding (and the nearest-entry ties it can flip)."""
    weight = weight.detach().to(device, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    codebook_size = 2**nbits_per_codebook
    groups = _groups(weight, out_group_size, in_group_size)  # [O, I, og, ig]
    num_out_groups, num_in_groups = groups.shape[:2]
    # AQLM (scale_nbits=0): one scale per output group, the norm of that whole row group
    scales = groups.flatten(1).norm(dim=-1).view(-1, 1, 1, 1) + EPS
    normalised = (groups / scales).reshape(num_out_groups * num_in_groups, out_group_size * in_group_size)

    # residual k-means initialisation (AQLM's init_aq_kmeans)
    residual = normalised.clone()
    books, codes, capped = [], [], False
    for _ in range(num_codebooks):
        book, was_capped = kmeans(residual, codebook_size, kmeans_iterations, generator)
        # a capped codebook holds every (residual) group itself: entry i is group i
        code = torch.arange(residual.shape[0], device=residual.device) if was_capped else nearest(residual, book)
        capped |= was_capped
        residual -= book[code]
        books.append(book)
        codes.append(code)
    codebooks = torch.stack(books).reshape(num_codebooks, codebook_size, out_group_size, in_group_size)
    codes = torch.stack(codes, dim=1)  # [N, M]

    # refinement: codes (coordinate descent), codebooks (least squares), scales (least squares)
    rows = groups.reshape(num_out_groups, -1)  # one output group's values, in group order
    if capped:
        # every group is stored exactly (up to float rounding): there is nothing left to refine
        refine_passes = 0
    for _ in range(refine_passes):
        targets = (groups / scales).reshape_as(normalised)
        codes = assign_codes(targets, codebooks, codes, passes=1)
        codebooks = refit_codebooks(targets, codes, codebooks)
        decoded = reconstruct(codes, codebooks).reshape(num_out_groups, -1)
        scales = ((rows * decoded).sum(-1) / (decoded * decoded).sum(-1).clamp_min(EPS)).view(-1, 1, 1, 1)
        scales = torch.where(scales.abs() < EPS, torch.full_like(scales, EPS), scales)
    if refine_passes:
        # the last scale update moved the targets: one more code pass for the final scales
        codes = assign_codes((groups / scales).reshape_as(normalised), codebooks, codes, passes=1)
    return AQResult(
        codes=codes.reshape(num_out_groups, num_in_groups, num_codebooks).contiguous().cpu(),
        codebooks=codebooks.contiguous().cpu(),
        scales=scales.contiguous().cpu(),
        capped_kmeans=capped,
    )


def dequantize_codes(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[O, I, M] codes (unsigned), codebooks, scales -> weight [out, in] (float32)."""
    num_out_groups, num_in_groups, num_codebooks = codes.shape
    out_group_size, in_group_size = codebooks.shape[2:]
    decoded = reconstruct(codes.reshape(-1, num_codebooks).long(), codebooks.float())
    groups = decoded.reshape(num_out_groups, num_in_groups, out_group_size, in_group_size) * scales.float()
    return _ungroup(groups)


def reassign_codes(
    weight: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, passes: int = 3
) -> torch.Tensor:
    """New codes (unsigned, [O, I, M]) for ``weight`` with the SAME codebooks and scales (used for merging).

    Starts from a fresh greedy assignment and from the old codes, refines both, and keeps, per group, whichever
    is closer to the new weight.
    """
    weight = weight.detach().to("cpu", torch.float32)
    codebooks = codebooks.detach().float().cpu()
    scales = scales.detach().float().cpu()
    num_out_groups, num_in_groups, num_codebooks = codes.shape
    out_group_size, in_group_size = codebooks.shape[2:]
    targets = (_groups(weight, out_group_size, in_group_size) / scales).reshape(-1, out_group_size * in_group_size)
    old = codes.reshape(-1, num_codebooks).long().cpu()
    candidates = [assign_codes(targets, codebooks, None, passes), assign_codes(targets, codebooks, old, passes)]
    errors = [((reconstruct(c, codebooks) - targets) ** 2).sum(-1) for c in candidates]
    best = torch.where((errors[0] <= errors[1])[:, None], candidates[0], candidates[1])
    return best.reshape(num_out_groups, num_in_groups, num_codebooks)


def bits_per_parameter(
    out_features: int, in_features: int, *, in_group_size: int, out_group_size: int, num_codebooks: int,
    nbits_per_codebook: int, value_bits: int = 16,
) -> float:
    """Storage per weight: codes + codebooks + one 16-bit scale per output group (AQLM's own estimate)."""
    params = out_features * in_features
    group = in_group_size * out_group_size
    codes = params // group * num_codebooks * nbits_per_codebook
    books = num_codebooks * 2**nbits_per_codebook * group * value_bits
    scales = out_features // out_group_size * value_bits
    return (codes + books + scales) / params


# ---------------------------------------------------------------------- round-to-nearest reference
def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric per-group min-max round-to-nearest (the usual RTN baseline); returns the de-quantized weight."""
    weight = weight.detach().float()
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(-1, keepdim=True)
    high = groups.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(1e-12)
    q = ((groups - low) / scale).round().clamp(0, levels)
    return (q * scale + low).reshape(out_features, in_features)


def rtn_bits_per_parameter(bits: int, group_size: int, value_bits: int = 16) -> float:
    """``bits`` plus a 16-bit scale and a 16-bit zero point per group."""
    return bits + 2 * value_bits / group_size
