"""A deliberately naive float64 reference forward pass of MASt3R, written from the spec text alone.

Independent of ``mast3r_colmap.model``: it takes a state_dict keyed by the official names plus a few
config numbers, and computes everything with explicit formulas (spec §2.1–§2.7):

* patch embedding as a matrix product over explicitly cut 16×16 patches (§2.1);
* RoPE2D with explicit index pairs (j, j+F) inside each half of a head, y on the first half, x on the
  second, θ_k = freq^(-2k/D) computed in float64 (§2.2);
* attention as an explicit ``softmax(q kᵀ · d^-0.5) v`` with a hand-written softmax (§2.3, §2.4);
* LayerNorm (eps 1e-6) and exact GELU written out (§2);
* DPT with conv2d calls, ConvTranspose (k = s, no overlap) as an explicit einsum over the
  (in, out, k, k) weight, ×2 bilinear align_corners=True upsampling as explicit interpolation
  matrices, the refinenet4 crop and the fusion order of §2.5;
* the local-feature pixel shuffle as explicit index arithmetic (§2.6);
* post-processing of §2.7.

Nothing here is meant to be fast; everything runs in float64 on CPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F

LN_EPS = 1e-6
DT = torch.float64

Pred = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class RefConfig:
    """The numbers the state_dict does not determine (dims and depths are read from its shapes)."""

    enc_num_heads: int
    dec_num_heads: int
    rope_freq: float = 100.0
    desc_dim: int = 24
    two_confs: bool = True
    patch_size: int = 16
    conf_mode: Tuple[str, float, float] = ("exp", 1.0, math.inf)
    desc_conf_mode: Tuple[str, float, float] = ("exp", 0.0, math.inf)


# ---- elementary operations ------------------------------------------------------------------------

def linear(x: torch.Tensor, sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def layer_norm(x: torch.Tensor, sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance
    return (x - mean) / torch.sqrt(var + LN_EPS) * sd[name + ".weight"] + sd[name + ".bias"]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def softmax_lastdim(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def mlp(x: torch.Tensor, sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return linear(gelu(linear(x, sd, name + ".fc1")), sd, name + ".fc2")


# ---- positions and RoPE (§2.1, §2.2) ----------------------------------------------------------------

def positions(hp: int, wp: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(py, px) of the row-major tokens t = y·Wp + x."""
    t = torch.arange(hp * wp)
    return (t // wp).to(DT), (t % wp).to(DT)


def rope_half(u: torch.Tensor, p: torch.Tensor, freq: float) -> torch.Tensor:
    """Rotate one half u (..., N, D) by the positions p (N,): pairs (j, j+F), F = D/2."""
    d = u.shape[-1]
    f = d // 2
    out = torch.empty_like(u)
    for j in range(f):
        theta = freq ** (-2.0 * j / d)
        a = p * theta  # (N,)
        c, s = torch.cos(a), torch.sin(a)
        out[..., j] = u[..., j] * c - u[..., j + f] * s
        out[..., j + f] = u[..., j + f] * c + u[..., j] * s
    return out


def rope2d(x: torch.Tensor, pos: Tuple[torch.Tensor, torch.Tensor], freq: float) -> torch.Tensor:
    """x: (B, heads, N, Dh); y rotates the first half of each head, x the second half."""
    dh = x.shape[-1]
    half = dh // 2
    py, px = pos
    return torch.cat([rope_half(x[..., :half], py, freq), rope_half(x[..., half:], px, freq)], dim=-1)


# ---- attention ------------------------------------------------------------------------------------

def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    d = q.shape[-1]
    return softmax_lastdim(q @ k.transpose(-1, -2) * d ** -0.5) @ v


def self_attention(x, sd, name, heads, pos, freq):
    b, n, c = x.shape
    qkv = linear(x, sd, name + ".qkv")                      # rows ordered [q | k | v] × heads × hd
    qkv = qkv.reshape(b, n, 3, heads, c // heads)
    q = qkv[:, :, 0].permute(0, 2, 1, 3)
    k = qkv[:, :, 1].permute(0, 2, 1, 3)
    v = qkv[:, :, 2].permute(0, 2, 1, 3)
    q, k = rope2d(q, pos, freq), rope2d(k, pos, freq)
    return linear(merge_heads(attend(q, k, v)), sd, name + ".proj")


def cross_attention(x, y, sd, name, heads, pos_x, pos_y, freq):
    q = split_heads(linear(x, sd, name + ".projq"), heads)
    k = split_heads(linear(y, sd, name + ".projk"), heads)
    v = split_heads(linear(y, sd, name + ".projv"), heads)
    q, k = rope2d(q, pos_x, freq), rope2d(k, pos_y, freq)  # k uses the other image's positions
    return linear(merge_heads(attend(q, k, v)), sd, name + ".proj")


# ---- encoder and decoder (§2.1, §2.3, §2.4) -------------------------------------------------------

def count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(ids) + 1 if ids else 0


def patch_embed(img: torch.Tensor, sd, p: int) -> torch.Tensor:
    """Cut (B, 3, H, W) into p×p patches, row-major, and apply the conv as a matrix product."""
    b, ch, h, w = img.shape
    hp, wp = h // p, w // p
    patches = img.reshape(b, ch, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, ch * p * p)
    weight = sd["patch_embed.proj.weight"]                   # (C, 3, p, p)
    return patches @ weight.reshape(weight.shape[0], -1).T + sd["patch_embed.proj.bias"]


def encoder(img: torch.Tensor, sd, cfg: RefConfig) -> torch.Tensor:
    p = cfg.patch_size
    hp, wp = img.shape[-2] // p, img.shape[-1] // p
    pos = positions(hp, wp)
    x = patch_embed(img, sd, p)
    for i in range(count_blocks(sd, "enc_blocks")):
        name = f"enc_blocks.{i}"
        x = x + self_attention(layer_norm(x, sd, name + ".norm1"), sd, name + ".attn",
                               cfg.enc_num_heads, pos, cfg.rope_freq)
        x = x + mlp(layer_norm(x, sd, name + ".norm2"), sd, name + ".mlp")
    return layer_norm(x, sd, "enc_norm")


def decoder_block(x, y, sd, name, cfg: RefConfig, pos_x, pos_y):
    x = x + self_attention(layer_norm(x, sd, name + ".norm1"), sd, name + ".attn",
                           cfg.dec_num_heads, pos_x, cfg.rope_freq)
    y_n = layer_norm(y, sd, name + ".norm_y")
    x = x + cross_attention(layer_norm(x, sd, name + ".norm2"), y_n, sd, name + ".cross_attn",
                            cfg.dec_num_heads, pos_x, pos_y, cfg.rope_freq)
    return x + mlp(layer_norm(x, sd, name + ".norm3"), sd, name + ".mlp")


def decoder(enc1, enc2, grid1, grid2, sd, cfg: RefConfig) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Token lists [enc_v, fv_1, ..., fv_{L-1}, dec_norm(fv_L)] of both views."""
    depth = count_blocks(sd, "dec_blocks")
    assert count_blocks(sd, "dec_blocks2") == depth
    pos1, pos2 = positions(*grid1), positions(*grid2)
    f1, f2 = linear(enc1, sd, "decoder_embed"), linear(enc2, sd, "decoder_embed")
    list1, list2 = [enc1], [enc2]
    for i in range(depth):
        new1 = decoder_block(f1, f2, sd, f"dec_blocks.{i}", cfg, pos1, pos2)
        new2 = decoder_block(f2, f1, sd, f"dec_blocks2.{i}", cfg, pos2, pos1)  # both read the previous layer
        f1, f2 = new1, new2
        list1.append(f1)
        list2.append(f2)
    list1[-1] = layer_norm(list1[-1], sd, "dec_norm")
    list2[-1] = layer_norm(list2[-1], sd, "dec_norm")
    return list1, list2


# ---- DPT head (§2.5) ----------------------------------------------------------------------------------

def conv(x, sd, name, stride=1, padding=0, bias=True):
    return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None, stride=stride, padding=padding)


def conv_transpose_nonoverlap(x: torch.Tensor, sd, name: str) -> torch.Tensor:
    """ConvTranspose2d with kernel = stride = k: out[o, k·y+i, k·x+j] = Σ_c x[c, y, x] W[c, o, i, j] + b[o]."""
    w = sd[name + ".weight"]                                 # (in, out, k, k)
    k = w.shape[-1]
    b, _, h, wd = x.shape
    out = torch.einsum("bcyx,coij->boyixj", x, w).reshape(b, w.shape[1], h * k, wd * k)
    return out + sd[name + ".bias"][None, :, None, None]


def interp_matrix(n: int) -> torch.Tensor:
    """(2n, n) matrix of ×2 linear interpolation with align_corners=True: src = i·(n−1)/(2n−1)."""
    m = torch.zeros(2 * n, n, dtype=DT)
    for i in range(2 * n):
        src = i * (n - 1) / (2 * n - 1) if n > 1 else 0.0
        i0 = min(int(math.floor(src)), n - 1)
        i1 = min(i0 + 1, n - 1)
        t = src - i0
        m[i, i0] += 1.0 - t
        m[i, i1] += t
    return m


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    ah, aw = interp_matrix(x.shape[-2]), interp_matrix(x.shape[-1])
    return torch.einsum("yh,bchw,xw->bcyx", ah, x, aw)


def rcu(x, sd, name):
    return conv(relu(conv(relu(x), sd, name + ".conv1", padding=1)), sd, name + ".conv2", padding=1) + x


def fusion(sd, name, a, b=None):
    out = a if b is None else a + rcu(b, sd, name + ".resConfUnit1")
    out = rcu(out, sd, name + ".resConfUnit2")
    return conv(upsample2x(out), sd, name + ".out_conv")


def dpt(tokens4: List[torch.Tensor], grid, sd, prefix: str) -> torch.Tensor:
    hp, wp = grid
    maps = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], hp, wp) for t in tokens4]
    ap = prefix + ".act_postprocess"
    m0 = conv_transpose_nonoverlap(conv(maps[0], sd, ap + ".0.0"), sd, ap + ".0.1")   # 4Hp × 4Wp
    m1 = conv_transpose_nonoverlap(conv(maps[1], sd, ap + ".1.0"), sd, ap + ".1.1")   # 2Hp × 2Wp
    m2 = conv(maps[2], sd, ap + ".2.0")                                                # Hp × Wp
    m3 = conv(conv(maps[3], sd, ap + ".3.0"), sd, ap + ".3.1", stride=2, padding=1)   # ceil(Hp/2) × ceil(Wp/2)
    sc = prefix + ".scratch"
    l1, l2, l3, l4 = (conv(m, sd, f"{sc}.layer{n}_rn", padding=1, bias=False)
                      for n, m in zip((1, 2, 3, 4), (m0, m1, m2, m3)))
    p4 = fusion(sd, sc + ".refinenet4", l4)[:, :, : l3.shape[2], : l3.shape[3]]
    p3 = fusion(sd, sc + ".refinenet3", p4, l3)
    p2 = fusion(sd, sc + ".refinenet2", p3, l2)
    p1 = fusion(sd, sc + ".refinenet1", p2, l1)
    h = prefix + ".head"
    out = conv(p1, sd, h + ".0", padding=1)
    out = upsample2x(out)
    out = relu(conv(out, sd, h + ".2", padding=1))
    return conv(out, sd, h + ".4")                          # (B, 4, H, W)


# ---- local features (§2.6) and post-processing (§2.7) -------------------------------------------

def local_features(enc, dec_last, grid, sd, prefix: str, patch: int) -> torch.Tensor:
    """(B, H, W, C): channel c·p² + dy·p + dx of token (py, px) goes to pixel (p·py+dy, p·px+dx)."""
    x = mlp(torch.cat([enc, dec_last], dim=-1), sd, prefix + ".head_local_features")  # (B, S, C·p²)
    hp, wp = grid
    n_ch = x.shape[-1] // (patch * patch)
    yy = torch.arange(hp * patch)[:, None].expand(hp * patch, wp * patch)
    xx = torch.arange(wp * patch)[None, :].expand(hp * patch, wp * patch)
    token = (yy // patch) * wp + (xx // patch)                          # (H, W)
    offset = (yy % patch) * patch + (xx % patch)                        # (H, W)
    channel = torch.arange(n_ch)[None, None, :] * patch * patch + offset[..., None]  # (H, W, C)
    return x[:, token[..., None].expand_as(channel), channel]            # (B, H, W, C)


def exp_conf(x: torch.Tensor, mode) -> torch.Tensor:
    kind, vmin, vmax = mode
    assert kind == "exp"
    return vmin + torch.clamp(torch.exp(x), max=vmax - vmin)


def head(tokens: List[torch.Tensor], grid, sd, cfg: RefConfig, h: int) -> Pred:
    prefix = f"downstream_head{h}"
    depth = len(tokens) - 1
    hooks = [0, depth * 2 // 4, depth * 3 // 4, depth]
    raw_dpt = dpt([tokens[i] for i in hooks], grid, sd, prefix + ".dpt").permute(0, 2, 3, 1)
    local = local_features(tokens[0], tokens[-1], grid, sd, prefix, cfg.patch_size)
    xyz = raw_dpt[..., 0:3]
    dist = torch.sqrt((xyz ** 2).sum(dim=-1, keepdim=True))
    conf = exp_conf(raw_dpt[..., 3], cfg.conf_mode)
    d = local[..., : cfg.desc_dim]
    pred = {
        "pts3d": xyz / torch.clamp(dist, min=1e-8) * torch.expm1(dist),
        "conf": conf,
        "desc": d / torch.sqrt((d ** 2).sum(dim=-1, keepdim=True)),
        "desc_conf": exp_conf(local[..., cfg.desc_dim], cfg.desc_conf_mode) if cfg.two_confs else conf.clone(),
    }
    if cfg.two_confs:
        assert local.shape[-1] == cfg.desc_dim + 1
    else:
        assert local.shape[-1] == cfg.desc_dim
    return pred


def to_float64(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", DT) for k, v in sd.items()}


@torch.no_grad()
def reference_forward(sd: Mapping[str, torch.Tensor], cfg: RefConfig, img1: torch.Tensor,
                      img2: torch.Tensor) -> Tuple[Pred, Pred]:
    """(pred1, pred2) of the official model for images (B, 3, H, W), computed in float64."""
    sd = sd if all(v.dtype == DT for v in sd.values()) else to_float64(sd)
    img1, img2 = img1.to("cpu", DT), img2.to("cpu", DT)
    p = cfg.patch_size
    grid1 = (img1.shape[-2] // p, img1.shape[-1] // p)
    grid2 = (img2.shape[-2] // p, img2.shape[-1] // p)
    enc1, enc2 = encoder(img1, sd, cfg), encoder(img2, sd, cfg)
    tok1, tok2 = decoder(enc1, enc2, grid1, grid2, sd, cfg)
    pred1 = head(tok1, grid1, sd, cfg, 1)
    pred2 = head(tok2, grid2, sd, cfg, 2)
    pred2["pts3d_in_other_view"] = pred2.pop("pts3d")
    return pred1, pred2
