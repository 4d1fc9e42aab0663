"""Deterministic test weights for MASt3R, written in the official checkpoint formats.

The real checkpoints cannot be downloaded everywhere (and carry a non-commercial licence), so tests
and offline checks use pseudo-random weights that follow fixed rules:

* every state_dict entry gets its own generator ``numpy.random.default_rng([seed, crc32(key)])`` and
  ``z = standard_normal(shape)`` in float64, rounded once to float32 after scaling;
* LayerNorm weights ``1 + 0.1 z``; biases and ``mask_token`` ``0.02 z``;
* Linear / Conv weights ``z * gain / sqrt(fan_in)`` (fan_in = ``in * kh * kw``; for the two
  ConvTranspose weights of the DPT ``(in, out, k, k)`` it is ``in``), with the gains of :data:`GAINS`;
* the alias keys ``downstream_head{1,2}.dpt.scratch.layer_rn.{0..3}.weight`` share the tensors of
  ``...scratch.layer{1..4}_rn.weight``.

Command line: ``python -m mast3r_colmap.testing.weights {small,full} OUT.pth [--seed S] [--hub]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Mapping, Tuple

import numpy as np
import torch

from ..model.mast3r import CONFIGS, MASt3R, MASt3RConfig

Shape = Tuple[int, ...]

#: (substring of the key, gain): the first match wins, every other weight has gain 1.
GAINS: Tuple[Tuple[str, float], ...] = (
    ("patch_embed.proj.", 4.0),
    ("attn.qkv.", 1.5),
    ("cross_attn.projq.", 1.5),
    ("cross_attn.projk.", 1.5),
    (".attn.proj.", 0.25),
    ("cross_attn.proj.", 0.5),
    (".mlp.fc2.", 0.5),
    ("dpt.head.4.", 0.5),
)
TRANSPOSED_CONV_KEYS = ("dpt.act_postprocess.0.1.weight", "dpt.act_postprocess.1.1.weight")


def alias_keys() -> Dict[str, str]:
    """Alias key -> key of the tensor it shares (absent from safetensors files)."""
    return {f"downstream_head{h}.dpt.scratch.layer_rn.{n - 1}.weight":
            f"downstream_head{h}.dpt.scratch.layer{n}_rn.weight" for h in (1, 2) for n in (1, 2, 3, 4)}


def _config(config: str | MASt3RConfig) -> MASt3RConfig:
    return CONFIGS[config] if isinstance(config, str) else config


def state_dict_layout(config: str | MASt3RConfig) -> List[Tuple[str, Shape]]:
    """(key, shape) of an official checkpoint in official order: our network's own parameters,
    plus the unused ``mask_token`` first and the alias keys after each ``layer4_rn``."""
    conf = _config(config)
    with torch.device("meta"):
        own = MASt3R(conf).state_dict()
    layout: List[Tuple[str, Shape]] = [("mask_token", (1, 1, conf.dec_embed_dim))]
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    by_target = {v: k for k, v in alias_keys().items()}
    for key, shape in shapes.items():
        layout.append((key, shape))
        if key.endswith("scratch.layer4_rn.weight"):
            prefix = key[: -len("layer4_rn.weight")]
            for n in range(1, 5):
                target = f"{prefix}layer{n}_rn.weight"
                layout.append((by_target[target], shapes[target]))
    return layout


def _scale(key: str, shape: Shape) -> Tuple[float, float]:
    """(offset, scale) of the rule that applies to this key."""
    leaf = key.split(".")[-2] if "." in key else key
    if key == "mask_token" or key.endswith(".bias"):
        return 0.0, 0.02
    if len(shape) == 1 and key.endswith(".weight") and leaf.startswith(("norm", "enc_norm", "dec_norm")):
        return 1.0, 0.1
    if len(shape) < 2:
        raise ValueError(f"no initialisation rule for {key} {shape}")
    fan_in = shape[0] if key.endswith(TRANSPOSED_CONV_KEYS) else int(np.prod(shape[1:]))
    gain = next((g for pattern, g in GAINS if pattern in key), 1.0)
    return 0.0, gain / math.sqrt(fan_in)


#: Normals drawn per step of :func:`make_tensor`: the float64 draws stay in cache (a generator's stream does not
#: depend on how its draws are split, so the values are those of one ``standard_normal(shape)``).
_CHUNK = 1 << 16


def make_tensor(key: str, shape: Shape, seed: int) -> torch.Tensor:
    """One float32 tensor following the module rules."""
    offset, scale = _scale(key, shape)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    out = torch.empty(shape, dtype=torch.float32)  # torch's allocation: no huge-page compaction (numpy asks for it)
    flat = out.numpy().reshape(-1)
    buf = np.empty(min(flat.size, _CHUNK))
    for start in range(0, flat.size, _CHUNK):
        z = buf[: min(_CHUNK, flat.size - start)]
        rng.standard_normal(out=z)
        z *= scale
        if offset:
            z += offset
        flat[start:start + z.size] = z  # rounded once to float32
    return out


def make_state_dict(config: str | MASt3RConfig, seed: int, workers: int | None = None) -> Dict[str, torch.Tensor]:
    """Deterministic float32 state_dict in official key order, alias keys sharing their tensors.

    The tensors are drawn by ``workers`` threads (default: one per CPU; numpy draws without the GIL): each key
    has its own generator, so the result does not depend on the number of threads.
    """
    aliases = alias_keys()
    layout = state_dict_layout(config)
    own = [(key, shape) for key, shape in layout if key not in aliases]
    workers = workers or min(len(own), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            # largest first, so that the threads finish together
            order = sorted(own, key=lambda item: -math.prod(item[1]))
            made = dict(zip((key for key, _ in order), pool.map(lambda item: make_tensor(*item, seed), order)))
    else:
        made = {key: make_tensor(key, shape, seed) for key, shape in own}
    sd: Dict[str, torch.Tensor] = {}
    for key, _ in layout:
        sd[key] = sd[aliases[key]] if key in aliases else made[key]
    return sd


def weights_checksum(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over keys, shapes and little-endian float32 bytes, in dict order."""
    h = hashlib.sha256()
    for key, value in sd.items():
        h.update(key.encode("utf-8"))
        h.update(str(tuple(value.shape)).encode("ascii"))
        h.update(value.detach().cpu().contiguous().numpy().astype("<f4", copy=False))  # its buffer, not a copy
    return h.hexdigest()


