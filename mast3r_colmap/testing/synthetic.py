"""Synthetic scenes with known geometry: an oracle that stands in for the MASt3R network.

A scene is a set of textured planar rectangles (a ground plane, walls, panels, boxes) seen by pinhole
cameras with known intrinsics and poses. Everything is derived by exact, vectorised ray casting:

* :meth:`SyntheticScene.render` colours every pixel with a texture that is a deterministic function of
  the 3D point it sees, so all views are photometrically consistent;
* :func:`descriptor_field` maps a 3D point to an ideal unit descriptor (random Fourier features), and
  :class:`SyntheticNetwork` serves them where the MASt3R network plugs into the
  :class:`~mast3r_colmap.matching.matcher.Matcher` (the :class:`~mast3r_colmap.matching.dense.DenseNetwork`
  seam), so the real image loading, caching, batching, matching, coarse-to-fine, consolidation,
  database, verification and mapping code can be tested end to end with known answers;
* :meth:`SyntheticScene.reconstruction` and :func:`pose_errors` give the ground truth and the score.

Conventions
-----------
World frame: z is up. Cameras follow COLMAP (x right, y down, z forward), ``X_cam = R @ X + t``.

Pixel coordinates in this module's API (``cast``, ``project``, ``true_correspondences``, the
``to_original`` maps) are in **hloc's convention**: (0, 0) is the *centre* of the top-left pixel, so
pixel (col, row) is sampled at (x, y) = (col, row). COLMAP's camera models put the top-left *corner* at
(0, 0), i.e. that pixel centre at (0.5, 0.5). Hence ``x_colmap = x_hloc + 0.5`` and, for the cameras
here, ``x_hloc = f * X / Z + cx - 0.5`` with COLMAP's ``cx = W / 2``.

EXIF orientation: ``scene.orientations`` may give an image an EXIF orientation (1..8). Its file then
stores the rendered image's pixels un-rotated (:meth:`SyntheticScene.write_images` writes the tag, so
that ``exif_transpose`` gives back the rendering); the scene's camera, ``cast`` and ``project`` stay in the
rendered (upright) frame, and :meth:`SyntheticScene.stored_to_render` maps pixels of the stored file
(where the matcher puts keypoints, as COLMAP and hloc) into it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycolmap
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from ..images import stored_to_upright
from ..matching.dense import Key, PixelMap, Window

#: Dimension of the ideal descriptors.
DESC_DIM = 24

# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rect:
    """A planar parallelogram ``origin + a * u + b * v`` with a, b in [0, 1] (two-sided)."""

    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.u, self.v)
        return n / np.linalg.norm(n)

    @property
    def corners(self) -> np.ndarray:
        o, u, v = self.origin, self.u, self.v
        return np.stack([o, o + u, o + v, o + u + v])


def _rect(origin: Sequence[float], u: Sequence[float], v: Sequence[float]) -> Rect:
    return Rect(np.asarray(origin, np.float64), np.asarray(u, np.float64), np.asarray(v, np.float64))


def _vertical_wall(p0: Sequence[float], p1: Sequence[float], z0: float, z1: float) -> Rect:
    """Vertical rectangle above the ground segment p0 -> p1 (xy), between heights z0 and z1."""
    return _rect([p0[0], p0[1], z0], [p1[0] - p0[0], p1[1] - p0[1], 0.0], [0.0, 0.0, z1 - z0])


def _box(center: Sequence[float], size: Sequence[float], yaw_deg: float) -> List[Rect]:
    """The five visible faces (no bottom) of a box standing on the ground, rotated about z."""
    c = np.asarray(center, np.float64)
    sx, sy, sz = (float(s) for s in size)
    rot = Rotation.from_euler("z", yaw_deg, degrees=True).as_matrix()
    ex, ey, ez = rot[:, 0] * sx, rot[:, 1] * sy, np.array([0.0, 0.0, sz])
    o = c - ex / 2 - ey / 2          # bottom corner, c is the centre of the bottom face
    return [Rect(o, ex, ez), Rect(o + ey, ex, ez), Rect(o, ey, ez), Rect(o + ex, ey, ez),
            Rect(o + ez, ex, ey)]


def _surfaces(kind: str, rng: np.random.Generator) -> Tuple[List[Rect], np.ndarray]:
    """Surfaces of a scene kind and the point the cameras look at."""
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731  small deterministic jitter
    if kind == "planes":
        rects = [
            _rect([-3.5, -3.0, 0.0], [7.0, 0.0, 0.0], [0.0, 6.0, 0.0]),            # ground
            _vertical_wall([-3.5, 2.6 + j(0.1)], [3.5, 2.4 + j(0.1)], 0.0, 3.2),      # back wall
            _vertical_wall([-3.0, -0.4], [-2.2 + j(0.1), 2.5], 0.0, 2.6),            # left, angled
            _vertical_wall([2.1 + j(0.1), 0.6], [3.2, 2.5], 0.0, 2.2),               # right, angled
        ]
        # A free-standing tilted panel in the middle (occludes the back wall).
        rot = Rotation.from_euler("zx", [25.0 + j(5), -15.0 + j(5)], degrees=True).as_matrix()
        u, v = rot @ np.array([1.3, 0.0, 0.0]), rot @ np.array([0.0, 0.0, 0.9])
        rects.append(Rect(np.array([0.2, 1.0, 0.35]) - u / 2, u, v))
        rects += _box([-1.0 + j(0.1), -0.2, 0.0], [0.8, 0.7, 0.75], 30.0 + j(10))
        return rects, np.array([0.0, 0.8, 0.7])
    if kind == "box":
        rects = [_rect([-4.0, -4.0, 0.0], [8.0, 0.0, 0.0], [0.0, 8.0, 0.0])]      # ground
        rects += _box([0.0, 0.0, 0.0], [1.6, 1.3, 1.2], 10.0 + j(10))
        rects += _box([1.2 + j(0.1), 1.3, 0.0], [0.6, 0.8, 0.5], -25.0 + j(10))
        rects += _box([-1.4, 0.9 + j(0.1), 0.0], [0.5, 0.5, 1.6], 40.0 + j(10))
        return rects, np.array([0.0, 0.0, 0.6])
    raise ValueError(f"unknown scene kind {kind!r} (expected 'planes' or 'box')")


def _look_at(center: np.ndarray, target: np.ndarray) -> np.ndarray:
    """cam_from_world rotation of a camera at ``center`` looking at ``target`` (world z up)."""
    fwd = target - center
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    return np.stack([right, down, fwd])


# ------------------------------------------------------------------------------------------------
# Texture and descriptors (deterministic functions of the 3D point)
# ------------------------------------------------------------------------------------------------

_CHUNK = 1 << 15


@dataclass(frozen=True)
class FourierField:
    """``sum_k amp_k * sin(freq_k . X + phase_k)`` for each of C channels: freq (C, K, 3), amp/phase (C, K).

    The phases are computed in float64 and the sines in float32 (an error of ~1e-4 at most).
    """

    freq: np.ndarray
    amp: np.ndarray
    phase: np.ndarray

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Evaluate at points (..., 3) -> (..., C) float32."""
        C, K = self.amp.shape
        shape = X.shape[:-1]
        pts = np.asarray(X, np.float64).reshape(-1, 3)
        freq, phase = self.freq.reshape(C * K, 3).T, self.phase.reshape(-1)
        amp = self.amp.astype(np.float32)
        out = np.empty((len(pts), C), np.float32)
        for i in range(0, len(pts), _CHUNK):
            arg = (pts[i:i + _CHUNK] @ freq + phase).astype(np.float32)
            out[i:i + _CHUNK] = np.einsum("nck,ck->nc", np.sin(arg).reshape(-1, C, K), amp)
        return out.reshape(*shape, C)


