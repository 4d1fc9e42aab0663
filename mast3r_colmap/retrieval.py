"""Image retrieval as MASt3R-SfM does it: the training-free retrieval model on MASt3R encoder tokens, and ASMK.

Two files, side by side (spec §8.1):

* ``<prefix>_trainingfree.pth``: ``{'args': Namespace(prewhiten, hdims, residual, postwhiten, featweights,
  nfeat, imsize, nclusters, ...), 'model': state_dict}``, read with ``torch.load(weights_only=True)`` (only
  ``argparse.Namespace`` allow-listed). The state_dict holds only ``prewhiten.{m,p}``, ``projector.*`` and
  ``postwhiten.{m,p}`` (whichever the args ask for); ``backbone.*`` entries are ignored (the backbone is the
  MASt3R encoder of the matcher);
* ``<prefix>_codebook.pkl`` (the checkpoint name with its last ``_``-separated token replaced by
  ``codebook.pkl``): the asmk Codebook state ``{'type': 'Codebook', 'params': {'size': nclusters},
  'state': {'centroids': float32 (K, D)}}``, read with a restricted unpickler (plain containers and numpy
  arrays only).

Per image (:meth:`RetrievalModel.local_features`), from the encoder tokens after ``enc_norm``:
prewhiten ``(x - m) @ p`` (float64) -> projector (+ input when ``residual``) -> attention = per-token L2 norm
-> postwhiten -> the top-``nfeat`` tokens by attention.

ASMK (:func:`asmk_similarity`): binary kernel, IndexFlatL2 word assignment (faiss, on the GPU when faiss has
one), multiple assignment 1 for the database and 5 for the queries, residuals summed per visual word and
binarised by sign, word similarity ``1 - 2 * hamming / bits`` kept when >= 0 and raised to the power 3, image
score summed over shared words and divided by ``sqrt(#words)`` of both images; every image queries the
database of all images, giving an ``N x N`` similarity (rows are queries). It runs through the MIT-licensed
``asmk`` package when installed (``pip install mast3r-colmap[retrieval]``), else through the built-in
numpy/faiss implementation of the same steps (``backend="builtin"``), which also needs only one faiss search.

Encodings are shared with matching: :func:`retrieval_features` takes them from the matcher's
:class:`~.matching.matcher.EncodingCache`, so images that are still cached when matching starts are not
encoded again.

The layout of the trainingfree state_dict is not verified against the released file (spec §8.1): the
projector is assumed to be an ``nn.Sequential`` (``projector.{3i}`` Linear, ``projector.{3i+1}`` LayerNorm).
"""

from __future__ import annotations

import codecs
import itertools
import logging
import math
import os
import pickle
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .model.checkpoint import load_training_container

__all__ = [
    "RetrievalError",
    "RetrievalConfig",
    "Whitener",
    "RetrievalModel",
    "Retriever",
    "codebook_path",
    "read_codebook",
    "read_retrieval_checkpoint",
    "load_retrieval_model",
    "load_retriever",
    "retrieval_features",
    "asmk_similarity",
    "asmk_available",
    "ASMK_PARAMS",
]

logger = logging.getLogger(__name__)

#: The ASMK parameters of MASt3R-SfM's Retriever (asmk package layout).
ASMK_PARAMS: Dict[str, Any] = {
    "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                  "quantize": {"multiple_assignment": 1}, "aggregate": {}},
    "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {}, "search": {"topk": None},
                  "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}},
}
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


# ---- reading the files --------------------------------------------------------------------------

def codebook_path(checkpoint: str | os.PathLike) -> Path:
    """``<prefix>_codebook.pkl`` beside ``<prefix>_<anything>``: the last ``_`` token replaced."""
    path = Path(checkpoint)
    prefix, sep, _ = path.name.rpartition("_")
    return path.with_name(f"{prefix}{sep}codebook.pkl")


def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 keeps the implementation in numpy._core
    objs = {"_reconstruct": core.multiarray._reconstruct, "scalar": core.multiarray.scalar,
            "_frombuffer": core.numeric._frombuffer}
    out: Dict[Tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):  # pickles of numpy 1.x and 2.x name different modules
        out[(f"{pkg}.multiarray", "_reconstruct")] = objs["_reconstruct"]
        out[(f"{pkg}.multiarray", "scalar")] = objs["scalar"]
        out[(f"{pkg}.numeric", "_frombuffer")] = objs["_frombuffer"]
    return out


