"""The training-free retrieval network of MASt3R-SfM: its configuration, its modules and building it from a checkpoint.

``<prefix>_trainingfree.pth`` holds ``{'args': Namespace(prewhiten, hdims, residual, postwhiten, featweights,
nfeat, imsize, nclusters, ...), 'model': state_dict}`` and is read by
:func:`~mast3r_colmap.model.checkpoint.load_training_container` (``torch.load(weights_only=True)``, only
``argparse.Namespace`` allow-listed). The state_dict holds only ``prewhiten.{m,p}``, ``projector.*`` and
``postwhiten.{m,p}`` (whichever the args ask for); ``backbone.*`` entries are ignored (the backbone is the
MASt3R encoder of the matcher). Every entry is checked against the args and the encoder dimension before
the model is built.

Per image (:meth:`RetrievalModel.local_features`), from the encoder tokens after ``enc_norm``:
prewhiten ``(x - m) @ p`` (float64) -> projector (+ input when ``residual``) -> attention = per-token L2 norm
-> postwhiten -> the top-``nfeat`` tokens by attention.

The layout of the state_dict is not verified against the released file: the projector is assumed
to be an ``nn.Sequential`` (``projector.{3i}`` Linear, ``projector.{3i+1}`` LayerNorm).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..model.checkpoint import load_training_container

__all__ = [
    "RetrievalError",
    "RetrievalConfig",
    "Whitener",
    "RetrievalModel",
    "codebook_size",
    "read_retrieval_checkpoint",
    "load_retrieval_model",
]

logger = logging.getLogger(__name__)

_REQUIRED_ARGS = ("prewhiten", "hdims", "residual", "postwhiten", "featweights", "nfeat", "imsize", "nclusters")


class RetrievalError(ValueError):
    """A retrieval checkpoint or codebook that cannot be read or does not fit (the message names the file)."""


# ---- configuration ------------------------------------------------------------------------------

def _is_on(value: Any) -> bool:
    """Whether an optional-module argument (prewhiten, postwhiten, residual) is set."""
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return value.strip().lower() not in ("", "none", "false", "0")
    return bool(value)


def _parse_hdims(value: Any, source: Any) -> Tuple[int, ...]:
    """Projector dims: '' / None / [] -> (); ints, lists of ints or strings of ints separated by , _ - or spaces."""
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items: List[Any] = [value]
    elif isinstance(value, str):
        items = [t for t in re.split(r"[\s,_\-]+", value.strip()) if t]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise RetrievalError(f"{source}: unsupported hdims {value!r}")
    out = []
    for item in items:
        try:
            dim = int(item)
        except (TypeError, ValueError):
            raise RetrievalError(f"{source}: hdims {value!r} is not a list of integers") from None
        if dim < 1 or isinstance(item, bool) or (isinstance(item, float) and item != dim):
            raise RetrievalError(f"{source}: hdims {value!r} must hold positive integers")
        out.append(dim)
    return tuple(out)


def codebook_size(nclusters: Any) -> int:
    """Number of visual words of an ``nclusters`` argument: an int or asmk's ``'64k'`` / ``'1M'`` (powers of 1024)."""
    if isinstance(nclusters, (int, np.integer)) and not isinstance(nclusters, bool):
        size = int(nclusters)
    elif isinstance(nclusters, str) and re.fullmatch(r"\s*\d+\s*[kM]?\s*", nclusters):
        text = nclusters.strip()
        mult = {"k": 1024, "M": 1024 ** 2}.get(text[-1], 1)
        size = int(text.rstrip("kM")) * mult
    else:
        raise ValueError(f"nclusters must be an integer or a string like '64k', got {nclusters!r}")
    if size < 1:
        raise ValueError(f"nclusters must be >= 1, got {nclusters!r}")
    return size


