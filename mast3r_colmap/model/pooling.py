"""Global image descriptors pooled from MASt3R encoder tokens (no learned weights).

:meth:`~mast3r_colmap.matching.matcher.Matcher.global_descriptors` uses them for ``--pairs retrieval:*``
when no retrieval model is given; :mod:`mast3r_colmap.pairs` ranks images by their cosine.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["global_descriptor_from_tokens"]


def global_descriptor_from_tokens(tokens: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """A cheap global image descriptor pooled from MASt3R encoder tokens (after ``enc_norm``).

    Generalised-mean (GeM) pooling over the tokens of the ReLU'd features, then L2 normalisation::

        g_c = (mean_s max(t_sc, eps) ** p) ** (1 / p),   g = g / ||g||

    with ``p = 3`` by default (``p = 1`` is the mean of the ReLU'd tokens). Computed in float64 and
    returned in the input's floating dtype; there are no learned weights, and the result does not depend
    on the token order. ``tokens`` is ``(S, C)`` or ``(B, S, C)``; the result is ``(C,)`` or ``(B, C)``.
    """
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(np.asarray(tokens))
    if tokens.ndim not in (2, 3):
        raise ValueError(f"tokens must be (S, C) or (B, S, C), got shape {tuple(tokens.shape)}")
    if tokens.shape[-2] < 1 or tokens.shape[-1] < 1:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    if not p > 0:
        raise ValueError(f"GeM power p must be > 0, got {p}")
    out_dtype = tokens.dtype if tokens.is_floating_point() else torch.float32
    t = tokens.detach().to(device="cpu", dtype=torch.float64)
    g = t.clamp_min(eps).pow(p).mean(dim=-2).pow(1.0 / p)
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return g.to(dtype=out_dtype, device=tokens.device)