class _SafeUnpickler(pickle.Unpickler):
    """Only builtin containers and numpy array reconstruction; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"disallowed class {module}.{name} (only numpy arrays and plain "
                                         "containers may appear in a codebook)")
        return allowed


_ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray, ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles of bytes
    **_numpy_globals(),
}


def read_codebook(path: str | os.PathLike, nclusters: Any, dim: Optional[int] = None) -> np.ndarray:
    """The (K, D) float32 centroids of an asmk codebook pickle, checked against ``nclusters`` and ``dim``."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"codebook {path} not found: the retrieval codebook must sit beside the checkpoint "
                             f"as <prefix>_codebook.pkl")
    try:
        with open(path, "rb") as f:
            data = _SafeUnpickler(f).load()
    except Exception as exc:  # disallowed global, truncated or corrupt file
        raise RetrievalError(f"cannot read codebook {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, Mapping) or data.get("type") != "Codebook" or not isinstance(data.get("state"), Mapping):
        raise RetrievalError(f"{path} is not an asmk codebook (expected {{'type': 'Codebook', 'params', 'state'}})")
    if data.get("params") != {"size": nclusters}:
        raise RetrievalError(f"{path}: codebook params {data.get('params')!r} do not match the checkpoint's "
                             f"{{'size': {nclusters!r}}}")
    centroids = data["state"].get("centroids")
    k = codebook_size(nclusters)
    if not isinstance(centroids, np.ndarray) or centroids.ndim != 2 or not np.issubdtype(centroids.dtype, np.floating):
        raise RetrievalError(f"{path}: centroids must be a 2-D float array, got "
                             f"{type(centroids).__name__} {getattr(centroids, 'shape', '')}")
    if centroids.shape[0] != k:
        raise RetrievalError(f"{path}: {centroids.shape[0]} centroids, but the codebook size is {nclusters!r} = {k}")
    if dim is not None and centroids.shape[1] != dim:
        raise RetrievalError(f"{path}: centroids of dimension {centroids.shape[1]}, but the retrieval features "
                             f"have dimension {dim}")
    if not np.isfinite(centroids).all():
        raise RetrievalError(f"{path}: centroids contain NaN or inf")
    return np.ascontiguousarray(centroids, dtype=np.float32)


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
        raise RetrievalError(f"retrieval model {source} does not match its args ({_describe(config)}):\n  "
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


def _describe(config: RetrievalConfig) -> str:
    return (f"prewhiten={config.prewhiten}, hdims={list(config.hdims)}, residual={config.residual}, "
            f"postwhiten={config.postwhiten}")


def load_retrieval_model(path: str | os.PathLike, encoder_dim: Optional[int] = None,
                         device: Optional[str | torch.device] = None) -> RetrievalModel:
    """The retrieval head of a training-free checkpoint; ``encoder_dim`` (the MASt3R encoder's) is checked."""
    config, state = read_retrieval_checkpoint(path)
    model = _build(config, state, encoder_dim, path)
    return model.to(device) if device is not None else model


# ---- local features from the matcher's encodings ------------------------------------------------

def retrieval_features(matcher: Any, names: Sequence[str], model: RetrievalModel,
                       batch_size: Optional[int] = None) -> List[np.ndarray]:
    """Local retrieval descriptors ``(<= nfeat, D')`` float32 of each image, from the matcher's encodings.

    Images are loaded by ``matcher.image(name)`` and encoded through ``matcher.encodings.get_many`` with
    the key ``(name, None)``, exactly as matching does, so an image is encoded once for both as long as
    its encoding is still in the cache when its pairs are matched. The cache is an LRU of
    ``matcher.conf.cache_size`` encodings (default 128; about ``S * C * 4`` bytes each, 3 MiB for a
    512x384 image with the ViT-L encoder): with more images than that, the encodings of the first images
    are evicted while the later ones are described, and matching encodes them again (the encoder then
    runs up to twice per image, as it would for the pooled global descriptors). A larger cache
    (``get_config(preset, cache_size=N)``) trades that recomputation for memory.

    The images are encoded at the matcher's resolution (``matcher.conf.image_size``); a checkpoint made
    for another ``imsize`` gets a warning.
    """
    imsize = model.config.imsize
    conf_size = getattr(getattr(matcher, "conf", None), "image_size", None)
    if imsize is not None and conf_size is not None and imsize != conf_size:
        logger.warning("retrieval model made for %d-px images, but the matcher encodes at %d px; the shared "
                       "encodings are used anyway", imsize, conf_size)
    batch_size = batch_size or getattr(getattr(matcher, "conf", None), "batch_size", 8)
    names = list(names)
    out: List[np.ndarray] = []
    device = None
    with torch.inference_mode():
        loaded = matcher.images(names) if hasattr(matcher, "images") else map(matcher.image, names)
        for _ in range(0, len(names), batch_size):
            images = list(itertools.islice(loaded, batch_size))
            encs = matcher.encodings.get_many([(im.name, None) for im in images], [im.img for im in images])
            for enc in encs:
                tokens = enc.tokens
                if device is None:
                    device = tokens.device
                    if model.device != device:
                        model.to(device)
                feats = model.local_features(tokens.to(device).float())[0]
                out.append(feats.float().cpu().numpy())
        getattr(loaded, "close", lambda: None)()  # stops the loader threads
    return out


# ---- ASMK ---------------------------------------------------------------------------------------

def asmk_available() -> bool:
    """Whether the ``asmk`` package (with its compiled hamming module) can be imported."""
    try:
        import asmk.asmk_method  # noqa: F401, PLC0415
        import asmk.hamming  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _faiss_gpu(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _check_features(features: Sequence[np.ndarray], centroids: np.ndarray) -> List[np.ndarray]:
    out = []
    for i, f in enumerate(features):
        f = np.asarray(f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f)
        if f.ndim != 2 or f.shape[1] != centroids.shape[1] or len(f) == 0:
            raise ValueError(f"image {i}: local features must be a non-empty (n, {centroids.shape[1]}) array, "
                             f"got shape {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError(f"image {i}: local features contain NaN or inf")
        out.append(np.ascontiguousarray(f, dtype=np.float32))
    return out


def _search(x: np.ndarray, centroids: np.ndarray, k: int, use_gpu: bool, chunk: int = 65536) -> np.ndarray:
    """Indices (n, k) of the k nearest centroids (faiss IndexFlatL2)."""
    import faiss  # noqa: PLC0415

    index = faiss.IndexFlatL2(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(centroids)
    out = np.empty((len(x), k), dtype=np.int64)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = index.search(x[s:s + chunk], k)[1]
    return out


if hasattr(np, "bitwise_count"):
    def _popcount(a: np.ndarray) -> np.ndarray:
        return np.bitwise_count(a)
else:  # numpy < 2.0
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(a: np.ndarray) -> np.ndarray:
        return _POP8[a.view(np.uint8)].reshape(*a.shape, -1).sum(-1, dtype=np.uint8)


def _aggregate(x: np.ndarray, words: np.ndarray, centroids: np.ndarray, nbits: int) -> Tuple[np.ndarray, np.ndarray]:
    """(unique words, packed sign codes (w, nbits / 64) uint64) of one image's residuals summed per word.

    A descriptor counts once for each of its words; residuals are summed in float32 in descriptor order,
    like asmk, and a bit is set where the sum is > 0 (asmk's ``binarize_and_pack``).
    """
    rows = np.repeat(np.arange(len(x)), words.shape[1])
    w = words.ravel()
    valid = w >= 0
    rows, w = rows[valid], w[valid]
    order = np.lexsort((rows, w))
    rows, w = rows[order], w[order]
    keep = np.ones(len(w), dtype=bool)
    keep[1:] = (w[1:] != w[:-1]) | (rows[1:] != rows[:-1])
    rows, w = rows[keep], w[keep]
    uniq, start = np.unique(w, return_index=True)
    sums = np.add.reduceat(x[rows] - centroids[w], start, axis=0)
    bits = np.zeros((len(uniq), nbits), dtype=bool)
    bits[:, :x.shape[1]] = sums > 0
    packed = np.packbits(bits, axis=1)
    return uniq, np.ascontiguousarray(packed).view(np.uint64)


def _aggregate_all(features: List[np.ndarray], words: np.ndarray, centroids: np.ndarray, ma: int,
                   nbits: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, packed codes, image ids) of every image's aggregated residuals, with ``ma`` assignments."""
    offsets = np.cumsum([0] + [len(f) for f in features])
    ws, cs, ims = [], [], []
    for i, x in enumerate(features):
        u, c = _aggregate(x, words[offsets[i]:offsets[i + 1], :ma], centroids, nbits)
        ws.append(u), cs.append(c), ims.append(np.full(len(u), i))
    return np.concatenate(ws), np.concatenate(cs), np.concatenate(ims)


def _score(db: Tuple[np.ndarray, np.ndarray, np.ndarray], query: Tuple[np.ndarray, np.ndarray, np.ndarray],
           n: int, dim: int, alpha: float, threshold: float, max_pairs: int = 1 << 22) -> np.ndarray:
    """The (N, N) ASMK scores of aggregated query entries against the aggregated database (an inverted file)."""
    norm_bits = np.float32(32 * math.ceil(dim / 32))  # asmk normalises by its packed length (uint32 words)
    dbw, dbc, dbi = db
    qw, qc, qi = query
    db_norm = np.sqrt(np.bincount(dbi, minlength=n).astype(np.float64))
    q_norm = np.sqrt(np.bincount(qi, minlength=n).astype(np.float64))
    order = np.argsort(dbw, kind="stable")
    dbw, dbc, dbi = dbw[order], dbc[order], dbi[order]
    lo, hi = np.searchsorted(dbw, qw, "left"), np.searchsorted(dbw, qw, "right")
    counts = hi - lo
    sim = np.zeros((n, n), dtype=np.float64)
    ends = np.cumsum(counts)
    start = 0
    while start < len(qw):  # query entries in chunks of <= max_pairs (query word, database word) pairs
        stop = max(int(np.searchsorted(ends, (ends[start - 1] if start else 0) + max_pairs, "right")), start + 1)
        cnt = counts[start:stop]
        total = int(cnt.sum())
        if total:
            qe = np.repeat(np.arange(start, stop), cnt)
            first = np.repeat(lo[start:stop] - (np.cumsum(cnt) - cnt), cnt)
            de = first + np.arange(total)
            ham = _popcount(qc[qe] ^ dbc[de]).sum(axis=1, dtype=np.int64)
            s = np.float32(-2) * (ham.astype(np.float32) / norm_bits) + np.float32(1)
            ok = s >= threshold
            val = np.power(s[ok], np.float32(alpha)).astype(np.float64) / db_norm[dbi[de[ok]]]
            np.add.at(sim, (qi[qe[ok]], dbi[de[ok]]), val)
        start = stop
    return sim / np.maximum(q_norm, 1e-300)[:, None]


def _builtin_similarity(features: List[np.ndarray], centroids: np.ndarray, ma_query: int, ma_db: int,
                        alpha: float, threshold: float, use_gpu: bool) -> np.ndarray:
    dim = centroids.shape[1]
    k_max = min(max(ma_query, ma_db), len(centroids))
    nbits = 64 * math.ceil(dim / 64)
    # one search serves both assignments: the first k' columns of the k-NN lists are the k'-NN lists
    words = _search(np.concatenate(features), centroids, k_max, use_gpu)
    db = _aggregate_all(features, words, centroids, min(ma_db, k_max), nbits)
    query = _aggregate_all(features, words, centroids, min(ma_query, k_max), nbits)
    return _score(db, query, len(features), dim, alpha, threshold)


def _asmk_package_similarity(features: List[np.ndarray], centroids: np.ndarray, size_param: Any, ma_query: int,
                             ma_db: int, alpha: float, threshold: float, use_gpu: bool) -> np.ndarray:
    from asmk import asmk_method, codebook as cdb_pkg, index as idx_pkg  # noqa: PLC0415

    params = {
        "index": {"gpu_id": 0 if use_gpu else None},
        "train_codebook": {"codebook": {"size": size_param}},
        "build_ivf": {**ASMK_PARAMS["build_ivf"], "quantize": {"multiple_assignment": ma_db}},
        "query_ivf": {**ASMK_PARAMS["query_ivf"], "quantize": {"multiple_assignment": ma_query},
                      "similarity": {"similarity_threshold": threshold, "alpha": alpha}},
    }
    codebook = cdb_pkg.Codebook(idx_pkg.initialize_index(params["index"]["gpu_id"]), size=size_param)
    codebook.index(centroids)
    method = asmk_method.ASMKMethod(params, {}, codebook=codebook)
    vecs = np.concatenate(features)
    imids = np.concatenate([np.full(len(f), i, dtype=np.int64) for i, f in enumerate(features)])
    built = method.build_ivf(vecs, imids.copy())
    _, images, ranks, scores = built.query_ivf(vecs, imids.copy())
    sim = np.zeros((len(features), len(features)), dtype=np.float64)
    sim[np.asarray(images)[:, None], ranks] = scores
    return sim


def asmk_similarity(features: Sequence[np.ndarray], centroids: np.ndarray, *, backend: str = "auto",
                    multiple_assignment: int = 5, db_multiple_assignment: int = 1, alpha: float = 3.0,
                    similarity_threshold: float = 0.0, codebook_params: Any = None,
                    use_gpu: Optional[bool] = None) -> np.ndarray:
    """ASMK (binary kernel) similarity ``(N, N)`` of images given their local descriptors; rows are queries.

    ``backend``: ``"asmk"`` (the asmk package), ``"builtin"`` (numpy/faiss, same steps; equal to asmk within
    float rounding, and about 1.7x faster because it assigns words with one faiss search instead of two) or
    ``"auto"`` (asmk when installed, else builtin). ``use_gpu`` (default: when faiss has a GPU) runs the word assignment on the GPU.
    ``codebook_params`` is the codebook's ``size`` as written in its file (default ``K``).
    """
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or len(centroids) < 1:
        raise ValueError(f"centroids must be a non-empty (K, D) array, got shape {centroids.shape}")
    feats = _check_features(features, centroids)
    if backend not in ("auto", "asmk", "builtin"):
        raise ValueError(f"unknown ASMK backend {backend!r}: use 'auto', 'asmk' or 'builtin'")
    if backend == "auto":
        backend = "asmk" if asmk_available() else "builtin"
    elif backend == "asmk" and not asmk_available():
        raise ValueError("the asmk package is not installed (pip install mast3r-colmap[retrieval])")
    if not feats:
        return np.zeros((0, 0))
    if use_gpu is None:
        import faiss  # noqa: PLC0415

        use_gpu = _faiss_gpu(faiss)
    t0 = time.perf_counter()
    if backend == "asmk":
        sim = _asmk_package_similarity(feats, centroids, codebook_params if codebook_params is not None
                                       else len(centroids), multiple_assignment, db_multiple_assignment,
                                       alpha, similarity_threshold, use_gpu)
    else:
        sim = _builtin_similarity(feats, centroids, multiple_assignment, db_multiple_assignment, alpha,
                                  similarity_threshold, use_gpu)
    logger.info("ASMK (%s%s): %d images, %d local features, %d words in %.2f s", backend,
                ", faiss GPU" if use_gpu else "", len(feats), sum(len(f) for f in feats), len(centroids),
                time.perf_counter() - t0)
    return sim


# ---- the whole retriever ------------------------------------------------------------------------

class Retriever:
    """A retrieval model and its codebook: MASt3R-SfM's ``Retriever`` on a shared :class:`Matcher`."""

    def __init__(self, model: RetrievalModel, centroids: np.ndarray, backend: str = "auto",
                 use_gpu: Optional[bool] = None, source: str = ""):
        if centroids.shape[1] != model.output_dim:
            raise RetrievalError(f"{source}: codebook dimension {centroids.shape[1]} != retrieval feature "
                                 f"dimension {model.output_dim}")
        self.model = model
        self.centroids = centroids
        self.backend = backend
        self.use_gpu = use_gpu
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, encoder_dim: Optional[int] = None,
                        backend: str = "auto", use_gpu: Optional[bool] = None) -> "Retriever":
        """Load ``<prefix>_trainingfree.pth`` and the ``<prefix>_codebook.pkl`` beside it."""
        config, state = read_retrieval_checkpoint(path)
        model = _build(config, state, encoder_dim, path)
        centroids = read_codebook(codebook_path(path), config.nclusters, model.output_dim)
        logger.info("retrieval model %s: %s, nfeat=%d, %d visual words", path, _describe(config),
                    config.nfeat, len(centroids))
        return cls(model, centroids, backend, use_gpu, str(path))

    def check_encoder(self, encoder_dim: int) -> None:
        """Raise :class:`RetrievalError` when the retrieval model does not take tokens of ``encoder_dim``."""
        if encoder_dim != self.model.input_dim:
            raise RetrievalError(f"retrieval model {self.source} takes features of dimension "
                                 f"{self.model.input_dim}, but the MASt3R encoder gives {encoder_dim}")

    def features(self, matcher: Any, names: Sequence[str]) -> List[np.ndarray]:
        """:func:`retrieval_features` of the images (encodings shared with the matcher)."""
        return retrieval_features(matcher, names, self.model)

    def similarity(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """The ``(N, N)`` ASMK similarity of :func:`asmk_similarity`."""
        return asmk_similarity(features, self.centroids, backend=self.backend, use_gpu=self.use_gpu,
                               codebook_params=self.model.config.nclusters)

    def similarity_fn(self, matcher: Any) -> Callable[[List[str]], np.ndarray]:
        """``names -> (N, N)`` similarity, for :func:`~.pairs.pairs_from_spec` (``similarity_fn``)."""
        def fn(names: List[str]) -> np.ndarray:
            t0 = time.perf_counter()
            feats = self.features(matcher, names)
            logger.info("retrieval features of %d images in %.1f s", len(names), time.perf_counter() - t0)
            return self.similarity(feats)
        return fn


def load_retriever(path: str | os.PathLike, encoder_dim: Optional[int] = None, backend: str = "auto",
                   use_gpu: Optional[bool] = None) -> Retriever:
    """:meth:`Retriever.from_checkpoint`."""
    return Retriever.from_checkpoint(path, encoder_dim, backend, use_gpu)