@dataclass(frozen=True)
class RetrievalConfig:
    """The configuration of a training-free retrieval model, read from the checkpoint's ``args``."""

    prewhiten: bool = True
    hdims: Tuple[int, ...] = ()
    residual: bool = False
    postwhiten: bool = False
    featweights: str = "l2norm"
    nfeat: int = 300
    imsize: Optional[int] = 512
    nclusters: Any = "64k"             # as in the file: the codebook's params must equal {'size': nclusters}

    @property
    def codebook_size(self) -> int:
        return codebook_size(self.nclusters)

    def describe(self) -> str:
        """The modules, for messages: ``prewhiten=True, hdims=[...], residual=False, postwhiten=False``."""
        return (f"prewhiten={self.prewhiten}, hdims={list(self.hdims)}, residual={self.residual}, "
                f"postwhiten={self.postwhiten}")

    @classmethod
    def from_args(cls, args: Any, source: Any = "") -> "RetrievalConfig":
        """From the checkpoint's ``args`` (an ``argparse.Namespace`` or a mapping)."""
        get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
        missing = [k for k in _REQUIRED_ARGS if get(k, _MISSING) is _MISSING]
        if missing:
            raise RetrievalError(f"{source}: args lacks {', '.join(missing)} (not a training-free retrieval checkpoint?)")
        featweights = get("featweights")
        if featweights != "l2norm":
            raise RetrievalError(f"{source}: unsupported featweights {featweights!r} (only 'l2norm')")
        nfeat, imsize = get("nfeat"), get("imsize")
        if isinstance(nfeat, bool) or not isinstance(nfeat, (int, np.integer)) or nfeat < 1:
            raise RetrievalError(f"{source}: nfeat must be a positive integer, got {nfeat!r}")
        if imsize is not None and (isinstance(imsize, bool) or not isinstance(imsize, (int, np.integer))
                                   or imsize < 1):
            raise RetrievalError(f"{source}: imsize must be a positive integer, got {imsize!r}")
        nclusters = get("nclusters")
        try:
            codebook_size(nclusters)
        except ValueError as exc:
            raise RetrievalError(f"{source}: {exc}") from None
        return cls(prewhiten=_is_on(get("prewhiten")), hdims=_parse_hdims(get("hdims"), source),
                   residual=_is_on(get("residual")), postwhiten=_is_on(get("postwhiten")),
                   featweights=featweights, nfeat=int(nfeat), imsize=None if imsize is None else int(imsize),
                   nclusters=nclusters)


_MISSING = object()


# ---- the network --------------------------------------------------------------------------------

