"""Loading MASt3R checkpoints: official ``.pth`` files, hub folders and hub ids.

* ``.pth``: ``{'args': Namespace(model='AsymmetricMASt3R(...)'), 'model': state_dict, ...}``. The
  constructor string is parsed with :mod:`ast` (never evaluated) and the file is read with
  ``torch.load(weights_only=True)``, only ``argparse.Namespace`` being allow-listed.
* hub folder: ``config.json`` (constructor keyword arguments) + ``model.safetensors``.
* hub id (``org/name``): both files fetched with huggingface_hub.

Keys are matched strictly. The only tolerated differences are the official alias keys
``downstream_head{1,2}.dpt.scratch.layer_rn.{0..3}.weight`` (copies of ``layer{1..4}_rn``) and the
unused ``mask_token``; anything else missing, unexpected or of the wrong shape is an error listing it.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .mast3r import ConfigError, MASt3R, MASt3RConfig

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric"
OFFICIAL_PTH_URL = ("https://download.europe.naverlabs.com/ComputerVision/MASt3R/"
                    "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth")
_ALIAS = re.compile(r"^(downstream_head[12]\.dpt\.scratch\.)layer_rn\.([0-3])\.weight$")
_IGNORED = {"mask_token"}
_CONSTRUCTORS = {"AsymmetricMASt3R"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or matched to the network (bad input: a ValueError)."""


# ---- constructor string -------------------------------------------------------------------------

def parse_constructor(text: str) -> Dict[str, Any]:
    """Keyword arguments of an ``AsymmetricMASt3R(...)`` constructor string, without evaluating it."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise CheckpointError(f"cannot parse the model constructor string {text!r}: {exc}") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise CheckpointError(f"the model constructor string is not a plain call: {text!r}")
    if node.func.id not in _CONSTRUCTORS:
        raise CheckpointError(f"unsupported model class {node.func.id!r} (expected AsymmetricMASt3R); "
                              "DUSt3R checkpoints have no descriptor head")
    if node.args or any(kw.arg is None for kw in node.keywords):
        raise CheckpointError(f"the model constructor string must use keyword arguments only: {text!r}")
    return {kw.arg: _literal(kw.value, text) for kw in node.keywords}


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e, text) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id == "inf":
        return math.inf
    if isinstance(node, ast.Attribute) and node.attr == "inf":  # np.inf, math.inf
        return math.inf
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)):
        return float(node.args[0].value)
    raise CheckpointError(f"unsupported expression {ast.unparse(node)!r} in the model constructor string {text!r}")


# ---- reading files ------------------------------------------------------------------------------

def load_training_container(path: str | os.PathLike, error: type = None, what: str = "checkpoint") -> Mapping:
    """``{'args': Namespace, 'model': state_dict, ...}`` as the official training code saves it, read with
    ``torch.load(weights_only=True)`` and only ``argparse.Namespace`` allow-listed; ``error`` (default
    :class:`CheckpointError`) is raised for unreadable files or other contents."""
    error = error or CheckpointError
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding objects other than tensors and Namespace
        raise error(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, Mapping) or "model" not in ckpt or "args" not in ckpt:
        raise error(f"{path} is not an official {what} (expected the keys 'args' and 'model')")
    return ckpt


def read_official_pth(path: str | os.PathLike) -> Tuple[MASt3RConfig, Dict[str, torch.Tensor]]:
    """Configuration and state_dict of an official ``.pth`` checkpoint (safe unpickling only)."""
    ckpt = load_training_container(path, CheckpointError, "MASt3R checkpoint")
    model_str = getattr(ckpt["args"], "model", None)
    if not isinstance(model_str, str):
        raise CheckpointError(f"{path}: args.model (the constructor string) is missing")
    return _config(parse_constructor(model_str), path), dict(ckpt["model"])


def read_hub_dir(path: str | os.PathLike) -> Tuple[MASt3RConfig, Dict[str, torch.Tensor]]:
    """Configuration and state_dict of a hub folder (config.json + model.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, weights_path = path / "config.json", path / "model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{path} is not a MASt3R hub folder: {p.name} is missing")
    try:
        kwargs = json.loads(cfg_path.read_text(encoding="utf-8"))  # accepts Infinity / -Infinity
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot parse {cfg_path}: {exc}") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {weights_path}: {exc}") from None
    return _config(kwargs, cfg_path), state