def constructor_string(config: str | MASt3RConfig) -> str:
    """``args.model`` of an official .pth for this architecture."""
    kwargs = _config(config).to_official()
    return "AsymmetricMASt3R(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def hub_config(config: str | MASt3RConfig) -> Dict[str, object]:
    """config.json of the hub (PyTorchModelHubMixin) format."""
    cfg = dict(_config(config).to_official())
    cfg.update(patch_embed_cls="PatchEmbedDust3R", landscape_only=False, desc_mode="norm")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def write_official_pth(path: str, config: str | MASt3RConfig, seed: int) -> None:
    """Official .pth container: {'args': Namespace(model=...), 'model': state_dict, 'epoch': 0}."""
    ckpt = {"args": argparse.Namespace(model=constructor_string(config)),
            "model": make_state_dict(config, seed), "epoch": 0}
    torch.save(ckpt, path)


def write_hub_dir(path: str, config: str | MASt3RConfig, seed: int) -> None:
    """Hub layout: config.json + model.safetensors without the alias keys (metadata maps them)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hub_config(config), f, sort_keys=True, indent=2)
    aliases = alias_keys()
    tensors = {k: v for k, v in make_state_dict(config, seed).items() if k not in aliases}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata=dict(aliases))


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write deterministic MASt3R test weights (NOT a trained model).")
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("output", help="a .pth file, or a folder with --hub")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hub", action="store_true", help="write the hub layout (config.json + model.safetensors)")
    args = parser.parse_args(argv)
    parent = os.path.dirname(os.path.abspath(args.output)) if not args.hub else args.output
    os.makedirs(parent, exist_ok=True)
    (write_hub_dir if args.hub else write_official_pth)(args.output, args.config, args.seed)
    print(f"wrote untrained '{args.config}' test weights (seed {args.seed}) to {args.output}")


if __name__ == "__main__":
    main()