class Whitener(nn.Module):
    """``(x - m) @ p`` computed in float64 and cast back to the input dtype; ``m`` (1, D), ``p`` (D, D')."""

    def __init__(self, dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.register_buffer("m", torch.zeros(1, dim, dtype=torch.float64))
        self.register_buffer("p", torch.eye(dim, out_dim or dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.m.double()) @ self.p.double()).to(x.dtype)


def _projector(in_dim: int, hdims: Sequence[int]) -> nn.Module:
    """[Linear, LayerNorm, GELU] x (k - 1) followed by a final Linear; the identity for no hdims."""
    if not hdims:
        return nn.Identity()
    layers: List[nn.Module] = []
    prev = in_dim
    for h in hdims[:-1]:
        layers += [nn.Linear(prev, h), nn.LayerNorm(h), nn.GELU()]
        prev = h
    layers.append(nn.Linear(prev, hdims[-1]))
    return nn.Sequential(*layers)


class RetrievalModel(nn.Module):
    """The training-free retrieval head on MASt3R encoder tokens (the backbone itself is not part of it)."""

    def __init__(self, config: RetrievalConfig, input_dim: int, prewhiten_dim: Optional[int] = None,
                 postwhiten_dim: Optional[int] = None):
        super().__init__()
        self.config = config
        self.input_dim = int(input_dim)
        dim = self.input_dim
        self.prewhiten: nn.Module = nn.Identity()
        if config.prewhiten:
            self.prewhiten = Whitener(dim, prewhiten_dim)
            dim = prewhiten_dim or dim
        self.projector = _projector(dim, config.hdims)
        if config.hdims:
            if config.residual and config.hdims[-1] != dim:
                raise ValueError(f"residual projector: last hdim {config.hdims[-1]} != its input dim {dim}")
            dim = config.hdims[-1]
        self.postwhiten: nn.Module = nn.Identity()
        if config.postwhiten:
            self.postwhiten = Whitener(dim, postwhiten_dim)
            dim = postwhiten_dim or dim
        self.output_dim = dim

    @property
    def device(self) -> torch.device:
        for t in self.buffers():
            return t.device
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def features(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token (features (B, S, D'), attention (B, S)) of encoder tokens (B, S, D) after enc_norm."""
        if tokens.ndim == 2:
            tokens = tokens[None]
        if tokens.ndim != 3 or tokens.shape[-1] != self.input_dim:
            raise ValueError(f"expected encoder tokens (B, S, {self.input_dim}), got {tuple(tokens.shape)}")
        x = self.prewhiten(tokens.float())
        y = self.projector(x)
        if self.config.residual:
            y = y + x
        attention = y.norm(dim=-1)  # featweights 'l2norm'
        return self.postwhiten(y), attention

    @torch.inference_mode()
    def local_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The top-``nfeat`` local descriptors (B, min(nfeat, S), D') by attention (ties to the lower token)."""
        feats, attention = self.features(tokens)
        k = min(self.config.nfeat, feats.shape[1])
        order = torch.sort(attention, dim=1, descending=True, stable=True).indices[:, :k]
        return torch.gather(feats, 1, order[..., None].expand(-1, -1, feats.shape[-1]))


# ---- building it from a checkpoint --------------------------------------------------------------

def read_retrieval_checkpoint(path: str | os.PathLike) -> Tuple[RetrievalConfig, Dict[str, torch.Tensor]]:
    """(config, state_dict without ``backbone.*``) of a training-free retrieval ``.pth`` (safe unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"retrieval model {path} not found")
    ckpt = load_training_container(path, RetrievalError, "retrieval model")
    config = RetrievalConfig.from_args(ckpt["args"], path)
    state = ckpt["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RetrievalError(f"{path}: 'model' is not a state_dict of tensors")
    backbone = [k for k in state if k.startswith("backbone.")]
    if backbone:
        logger.warning("%s: ignoring %d backbone.* entries (the matcher's MASt3R encoder is used)", path, len(backbone))
    return config, {k: v for k, v in state.items() if not k.startswith("backbone.")}


def _expected_keys(config: RetrievalConfig) -> List[str]:
    keys = []
    if config.prewhiten:
        keys += ["prewhiten.m", "prewhiten.p"]
    for i in range(len(config.hdims)):
        keys += [f"projector.{3 * i}.weight", f"projector.{3 * i}.bias"]
        if i < len(config.hdims) - 1:
            keys += [f"projector.{3 * i + 1}.weight", f"projector.{3 * i + 1}.bias"]
    if config.postwhiten:
        keys += ["postwhiten.m", "postwhiten.p"]
    return keys


def _build(config: RetrievalConfig, state: Mapping[str, torch.Tensor], encoder_dim: Optional[int],
           source: Any) -> RetrievalModel:
    """Check every entry against the configuration and the encoder dimension, then build the model."""
    expected = _expected_keys(config)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing key(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {', '.join(unexpected[:20])}"
                        + (f" ... ({len(unexpected) - 20} more)" if len(unexpected) > 20 else ""))
    if problems:
        raise RetrievalError(f"retrieval model {source} does not match its args ({config.describe()}):\n  "
                             + "\n  ".join(problems))

    def shape(key: str) -> Tuple[int, ...]:
        return tuple(state[key].shape)

    def whitener(name: str, dim: Optional[int]) -> Tuple[int, int]:
        m, p = shape(f"{name}.m"), shape(f"{name}.p")
        if len(m) != 2 or m[0] != 1 or len(p) != 2 or p[0] != m[1]:
            raise RetrievalError(f"{source}: {name} has m {m} and p {p}; expected m (1, D) and p (D, D')")
        if dim is not None and m[1] != dim:
            raise RetrievalError(f"{source}: {name} expects features of dimension {m[1]}, but gets {dim}"
                                 + (" (the MASt3R encoder dimension)" if name == "prewhiten" else ""))
        return m[1], p[1]

    dim = encoder_dim
    input_dim = encoder_dim
    pre_out = post_out = None
    if config.prewhiten:
        input_dim, pre_out = whitener("prewhiten", dim)
        dim = pre_out
    if config.hdims:
        first_in = shape("projector.0.weight")
        if len(first_in) != 2:
            raise RetrievalError(f"{source}: projector.0.weight has shape {first_in}")
        if dim is None:
            dim = input_dim = first_in[1]
        prev = dim
        for i, h in enumerate(config.hdims):
            want = {f"projector.{3 * i}.weight": (h, prev), f"projector.{3 * i}.bias": (h,)}
            if i < len(config.hdims) - 1:
                want.update({f"projector.{3 * i + 1}.weight": (h,), f"projector.{3 * i + 1}.bias": (h,)})
            for key, sh in want.items():
                if shape(key) != sh:
                    raise RetrievalError(f"{source}: {key} has shape {shape(key)}, expected {sh} "
                                         f"(hdims {config.hdims}, input dimension {dim})")
            prev = h
        if config.residual and prev != dim:
            raise RetrievalError(f"{source}: residual projector with output dimension {prev} != its input "
                                 f"dimension {dim}")
        dim = prev
    if config.postwhiten:
        d_in, post_out = whitener("postwhiten", dim)
        if dim is None:
            dim = input_dim = d_in
    if input_dim is None:
        raise RetrievalError(f"{source}: the retrieval model has no weights, so its input dimension must be given "
                             "(encoder_dim)")
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise RetrievalError(f"{source}: {key} contains NaN or inf")
    model = RetrievalModel(config, input_dim, pre_out, post_out)
    target = model.state_dict()
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


def load_retrieval_model(path: str | os.PathLike, encoder_dim: Optional[int] = None,
                         device: Optional[str | torch.device] = None) -> RetrievalModel:
    """The retrieval head of a training-free checkpoint; ``encoder_dim`` (the MASt3R encoder's) is checked."""
    config, state = read_retrieval_checkpoint(path)
    model = _build(config, state, encoder_dim, path)
    return model.to(device) if device is not None else model

