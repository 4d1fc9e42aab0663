"""The MASt3R network (Leroy et al., ECCV 2024), re-implemented from its description.

A ViT encoder shared by both images, two cross-attending decoder streams with their own weights,
and per view a DPT head (3D points + confidence) and a local-feature head (dense descriptors +
descriptor confidence). ``model(view1, view2)`` returns the official ``(pred1, pred2)`` dictionaries;
:meth:`MASt3R.encode` / :meth:`MASt3R.predict` / :meth:`MASt3R.symmetric` let a matcher encode an
image once and reuse it for all its pairs, and skip the DPT head when only descriptors are needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .heads import MASt3RHead
from .layers import DecoderBlock, EncoderBlock, RoPE2D, layer_norm

INF = math.inf
Mode = Tuple[str, float, float]
Pred = Dict[str, torch.Tensor]


class ConfigError(ValueError):
    """A model configuration that this implementation cannot build."""


@dataclass(frozen=True)
class MASt3RConfig:
    """Architecture of an AsymmetricMASt3R network. Defaults: MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric."""

    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0
    rope_freq: float = 100.0
    desc_dim: int = 24
    two_confs: bool = True
    norm_im2_in_dec: bool = True
    depth_mode: Mode = ("exp", -INF, INF)
    conf_mode: Mode = ("exp", 1.0, INF)
    desc_conf_mode: Mode = ("exp", 0.0, INF)
    img_size: Tuple[int, int] = (512, 512)

    def __post_init__(self) -> None:
        if self.dec_depth < 4:
            raise ConfigError(f"dec_depth must be >= 4 for the DPT hooks, got {self.dec_depth}")
        for name in ("enc", "dec"):
            dim, heads = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if dim % heads or (dim // heads) % 4:
                raise ConfigError(f"{name}_embed_dim {dim} must split into {name}_num_heads {heads} "
                                  "heads of a size divisible by 4 (2D RoPE)")
        if self.depth_mode != ("exp", -INF, INF):
            raise ConfigError(f"unsupported depth_mode {self.depth_mode}: only ('exp', -inf, inf)")
        for name in ("conf_mode", "desc_conf_mode"):
            mode = getattr(self, name)
            if len(mode) != 3 or mode[0] != "exp":
                raise ConfigError(f"unsupported {name} {mode}: only ('exp', vmin, vmax)")

    @property
    def dpt_hooks(self) -> Tuple[int, int, int, int]:
        """Indices into [encoder, decoder block 1..L] read by the DPT head."""
        d = self.dec_depth
        return (0, d * 2 // 4, d * 3 // 4, d)

    # ---- official constructor arguments ------------------------------------------------------

    @classmethod
    def from_official(cls, kwargs: Mapping[str, Any]) -> "MASt3RConfig":
        """Build from AsymmetricMASt3R constructor keyword arguments (``args.model`` or hub config.json)."""
        unknown = sorted(set(kwargs) - _OFFICIAL_ARGS)
        if unknown:
            raise ConfigError(f"unknown constructor argument(s): {', '.join(unknown)}")
        kw: Dict[str, Any] = {}
        for key in ("enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth",
                    "dec_num_heads", "patch_size"):
            if key in kwargs:
                kw[key] = int(kwargs[key])
        if "mlp_ratio" in kwargs:
            kw["mlp_ratio"] = float(kwargs["mlp_ratio"])
        for key in ("two_confs", "norm_im2_in_dec"):
            if key in kwargs:
                kw[key] = bool(kwargs[key])
        pos = str(kwargs.get("pos_embed", "RoPE100"))
        match = re.fullmatch(r"RoPE(\d+(?:\.\d+)?)", pos)
        if not match:
            raise ConfigError(f"unsupported pos_embed {pos!r}: only RoPE<freq> is implemented")
        kw["rope_freq"] = float(match.group(1))
        patch_cls = kwargs.get("patch_embed_cls", "PatchEmbedDust3R")
        if patch_cls not in ("PatchEmbedDust3R", "ManyAR_PatchEmbed"):
            raise ConfigError(f"unsupported patch_embed_cls {patch_cls!r}")
        head = kwargs.get("head_type", "catmlp+dpt")
        if head != "catmlp+dpt":
            raise ConfigError(f"unsupported head_type {head!r}: only 'catmlp+dpt' (MASt3R) is implemented")
        out = str(kwargs.get("output_mode", "pts3d+desc24"))
        match = re.fullmatch(r"pts3d\+desc(\d+)", out)
        if not match:
            raise ConfigError(f"unsupported output_mode {out!r}: expected 'pts3d+desc<N>'")
        kw["desc_dim"] = int(match.group(1))
        if kwargs.get("desc_mode", "norm") != "norm":
            raise ConfigError(f"unsupported desc_mode {kwargs['desc_mode']!r}: only 'norm'")
        for key in ("depth_mode", "conf_mode"):
            if key in kwargs:
                kw[key] = _mode(kwargs[key], key)
        # without desc_conf_mode the official model falls back to conf_mode
        kw["desc_conf_mode"] = _mode(kwargs.get("desc_conf_mode", kw.get("conf_mode", cls.conf_mode)),
                                     "desc_conf_mode")
        if "img_size" in kwargs:
            size = kwargs["img_size"]
            kw["img_size"] = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(map(int, size))
        return cls(**kw)

    def to_official(self) -> Dict[str, Any]:
        """Constructor keyword arguments in the order of the official training string."""
        return {
            "pos_embed": f"RoPE{self.rope_freq:g}",
            "patch_embed_cls": "ManyAR_PatchEmbed",
            "img_size": tuple(self.img_size),
            "head_type": "catmlp+dpt",
            "output_mode": f"pts3d+desc{self.desc_dim}",
            "depth_mode": _py_mode(self.depth_mode),
            "conf_mode": _py_mode(self.conf_mode),
            "enc_embed_dim": self.enc_embed_dim,
            "enc_depth": self.enc_depth,
            "enc_num_heads": self.enc_num_heads,
            "dec_embed_dim": self.dec_embed_dim,
            "dec_depth": self.dec_depth,
            "dec_num_heads": self.dec_num_heads,
            "two_confs": self.two_confs,
            "desc_conf_mode": _py_mode(self.desc_conf_mode),
        }


_OFFICIAL_ARGS = {
    "pos_embed", "patch_embed_cls", "img_size", "head_type", "output_mode", "depth_mode", "conf_mode",
    "enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth", "dec_num_heads",
    "two_confs", "desc_conf_mode", "desc_mode", "landscape_only", "patch_size", "mlp_ratio",
    "norm_im2_in_dec", "freeze", "mask_ratio",
}


def _mode(value: Any, name: str) -> Mode:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ConfigError(f"{name} must be a (mode, vmin, vmax) triple, got {value!r}")
    return (str(value[0]), float(value[1]), float(value[2]))


def _py_mode(mode: Mode) -> Tuple[str, Any, Any]:
    """(mode, vmin, vmax) with integral floats as ints, as in the official training strings."""
    return tuple(int(v) if isinstance(v, float) and math.isfinite(v) and v == int(v) else v
                 for v in mode)  # type: ignore[return-value]


#: Named architectures: 'full' is the released 512 metric model, 'small' the smallest one the
#: official code accepts (used for tests).
CONFIGS: Dict[str, MASt3RConfig] = {
    "full": MASt3RConfig(),
    "small": MASt3RConfig(enc_embed_dim=64, enc_depth=2, enc_num_heads=2,
                          dec_embed_dim=48, dec_depth=10, dec_num_heads=2),
}


@dataclass
class Encoding:
    """Encoder output of a batch of same-sized images, reusable for any number of pairs."""

    tokens: torch.Tensor            # (B, Hp*Wp, enc_dim), after enc_norm
    grid: Tuple[int, int]           # (Hp, Wp)
    patch_size: int = 16

    @property
    def image_shape(self) -> Tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    def __getitem__(self, index: Any) -> "Encoding":
        tokens = self.tokens[index]
        if tokens.dim() == 2:
            tokens = tokens[None]
        return dataclasses.replace(self, tokens=tokens)

    @staticmethod
    def cat(encodings: List["Encoding"]) -> "Encoding":
        grids = {e.grid for e in encodings}
        if len(grids) != 1:
            raise ValueError(f"cannot batch encodings of different grids {sorted(grids)}")
        return dataclasses.replace(encodings[0], tokens=torch.cat([e.tokens for e in encodings]))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)


class MASt3R(nn.Module):
    """AsymmetricMASt3R inference network with the official parameter names."""

    def __init__(self, conf: MASt3RConfig | Mapping[str, Any] | str | None = None):
        super().__init__()
        if conf is None:
            conf = MASt3RConfig()
        elif isinstance(conf, str):
            conf = CONFIGS[conf]
        elif isinstance(conf, Mapping):
            conf = MASt3RConfig(**conf)
        self.conf = conf
        c = conf
        rope = RoPE2D(c.rope_freq)
        self.patch_embed = PatchEmbed(c.enc_embed_dim, c.patch_size)
        self.enc_blocks = nn.ModuleList(
            EncoderBlock(c.enc_embed_dim, c.enc_num_heads, c.mlp_ratio, rope) for _ in range(c.enc_depth))
        self.enc_norm = layer_norm(c.enc_embed_dim)
        self.decoder_embed = nn.Linear(c.enc_embed_dim, c.dec_embed_dim)
        self.dec_blocks = self._decoder(rope)
        self.dec_norm = layer_norm(c.dec_embed_dim)
        self.dec_blocks2 = self._decoder(rope)
        local_channels = c.desc_dim + int(c.two_confs)
        self.downstream_head1 = MASt3RHead(c.enc_embed_dim, c.dec_embed_dim, 4, local_channels,
                                           c.patch_size, c.mlp_ratio)
        self.downstream_head2 = MASt3RHead(c.enc_embed_dim, c.dec_embed_dim, 4, local_channels,
                                           c.patch_size, c.mlp_ratio)
        #: autocast dtype of encoder and decoder (None: float32); the heads always run in float32.
        #: Meant for CUDA; on a CPU, bf16 is fast only with native support (AMX / AVX512-BF16).
        self.amp_dtype: Optional[torch.dtype] = None
        self._weights_digest: Optional[Tuple[Tuple[Tuple[int, int], ...], str]] = None

    def weights_digest(self) -> str:
        """sha256 of the loaded weights: every tensor of the state dict (name, dtype, shape and bytes).

        It keys stored matches by the weights themselves, not by the checkpoint path they came from.
        Computed once (about 2 s for ViT-L) and cached; tensors changed in place (``load_state_dict``) or
        replaced since are noticed and hashed again.
        """
        state = self.state_dict()
        stamp = tuple((t.data_ptr(), t._version) for t in state.values())
        if self._weights_digest is not None and self._weights_digest[0] == stamp:
            return self._weights_digest[1]
        digest = hashlib.sha256()
        for name in sorted(state):
            tensor = state[name].detach().contiguous().cpu()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode("utf-8"))
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        self._weights_digest = (stamp, digest.hexdigest())
        return self._weights_digest[1]

    def _decoder(self, rope: RoPE2D) -> nn.ModuleList:
        c = self.conf
        return nn.ModuleList(DecoderBlock(c.dec_embed_dim, c.dec_num_heads, c.mlp_ratio, rope, c.norm_im2_in_dec)
                             for _ in range(c.dec_depth))

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- encoder ----------------------------------------------------------------------------

    def encode(self, img: torch.Tensor, true_shape: Optional[torch.Tensor] = None) -> Encoding:
        """Encode (B, 3, H, W) images in [-1, 1]; H and W must be multiples of the patch size."""
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(img.shape)}")
        h, w = img.shape[-2:]
        p = self.conf.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        _check_true_shape(true_shape, img)
        grid = (h // p, w // p)
        with self._autocast():
            x = self.patch_embed(img)
            for block in self.enc_blocks:
                x = block(x, grid)
            x = self.enc_norm(x)
        return Encoding(x, grid, p)

    # ---- decoder ----------------------------------------------------------------------------

    def decode(self, enc1: Encoding, enc2: Encoding, keep: Tuple[int, ...] = ()) -> Tuple[List, List]:
        """Run both decoder streams; returns per stream the token sets at the indices ``keep`` of
        [encoder, block 1, ..., block L] (block L normed by dec_norm), followed by normed block L."""
        if enc1.tokens.shape[0] != enc2.tokens.shape[0]:
            raise ValueError("both views must have the same batch size")
        depth = self.conf.dec_depth
        out1 = [enc1.tokens] if 0 in keep else []
        out2 = [enc2.tokens] if 0 in keep else []
        with self._autocast():
            f1, f2 = self.decoder_embed(enc1.tokens), self.decoder_embed(enc2.tokens)
            for i, (blk1, blk2) in enumerate(zip(self.dec_blocks, self.dec_blocks2), start=1):
                f1, f2 = blk1(f1, f2, enc1.grid, enc2.grid), blk2(f2, f1, enc2.grid, enc1.grid)
                if i in keep and i != depth:
                    out1.append(f1)
                    out2.append(f2)
            f1, f2 = self.dec_norm(f1), self.dec_norm(f2)
        if depth in keep:
            out1.append(f1)
            out2.append(f2)
        out1.append(f1)
        out2.append(f2)
        return out1, out2

    # ---- heads --------------------------------------------------------------------------------

    def _head(self, head: MASt3RHead, enc: Encoding, tokens: List[torch.Tensor], with_pts3d: bool) -> Pred:
        c = self.conf
        with torch.autocast(enc.tokens.device.type, enabled=False):
            enc_tokens = enc.tokens.float()
            last = tokens[-1].float()
            local = head.local_features(enc_tokens, last, enc.grid).permute(0, 2, 3, 1)
            desc = local[..., : c.desc_dim]
            pred: Pred = {}
            if with_pts3d or not c.two_confs:
                dpt = head.dpt([t.float() for t in tokens[:4]], enc.grid).permute(0, 2, 3, 1)
                xyz = dpt[..., :3]
                dist = xyz.norm(dim=-1, keepdim=True)
                pred["pts3d"] = xyz / dist.clip(min=1e-8) * torch.expm1(dist)
                pred["conf"] = _exp_conf(dpt[..., 3], c.conf_mode)
            pred["desc"] = desc / desc.norm(dim=-1, keepdim=True)
            pred["desc_conf"] = (_exp_conf(local[..., c.desc_dim], c.desc_conf_mode) if c.two_confs
                                 else pred["conf"])
        if not with_pts3d:
            pred.pop("pts3d", None)
            pred.pop("conf", None)
        return pred

    def predict(self, enc1: Encoding, enc2: Encoding, with_pts3d: bool = True) -> Tuple[Pred, Pred]:
        """Decoder and heads for view pairs whose encodings are given (batched along dim 0).

        ``with_pts3d=False`` is the descriptor-only path: the DPT head is skipped and the
        intermediate decoder layers are not kept; the predictions then hold ``desc`` and ``desc_conf``.
        """
        keep = self.conf.dpt_hooks if with_pts3d or not self.conf.two_confs else ()
        tokens1, tokens2 = self.decode(enc1, enc2, keep)
        pred1 = self._head(self.downstream_head1, enc1, tokens1, with_pts3d)
        pred2 = self._head(self.downstream_head2, enc2, tokens2, with_pts3d)
        if "pts3d" in pred2:
            pred2["pts3d_in_other_view"] = pred2.pop("pts3d")
        return pred1, pred2

    def symmetric(self, enc1: Encoding, enc2: Encoding,
                  with_pts3d: bool = False) -> Tuple[Pred, Pred, Pred, Pred]:
        """Both orders from one encoding each: (res11, res21, res22, res12), where resXY is image X
        through head Y (MASt3R-SfM's symmetric inference). Same-sized pairs run as one batch."""
        b = enc1.tokens.shape[0]
        if enc1.grid == enc2.grid:
            fwd = Encoding.cat([enc1, enc2])
            bwd = Encoding.cat([enc2, enc1])
            p1, p2 = self.predict(fwd, bwd, with_pts3d)
            split = lambda p, s: {k: v[s] for k, v in p.items()}  # noqa: E731
            return (split(p1, slice(0, b)), split(p2, slice(0, b)),
                    split(p1, slice(b, 2 * b)), split(p2, slice(b, 2 * b)))
        res11, res21 = self.predict(enc1, enc2, with_pts3d)
        res22, res12 = self.predict(enc2, enc1, with_pts3d)
        return res11, res21, res22, res12

    def forward(self, view1: Mapping[str, torch.Tensor], view2: Mapping[str, torch.Tensor]) -> Tuple[Pred, Pred]:
        """Official interface: views are {'img': (B,3,H,W), 'true_shape': (B,2)}; returns (pred1, pred2)."""
        img1, img2 = view1["img"], view2["img"]
        if img1.shape == img2.shape:  # one encoder batch, as the official model does
            _check_true_shape(view1.get("true_shape"), img1)
            _check_true_shape(view2.get("true_shape"), img2)
            both = self.encode(torch.cat([img1, img2]))
            b = img1.shape[0]
            enc1, enc2 = both[:b], both[b:]
        else:
            enc1 = self.encode(img1, view1.get("true_shape"))
            enc2 = self.encode(img2, view2.get("true_shape"))
        return self.predict(enc1, enc2, with_pts3d=True)


def _check_true_shape(true_shape: Optional[torch.Tensor], img: torch.Tensor) -> None:
    """The network runs at the tensor's size: a given true_shape must agree with it."""
    if true_shape is None:
        return
    ts = torch.as_tensor(true_shape).reshape(-1, 2)
    h, w = img.shape[-2:]
    if not bool((ts[:, 0] == h).all() and (ts[:, 1] == w).all()):
        raise ValueError(f"true_shape {ts.tolist()} does not match the image size {(h, w)}")


def _exp_conf(logit: torch.Tensor, mode: Mode) -> torch.Tensor:
    _, vmin, vmax = mode
    return vmin + logit.exp().clip(max=vmax - vmin)