def _config(kwargs: Mapping[str, Any], source: Any) -> MASt3RConfig:
    try:
        return MASt3RConfig.from_official(kwargs)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def fetch_from_hub(repo_id: str) -> Path:
    """Find config.json and model.safetensors of a hub repo in the local cache, or download them."""
    from huggingface_hub import constants, hf_hub_download

    names = ("config.json", "model.safetensors")
    cache = constants.HF_HUB_CACHE  # read now: older huggingface_hub bound its default at import time
    try:
        return Path([hf_hub_download(repo_id, n, cache_dir=cache, local_files_only=True) for n in names][-1]).parent
    except Exception:  # not cached (yet)
        pass
    reason = _hub_unreachable()
    if reason is None:
        try:
            return Path([hf_hub_download(repo_id, n, cache_dir=cache) for n in names][-1]).parent
        except Exception as exc:  # unknown repo, missing file, network failure, ...
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise CheckpointError(
        f"could not fetch the MASt3R weights '{repo_id}' from the Hugging Face hub ({reason}).\n"
        f"If this machine is offline, download them elsewhere and pass the local path:\n"
        f"  * hub format: `hf download {repo_id} --local-dir DIR` (config.json + model.safetensors), "
        f"then use --checkpoint DIR, or\n"
        f"  * official .pth: {OFFICIAL_PTH_URL}, then use --checkpoint PATH.pth\n"
        f"To try the plumbing without the real weights, write an untrained test checkpoint "
        f"(meaningless matches): `python -m mast3r_colmap.testing.weights small test_small.pth`, "
        f"then use --checkpoint test_small.pth\n"
        f"The weights are licensed CC BY-NC-SA 4.0 (non-commercial) by their authors; "
        f"by downloading them you accept that licence.")


def _hub_unreachable() -> Optional[str]:
    """Why the hub cannot be reached (offline mode, no DNS), or None; avoids long retry loops."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"no network: cannot resolve {host} ({exc})"
    return None


# ---- key matching -------------------------------------------------------------------------------

def match_state_dict(model: MASt3R, state: Mapping[str, torch.Tensor], source: Any = "") -> Dict[str, torch.Tensor]:
    """State_dict for ``model`` from checkpoint entries, strictly, modulo the known aliases."""
    expected = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        alias = _ALIAS.match(key)
        if alias:
            aliases[f"{alias.group(1)}layer{int(alias.group(2)) + 1}_rn.weight"] = value
        elif key in expected:
            out[key] = value
        elif key not in _IGNORED:
            unexpected.append(key)
    for key, value in aliases.items():  # an alias stands in for its original when that is absent
        if key not in out:
            out[key] = value
        elif out[key].shape != value.shape or not torch.equal(out[key], value):
            raise CheckpointError(f"{source}: alias of {key} differs from it")
    missing = [k for k in expected if k not in out]
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(expected[k].shape)}"
             for k, v in out.items() if tuple(v.shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the network:\n  " + "\n  ".join(problems))
    return out


def _listing(items: list, limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ---- entry point --------------------------------------------------------------------------------

def read_checkpoint(source: str | os.PathLike) -> Tuple[MASt3RConfig, Dict[str, torch.Tensor], str]:
    """(config, state_dict, description) from a .pth file, a hub folder or a hub id."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".safetensors":
            return (*read_hub_dir(path.parent), str(path.parent))
        return (*read_official_pth(path), str(path))
    if path.is_dir():
        return (*read_hub_dir(path), str(path))
    text = str(source)
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", text) and not text.endswith((".pth", ".pt", ".safetensors")):
        return (*read_hub_dir(fetch_from_hub(text)), text)
    raise CheckpointError(
        f"checkpoint {text!r} not found: pass an official .pth file, a folder with config.json and "
        f"model.safetensors, or a Hugging Face hub id such as {DEFAULT_CHECKPOINT}")


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """The torch device to run on: ``device``, or CUDA when available, else the CPU.

    Raises ValueError for a device string torch does not know or a device this machine lacks (e.g.
    ``cuda`` without CUDA, ``cuda:3`` with one GPU), so that the command lines fail before loading anything.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N ({exc})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, dev.type, None)
        available = bool(getattr(backend, "is_available", lambda: False)())
        count = int(getattr(backend, "device_count", lambda: 1)()) if available else 0
    if not available:
        raise ValueError(f"device {str(device)!r} is not available on this machine (torch {torch.__version__}"
                         f"{'' if dev.type != 'cuda' else ', no CUDA device found'}): use 'cpu'")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {str(device)!r} does not exist: this machine has {count} {dev.type} device(s)")
    return dev


def load_model(source: str | os.PathLike = DEFAULT_CHECKPOINT, device: Optional[str | torch.device] = None,
               amp_dtype: Optional[torch.dtype] = None) -> MASt3R:
    """Build the network described by a checkpoint and load its weights (strict key matching).

    ``device`` defaults to CUDA when available (see :func:`resolve_device`). ``amp_dtype`` (e.g.
    ``torch.bfloat16``) enables autocast of the encoder and decoder (meant for CUDA); the heads always run
    in float32.
    """
    device = resolve_device(device)  # a bad device fails before the checkpoint is read
    config, state, description = read_checkpoint(source)
    with torch.device("meta"):
        model = MASt3R(config)
    weights = match_state_dict(model, state, description)
    model.load_state_dict(weights, strict=True, assign=True)
    del state, weights
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    model.amp_dtype = amp_dtype
    logger.info("loaded MASt3R (%d encoder / %d decoder blocks) from %s on %s",
                config.enc_depth, config.dec_depth, description, device)
    return model