def _texture_field(rng: np.random.Generator, finest: float, coarsest: float,
                   channels: int = 3, per_channel: int = 32) -> FourierField:
    """Multi-octave (pink) Fourier noise with wavelengths log-uniform in [finest, coarsest]."""
    wl = np.exp(rng.uniform(math.log(finest), math.log(coarsest), (channels, per_channel)))
    dirs = rng.standard_normal((channels, per_channel, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    freq = dirs * (2 * math.pi / wl)[..., None]
    amp = wl ** 0.25
    amp /= np.sqrt((amp ** 2).sum(axis=1, keepdims=True) / 2)   # unit variance per channel
    return FourierField(freq, amp, rng.uniform(0, 2 * math.pi, (channels, per_channel)))


@dataclass(frozen=True)
class DescriptorField:
    """Ideal descriptors: L2-normalised random Fourier features of the 3D point.

    12 frequency vectors ``w_j`` give ``[cos(w_j . X + b_j), sin(w_j . X + b_j)] / sqrt(12)``: the norm
    is exactly 1 and ``d(X) . d(Y) = mean_j cos(w_j . (X - Y))`` depends on X - Y only. The frequencies
    are four randomly rotated orthonormal triads with wavelengths ``lambda * (1, 2, 4, 8)``: each triad
    makes the local metric isotropic, ``1 - d(X) . d(Y) ~ 2.18 |X - Y|^2 / lambda^2``, and the coarser
    triads suppress the near repeats of the finer ones (side lobes within ~3 lambda stay below ~0.65).
    Far away (tens of lambda) a point can still reach a similarity of ~0.85 by chance, so a surface
    must be sampled well within lambda / 4 for the nearest neighbour to be the right point.
    """

    freq: np.ndarray        # (12, 3)
    phase: np.ndarray       # (12,)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """(..., 3) float points -> (..., 24) float32 unit descriptors (phases in float64)."""
        arg = (np.asarray(X, np.float64) @ self.freq.T + self.phase).astype(np.float32)
        out = np.concatenate([np.cos(arg), np.sin(arg)], axis=-1)
        return out * np.float32(1.0 / math.sqrt(len(self.freq)))


def make_descriptor_field(rng: np.random.Generator, wavelength: float) -> DescriptorField:
    """A :class:`DescriptorField` whose finest wavelength is ``wavelength`` (world units)."""
    triads = [Rotation.random(random_state=rng).as_matrix() * (2 * math.pi / (wavelength * 2 ** k))
              for k in range(4)]
    freq = np.concatenate(triads)
    return DescriptorField(freq, rng.uniform(0, 2 * math.pi, len(freq)))


# ------------------------------------------------------------------------------------------------
# The scene
# ------------------------------------------------------------------------------------------------

@dataclass
class SyntheticScene:
    """Textured planar surfaces seen by known cameras. Build with :meth:`make`.

    Attributes:
        names: image names (relative paths, e.g. ``cam_000.png`` or ``seq1/cam_005.png``).
        image_size: (W, H) of every image.
        rotations, centers: per image cam_from_world rotation (3, 3) and camera centre (3,) in world.
        focals: per image focal length in pixels (fx = fy); principal point at the image centre.
        groups: per image intrinsics group (the subfolder index; 0 when flat). Images of one group
            share their intrinsics.
        camera_model: ``"PINHOLE"`` or ``"SIMPLE_RADIAL"`` (with k = 0).
        surfaces: the planar rectangles.
        scene_size: bounding-box diagonal of all camera centres and surface corners.
        footprint: typical size of a pixel on the surfaces (median depth / focal), in world units.
        texture, descriptors: the colour and descriptor fields of 3D points.
        seed: the seed everything was drawn from.
        orientations: EXIF orientation of the written file by name (absent: 1); see the module docstring.
    """

    names: List[str]
    image_size: Tuple[int, int]
    rotations: np.ndarray
    centers: np.ndarray
    focals: np.ndarray
    groups: np.ndarray
    camera_model: str
    surfaces: List[Rect]
    scene_size: float
    footprint: float
    texture: FourierField
    descriptors: DescriptorField
    seed: int
    kind: str = "planes"
    orientations: Dict[str, int] = field(default_factory=dict)
    _points: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def make(cls, num_cameras: int = 10, image_size: Tuple[int, int] = (640, 480), seed: int = 0,
             kind: str = "planes", camera_model: str = "PINHOLE", focal_factor: float = 1.1,
             subfolders: int = 0, arc_deg: Optional[float] = None, radius: Optional[float] = None,
             desc_wavelength_px: float = 16.0) -> "SyntheticScene":
        """Build a scene.

        Args:
            num_cameras: number of images.
            image_size: (W, H) in pixels.
            seed: seeds the small jitter of geometry and cameras, the texture and the descriptor field.
            kind: ``"planes"`` (ground, three walls, a tilted panel and a box; cameras on a frontal
                arc) or ``"box"`` (boxes on a ground plane under an empty sky; cameras on a full orbit).
            camera_model: ``"PINHOLE"`` or ``"SIMPLE_RADIAL"`` (k = 0).
            focal_factor: focal length in units of the image width.
            subfolders: 0 for flat names ``cam_000.png``; k > 0 splits the images into k contiguous
                folders ``seq0/``, ``seq1/``, ... with slightly different focal lengths per folder.
            arc_deg: angular extent of the camera arc (default 100 for planes, 360 for box).
            radius: horizontal camera distance to the look-at point (default 5.5 / 5.0).
            desc_wavelength_px: finest descriptor wavelength in typical pixel footprints.
        """
        if camera_model not in ("PINHOLE", "SIMPLE_RADIAL"):
            raise ValueError(f"camera_model must be PINHOLE or SIMPLE_RADIAL, got {camera_model!r}")
        if num_cameras < 2:
            raise ValueError("need at least two cameras")
        W, H = int(image_size[0]), int(image_size[1])
        rng = np.random.default_rng(seed)
        surfaces, target = _surfaces(kind, rng)
        full = kind == "box"
        arc = math.radians(arc_deg if arc_deg is not None else (360.0 if full else 100.0))
        radius = radius if radius is not None else (5.0 if full else 5.5)
        closed = abs(arc - 2 * math.pi) < 1e-9
        steps = np.arange(num_cameras) / (num_cameras if closed else num_cameras - 1)
        angles = -arc / 2 + arc * steps + (0.0 if not closed else rng.uniform(0, 2 * math.pi))
        rotations, centers = [], []
        for i, a in enumerate(angles):
            height = 2.2 + 0.35 * math.sin(2.3 * i + 0.5) + rng.uniform(-0.1, 0.1)
            r = radius * (1.0 + rng.uniform(-0.05, 0.05))
            # planes: arc in front of the scene (negative y); box: all around.
            c = target + np.array([r * math.sin(a), -r * math.cos(a), 0.0])
            c[2] = height
            look = target + rng.uniform(-0.15, 0.15, 3)
            rotations.append(_look_at(c, look))
            centers.append(c)
        rotations, centers = np.stack(rotations), np.stack(centers)

        if subfolders > 0:
            groups = (np.arange(num_cameras) * subfolders) // num_cameras
            names = [f"seq{g}/cam_{i:03d}.png" for i, g in enumerate(groups)]
        else:
            groups = np.zeros(num_cameras, np.int64)
            names = [f"cam_{i:03d}.png" for i in range(num_cameras)]
        focals = focal_factor * W * (1.0 + 0.06 * groups.astype(np.float64))

        corners = np.concatenate([s.corners for s in surfaces] + [centers])
        scene_size = float(np.linalg.norm(corners.max(0) - corners.min(0)))
        depth = np.median(np.einsum("nij,j->ni", rotations, target)[:, 2]
                          - np.einsum("nij,nj->ni", rotations, centers)[:, 2])
        footprint = float(depth / np.median(focals))
        texture = _texture_field(rng, finest=4.0 * footprint, coarsest=scene_size / 3.0)
        descriptors = make_descriptor_field(rng, desc_wavelength_px * footprint)
        return cls(names=names, image_size=(W, H), rotations=rotations, centers=centers,
                   focals=focals, groups=groups, camera_model=camera_model, surfaces=surfaces,
                   scene_size=scene_size, footprint=footprint, texture=texture,
                   descriptors=descriptors, seed=seed, kind=kind)

    # -- cameras -----------------------------------------------------------------------------------

    def index(self, name: str) -> int:
        """Index of an image name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown image {name!r}") from None

    def camera(self, name: str) -> pycolmap.Camera:
        """The pycolmap camera (COLMAP pixel convention) of an image; camera_id = group + 1."""
        i = self.index(name)
        W, H = self.image_size
        f = float(self.focals[i])
        params = [f, f, W / 2, H / 2] if self.camera_model == "PINHOLE" else [f, W / 2, H / 2, 0.0]
        return pycolmap.Camera(model=self.camera_model, width=W, height=H, params=params,
                               camera_id=int(self.groups[i]) + 1)

    def cam_from_world(self, name: str) -> pycolmap.Rigid3d:
        """True pose of an image."""
        i = self.index(name)
        R, C = self.rotations[i], self.centers[i]
        return pycolmap.Rigid3d(pycolmap.Rotation3d(R), -R @ C)

    def stored_size(self, name: str) -> Tuple[int, int]:
        """(W, H) of the stored pixels of an image's file (swapped for orientations 5..8)."""
        W, H = self.image_size
        return (H, W) if self.orientations.get(name, 1) in (5, 6, 7, 8) else (W, H)

    def stored_to_render(self, name: str, xy: np.ndarray) -> np.ndarray:
        """Map hloc pixels (N, 2) of the stored file of an image to the rendered (upright) frame."""
        return stored_to_upright(np.asarray(xy, np.float64).reshape(-1, 2), self.orientations.get(name, 1),
                                 self.stored_size(name))

    def stored_rotation(self, name: str) -> np.ndarray:
        """cam_from_world rotation (3, 3) of the camera of the stored pixels: the true rotation turned about
        the optical axis for orientations 3, 6 and 8 (mirrored orientations have no such camera)."""
        i = self.index(name)
        c = self.stored_to_render(name, np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        a = np.stack([c[1] - c[0], c[2] - c[0]], axis=1)   # d(render) / d(stored), orthogonal
        if np.linalg.det(a) < 0:
            raise ValueError(f"{name}: a mirrored orientation has no pinhole camera")
        q = np.eye(3)
        q[:2, :2] = a.T                                     # render camera frame -> stored camera frame
        return q @ self.rotations[i]

    def reconstruction(self, per_image_cameras: bool = False) -> pycolmap.Reconstruction:
        """Ground-truth reconstruction (no 3D points): image_id = index + 1, one camera per group
        (or per image with ``per_image_cameras``)."""
        rec = pycolmap.Reconstruction()
        for i, name in enumerate(self.names):
            cam = self.camera(name)
            if per_image_cameras:
                cam.camera_id = i + 1
            if not rec.exists_camera(cam.camera_id):
                rec.add_camera_with_trivial_rig(cam)
            image = pycolmap.Image(name=name, camera_id=cam.camera_id, image_id=i + 1)
            rec.add_image_with_trivial_frame(image, self.cam_from_world(name))
        return rec

    def true_model(self, names: Sequence[str], stride: int = 16,
                   groups: Optional[Sequence[Sequence[str]]] = None) -> pycolmap.Reconstruction:
        """A reference model with true 3D points: pixels on a grid of each image, observed by every image of
        the same group (default: all) that sees them; points2D in COLMAP's convention (hloc + 0.5)."""
        groups = groups or [list(names)]
        group_of = {n: g for g, members in enumerate(groups) for n in members}
        W, H = self.image_size
        ys, xs = np.mgrid[stride // 2:H:stride, stride // 2:W:stride]
        grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
        keypoints = {n: [] for n in names}
        tracks = []                                      # (xyz, [(name, point2D index)])
        for seed in names:
            X, valid, _ = self.cast(seed, grid)
            X = X[valid]
            seen = {}
            for other in names:
                if group_of[other] != group_of[seed]:
                    continue
                xy, vis = self.visible(other, X)
                seen[other] = (xy, vis)
            for k in range(len(X)):
                obs = [(n, xy[k]) for n, (xy, vis) in seen.items() if vis[k]]
                if len(obs) < 2:
                    continue
                els = []
                for n, xy in obs:
                    keypoints[n].append(xy + 0.5)
                    els.append((n, len(keypoints[n]) - 1))
                tracks.append((X[k], els))
        rec = pycolmap.Reconstruction()
        for name in names:
            cam = self.camera(name)
            if not rec.exists_camera(cam.camera_id):
                rec.add_camera_with_trivial_rig(cam)
            kps = np.asarray(keypoints[name], np.float64).reshape(-1, 2)
            image = pycolmap.Image(name=name, keypoints=kps, camera_id=cam.camera_id, image_id=self.index(name) + 1)
            rec.add_image_with_trivial_frame(image, self.cam_from_world(name))
        for xyz, els in tracks:
            track = pycolmap.Track()
            for n, idx in els:
                track.add_element(self.index(n) + 1, idx)
            rec.add_point3D(np.asarray(xyz, np.float64), track)
        return rec

    def project(self, name: str, X: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Project world points (N, 3) -> (xy (N, 2) in hloc pixels, depth z (N,)); no visibility test."""
        i = self.index(name)
        Xc = (np.asarray(X, np.float64).reshape(-1, 3) - self.centers[i]) @ self.rotations[i].T
        z = Xc[:, 2]
        W, H = self.image_size
        with np.errstate(divide="ignore", invalid="ignore"):
            xy = self.focals[i] * Xc[:, :2] / z[:, None] + np.array([W / 2, H / 2]) - 0.5
        return xy, z

    # -- ray casting -------------------------------------------------------------------------------

    def cast(self, name: str, xy: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cast rays through hloc pixel coordinates (N, 2) of an image.

        Returns:
            X (N, 3) the nearest surface point (NaN where none), valid (N,) bool, and the depth z (N,)
            of the hit in the camera frame (inf where none).
        """
        i = self.index(name)
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        W, H = self.image_size
        f = self.focals[i]
        d_cam = np.stack([(xy[:, 0] + 0.5 - W / 2) / f, (xy[:, 1] + 0.5 - H / 2) / f,
                          np.ones(len(xy))], axis=1)
        d = d_cam @ self.rotations[i]            # world directions whose camera z component is 1
        c = self.centers[i]
        o = np.stack([s.origin for s in self.surfaces])                    # (S, 3)
        u = np.stack([s.u for s in self.surfaces])
        v = np.stack([s.v for s in self.surfaces])
        n = np.cross(u, v)
        uu, vv = (u * u).sum(1), (v * v).sum(1)
        cn, cu, cv = ((c - o) * n).sum(1), ((c - o) * u).sum(1), ((c - o) * v).sum(1)
        best = np.full(len(xy), np.inf)
        for k in range(0, len(xy), _CHUNK):
            dk = d[k:k + _CHUNK]
            dn, du, dv = dk @ n.T, dk @ u.T, dk @ v.T                     # (N, S)
            with np.errstate(divide="ignore", invalid="ignore"):
                t = -cn / dn
            a = (cu + t * du) / uu
            b = (cv + t * dv) / vv
            hit = (np.abs(dn) > 1e-12) & (t > 1e-9) & (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)
            best[k:k + _CHUNK] = np.where(hit, t, np.inf).min(axis=1)
        valid = np.isfinite(best)
        X = np.where(valid[:, None], c + np.where(valid, best, 0.0)[:, None] * d, np.nan)
        return X, valid, best

    def points(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """3D point map (H, W, 3) seen at every pixel centre and its validity (H, W) (cached)."""
        if name not in self._points:
            W, H = self.image_size
            X, valid, _ = self.cast(name, pixel_grid(W, H).reshape(-1, 2))
            self._points[name] = (X.reshape(H, W, 3), valid.reshape(H, W))
        return self._points[name]

    def visible(self, name: str, X: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Project world points (N, 3) into an image: (xy (N, 2) hloc, visible (N,) bool).

        Visible = finite, in front of the camera, inside the image (hloc: -0.5 <= x <= W - 0.5) and
        not occluded (the ray through xy hits a surface at the point's depth).
        """
        X = np.asarray(X, np.float64).reshape(-1, 3)
        xy, z = self.project(name, X)
        W, H = self.image_size
        ok = np.isfinite(X).all(1) & (z > 1e-9)
        ok &= (xy[:, 0] >= -0.5) & (xy[:, 0] <= W - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= H - 0.5)
        _, hit, depth = self.cast(name, np.where(ok[:, None], xy, 0.0))
        tol = 1e-7 * self.scene_size
        ok &= hit & (np.abs(depth - z) <= tol + 1e-7 * np.abs(z))
        return xy, ok

    def true_correspondences(self, name0: str, name1: str,
                             xy0: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Where the 3D points seen at hloc pixels xy0 (N, 2) of image 0 appear in image 1.

        Returns (xy1 (N, 2) hloc pixels, valid (N,)): valid if xy0 sees a surface whose point is
        visible (in the image and not occluded) in image 1.
        """
        X, hit, _ = self.cast(name0, xy0)
        xy1, vis = self.visible(name1, np.where(hit[:, None], X, 0.0))
        return xy1, hit & vis

    def overlap(self, name0: str, name1: str, stride: int = 8) -> float:
        """Fraction of the valid pixels of image 0 (on a grid of the given stride) visible in image 1."""
        W, H = self.image_size
        X, valid, _ = self.cast(name0, pixel_grid(W, H)[::stride, ::stride].reshape(-1, 2))
        if not valid.any():
            return 0.0
        _, vis = self.visible(name1, X[valid])
        return float(vis.mean())

    # -- images ------------------------------------------------------------------------------------

    def colors(self, X: np.ndarray) -> np.ndarray:
        """Texture colour of world points (..., 3) -> (..., 3) uint8."""
        v = self.texture(X)
        return np.clip(np.round(255.0 * (0.5 + 0.5 * np.tanh(1.3 * v))), 0, 255).astype(np.uint8)

    def render(self, name: str) -> np.ndarray:
        """The image (H, W, 3) uint8: the surface texture, and a plain vertical sky gradient elsewhere."""
        X, valid = self.points(name)
        W, H = self.image_size
        rows = np.linspace(0.0, 1.0, H)[:, None, None]
        sky = np.broadcast_to(np.round(np.array([150, 185, 235]) * (1 - 0.25 * rows)), (H, W, 3))
        img = sky.astype(np.uint8).copy()
        img[valid] = self.colors(X[valid])
        return img

    def write_images(self, folder: str | os.PathLike) -> List[str]:
        """Write every image as PNG under ``folder`` (creating subfolders); return the names.

        An image with an orientation other than 1 is stored un-rotated, with the EXIF tag."""
        for name in self.names:
            path = os.path.join(os.fspath(folder), name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            rendered = self.render(name)
            orientation = self.orientations.get(name, 1)
            if orientation == 1:
                Image.fromarray(rendered).save(path)
                continue
            W, H = self.stored_size(name)
            uv = np.rint(self.stored_to_render(name, pixel_grid(W, H).reshape(-1, 2))).astype(np.int64)
            stored = rendered[uv[:, 1], uv[:, 0]].reshape(H, W, 3)
            exif = Image.Exif()
            exif[0x0112] = orientation
            Image.fromarray(stored).save(path, exif=exif)
        return list(self.names)

    def descriptor_field(self, X: np.ndarray) -> np.ndarray:
        """Ideal unit descriptors (..., 24) float32 of world points (..., 3)."""
        return self.descriptors(X)


def pixel_grid(W: int, H: int) -> np.ndarray:
    """(H, W, 2) float64 hloc coordinates (x, y) of the pixel centres."""
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    return np.stack([xs, ys], axis=-1)


def descriptor_field(scene: SyntheticScene, X: np.ndarray) -> np.ndarray:
    """Ideal unit descriptors (..., 24) of world points (..., 3) of a scene."""
    return scene.descriptors(X)


# ------------------------------------------------------------------------------------------------
# The oracle network
# ------------------------------------------------------------------------------------------------

class SyntheticNetwork:
    """The scene's oracle as a :class:`~mast3r_colmap.matching.dense.DenseNetwork`: with it, the
    :class:`~mast3r_colmap.matching.matcher.Matcher` loads, caches, batches, matches and refines
    exactly as it does with MASt3R.

    ``encode`` ignores the pixel values: each pixel of an image or crop is described by the 3D point X
    seen at the original-image position the matcher maps it to (its ``to_original``, so coarse images
    and coarse-to-fine crops follow the matcher's own geometry), as ``scene.descriptor_field(field_scale
    * X)`` with confidence ``conf_valid``. With the default ``field_scale = 1`` the finest descriptor
    wavelength is the scene's ``desc_wavelength_px`` original pixels (8 network pixels at half
    resolution). Pixels that see no surface get random unit descriptors (deterministic per image and
    window, independent between images) and ``conf_invalid``. With ``noise > 0`` Gaussian noise of that
    standard deviation per component (a unit descriptor's components have an RMS of 0.2) is added,
    deterministically, before re-normalising. ``decode`` stacks the encodings: a view's descriptors
    do not depend on the other view, nor on the order. ``encoded`` lists the keys encoded so far.

    ``pointmap`` gives what MASt3R's view 1 gives for an image paired with itself: the true point ``pts3d``
    seen by each pixel in the camera frame of the upright (rendered) image the network sees, with
    confidence ``conf`` = ``conf_valid``; pixels that see no surface get junk points (random, deterministic,
    some behind the camera) with ``conf_invalid``.
    """

    device = torch.device("cpu")

    def __init__(self, scene: SyntheticScene, conf_valid: float = 5.0, conf_invalid: float = 0.5,
                 noise: float = 0.0, field_scale: float = 1.0) -> None:
        self.scene = scene
        self.conf_valid = float(conf_valid)
        self.conf_invalid = float(conf_invalid)
        self.noise = float(noise)
        self.field_scale = float(field_scale)
        self.encoded: List[Key] = []

    def settings(self) -> Dict[str, Any]:
        """The oracle's parameters and a digest of the scene (its images, cameras and descriptor field)."""
        digest = hashlib.sha256("\n".join(self.scene.names).encode("utf-8"))
        for array in (self.scene.rotations, self.scene.centers, self.scene.focals, self.scene.descriptors.freq,
                      self.scene.descriptors.phase, np.asarray(self.scene.image_size)):
            digest.update(np.ascontiguousarray(array, np.float64).tobytes())
        if any(o != 1 for o in self.scene.orientations.values()):
            digest.update(repr(sorted(self.scene.orientations.items())).encode("utf-8"))
        return {"network": "synthetic", "scene": digest.hexdigest()[:16], "conf_valid": self.conf_valid,
                "conf_invalid": self.conf_invalid, "noise": self.noise, "field_scale": self.field_scale}

    def encode(self, images: torch.Tensor, keys: Sequence[Key],
               to_original: Sequence[Optional[PixelMap]]) -> List[Dict[str, torch.Tensor]]:
        """Per image ``{"desc": (H, W, 24), "desc_conf": (H, W)}`` float32 (see the class docstring)."""
        if any(m is None for m in to_original):
            raise ValueError("the synthetic network needs the map of every image to original pixels")
        height, width = images.shape[-2:]
        self.encoded.extend(keys)
        return [self.describe(name, window, to_map, (height, width))
                for (name, window), to_map in zip(keys, to_original)]

    def describe(self, name: str, window: Optional[Window], to_original: PixelMap,
                 shape: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """Dense descriptors of one (H, W) image or crop of ``name`` (``window``: None or the crop)."""
        H, W = shape
        stored = to_original(pixel_grid(W, H).reshape(-1, 2))   # the matcher's frame: the stored file
        X, valid, _ = self.scene.cast(name, self.scene.stored_to_render(name, stored))
        desc = np.empty((H * W, DESC_DIM), np.float32)
        desc[valid] = self.scene.descriptors(self.field_scale * X[valid])
        rng = np.random.default_rng([self.scene.seed, self.scene.index(name), 7919, *(window or ())])
        desc[~valid] = rng.standard_normal((int((~valid).sum()), DESC_DIM))
        if self.noise > 0:
            desc += self.noise * rng.standard_normal(desc.shape, dtype=np.float32)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        confidence = np.where(valid, self.conf_valid, self.conf_invalid).astype(np.float32)
        i = self.scene.index(name)
        pts = np.empty((H * W, 3), np.float64)
        pts[valid] = (X[valid] - self.scene.centers[i]) @ self.scene.rotations[i].T  # the camera frame
        junk = np.random.default_rng([self.scene.seed, i, 7927, *(window or ())])
        pts[~valid] = junk.normal(0.0, self.scene.scene_size, (int((~valid).sum()), 3))
        return {"desc": torch.from_numpy(desc.reshape(H, W, DESC_DIM)),
                "desc_conf": torch.from_numpy(confidence.reshape(H, W)),
                "pts3d": torch.from_numpy(pts.astype(np.float32).reshape(H, W, 3)),
                "conf": torch.from_numpy(confidence.reshape(H, W))}

    def decode(self, enc0: Sequence[Dict[str, torch.Tensor]], enc1: Sequence[Dict[str, torch.Tensor]],
               symmetric: bool = False) -> Tuple[Dict[str, torch.Tensor], ...]:
        """The encodings of each side stacked: ``(view0, view1)``, or ``(view0, view1, view1, view0)``."""
        view0 = {k: torch.stack([e[k] for e in enc0]) for k in ("desc", "desc_conf")}
        view1 = {k: torch.stack([e[k] for e in enc1]) for k in ("desc", "desc_conf")}
        return (view0, view1, view1, view0) if symmetric else (view0, view1)

    def pointmap(self, enc: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """``pts3d`` (B, H, W, 3) and ``conf`` (B, H, W) of the encoded images (see the class docstring)."""
        return {k: torch.stack([e[k] for e in enc]) for k in ("pts3d", "conf")}


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

def umeyama(src: np.ndarray, tgt: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``tgt ~ s * R @ src + t`` (Umeyama 1991): returns (s, R, t)."""
    src, tgt = np.asarray(src, np.float64), np.asarray(tgt, np.float64)
    mu_s, mu_t = src.mean(0), tgt.mean(0)
    a, b = src - mu_s, tgt - mu_t
    cov = b.T @ a / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1
    R = U @ D @ Vt
    var = (a ** 2).sum() / len(src)
    s = float(np.trace(np.diag(S) @ D) / var) if var > 0 else 1.0
    return s, R, mu_t - s * R @ mu_s


def rotation_median(rotations: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Geodesic L1 mean (median) of rotation matrices (N, 3, 3) by Weiszfeld steps in the tangent space.

    Unlike the chordal mean it ignores a minority of outliers: if most rotations agree exactly, the
    result is that rotation.
    """
    rots = Rotation.from_matrix(np.asarray(rotations, np.float64))
    mean = rots.mean()
    for _ in range(iterations):
        r = (mean.inv() * rots).as_rotvec()                      # rots = mean * exp(r)
        w = 1.0 / np.maximum(np.linalg.norm(r, axis=1), 1e-15)
        step = (w[:, None] * r).sum(0) / w.sum()
        mean = mean * Rotation.from_rotvec(step)
        if np.linalg.norm(step) < 1e-14:
            break
    return mean.as_matrix()


def pose_errors(reconstruction: pycolmap.Reconstruction, scene: SyntheticScene) -> dict:
    """Compare registered images of a reconstruction with the scene's true poses.

    Images are matched by name (a registered image the scene does not know raises ``KeyError``); at
    least 3 registered images are needed, otherwise all errors are NaN. Camera centres are aligned to
    the true ones with a least-squares similarity (Umeyama) and ``center_rel`` is the remaining
    distance. Rotations are compared after their own alignment, the geodesic median of
    ``R_est_i^T R_true_i`` (:func:`rotation_median`), which is robust and does not inherit the poor
    conditioning of a centre alignment (cameras on an arc barely constrain its tilt): one camera
    rotated by 1 degree shows an error of exactly 1 degree and the others 0. The true rotation of an
    image with an EXIF orientation is that of its stored pixels (:meth:`SyntheticScene.stored_rotation`).

    Returns a dict with ``rotation_deg`` and ``center_rel`` ({name: error}; the centre error is in
    units of ``scene.scene_size``), ``registered`` and ``unregistered`` (name lists in scene order),
    ``max_rotation_deg``, ``median_rotation_deg``, ``max_center_rel``, ``median_center_rel`` and
    ``sim3`` = (s, R, t) mapping reconstruction to scene coordinates (None if not aligned).
    """
    est: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for image in reconstruction.images.values():
        has_pose = image.has_pose() if callable(image.has_pose) else image.has_pose
        if not has_pose:
            continue
        scene.index(image.name)          # unknown names are an error
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        R = np.asarray(pose.rotation.matrix())
        est[image.name] = (R, -R.T @ np.asarray(pose.translation))
    registered = [n for n in scene.names if n in est]
    unregistered = [n for n in scene.names if n not in est]
    rot_err: Dict[str, float] = {}
    ctr_err: Dict[str, float] = {}
    sim3 = None
    if len(registered) >= 3:
        src = np.stack([est[n][1] for n in registered])
        tgt = np.stack([scene.centers[scene.index(n)] for n in registered])
        s, R, t = umeyama(src, tgt)
        sim3 = (s, R, t)
        # world_est_from_world_true rotation per image; cam_from_true = R_est @ A.
        A_i = np.stack([est[n][0].T @ scene.stored_rotation(n) for n in registered])
        A = rotation_median(A_i)
        for n, c_true, a_i in zip(registered, tgt, A_i):
            rot_err[n] = float(np.degrees(Rotation.from_matrix(A.T @ a_i).magnitude()))
            ctr_err[n] = float(np.linalg.norm(s * R @ est[n][1] + t - c_true) / scene.scene_size)
    else:
        rot_err = {n: float("nan") for n in registered}
        ctr_err = {n: float("nan") for n in registered}

    def stat(values: Dict[str, float], fn) -> float:
        return float(fn(list(values.values()))) if values else float("nan")

    return {
        "rotation_deg": rot_err,
        "center_rel": ctr_err,
        "registered": registered,
        "unregistered": unregistered,
        "max_rotation_deg": stat(rot_err, np.max),
        "median_rotation_deg": stat(rot_err, np.median),
        "max_center_rel": stat(ctr_err, np.max),
        "median_center_rel": stat(ctr_err, np.median),
        "sim3": sim3,
    }
