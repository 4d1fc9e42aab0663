"""Structure from motion on a prepared COLMAP database (pycolmap 4.x).

The database must hold verified two-view geometries with a real configuration (see
:func:`mast3r_colmap.export.colmap_db.verify_matches`); UNDEFINED ones are ignored by pycolmap 4.x.

* :func:`incremental`: ``pycolmap.incremental_mapping``; the largest model is written to ``output_dir``.
* :func:`global_mapping`: ``pycolmap.global_mapping`` (GLOMAP); the largest model is written likewise.
* :func:`triangulate`: points from known poses (``pycolmap.triangulate_points``) on a database made by
  :func:`database_from_reconstruction`, whose ids equal the reference model's.

Every mapper writes ``summary.json`` (see :func:`summary`) beside the model and logs it. Runs are seeded
(``pycolmap.set_random_seed`` and every ``random_seed`` option) so results are repeatable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from .export.colmap_db import open_database

__all__ = [
    "DEFAULT_SEED",
    "database_from_reconstruction",
    "global_",
    "global_mapping",
    "incremental",
    "summary",
    "triangulate",
    "write_summary",
]

logger = logging.getLogger(__name__)

#: Seed used when the caller gives none.
DEFAULT_SEED = 0
SUMMARY_FILE = "summary.json"
_MODEL_FILES = ("cameras.bin", "images.bin", "points3D.bin", "rigs.bin", "frames.bin")


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if k not in out:
            raise ValueError(f"unknown option {k!r}; known: {', '.join(sorted(out))}")
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out[k], Mapping) else v
    return out


def _set_seeds(d: dict[str, Any], seed: int) -> dict[str, Any]:
    """Set every ``random_seed`` in a (nested) options dict that the caller left at -1."""
    for k, v in d.items():
        if isinstance(v, dict):
            _set_seeds(v, seed)
        elif k == "random_seed" and v == -1:
            d[k] = seed
    return d


def _options(cls: type, options: Mapping[str, Any] | Any | None, defaults: Mapping[str, Any], seed: int) -> Any:
    if isinstance(options, cls):
        options = options.todict()
    merged = _merge(cls().todict(), defaults)
    merged = _merge(merged, dict(options or {}))
    return cls(_set_seeds(merged, seed))


def _images_present(db_path: str | os.PathLike, image_dir: str | os.PathLike | None) -> bool:
    """True if every image of the database exists under ``image_dir`` (needed for colours)."""
    if image_dir is None or not Path(image_dir).is_dir():
        return False
    with open_database(db_path) as db:
        names = [img.name for img in db.read_all_images()]
    return bool(names) and all((Path(image_dir) / n).is_file() for n in names)


def _image_path(image_dir: str | os.PathLike | None, fallback: Path) -> str:
    """pycolmap checks that the image folder exists even when it reads no image."""
    return str(image_dir) if image_dir is not None and Path(image_dir).is_dir() else str(fallback)


def _check_db(db_path: str | os.PathLike) -> None:
    if not Path(db_path).is_file():
        raise ValueError(f"database {str(db_path)!r} does not exist")


def _prepare_output(output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {str(out)!r}: {exc}") from exc
    return out


def _pick_largest(models: Mapping[int, pycolmap.Reconstruction], output_dir: Path,
                  kind: str) -> pycolmap.Reconstruction | None:
    if not models:
        logger.warning("%s mapping produced no model", kind)
        return None
    best_idx = max(models, key=lambda k: (models[k].num_reg_images(), models[k].num_points3D()))
    best = models[best_idx]
    logger.info("%s mapping: %d model(s); largest #%d with %d registered images", kind, len(models),
                best_idx, best.num_reg_images())
    for name in _MODEL_FILES:  # no stale files of an earlier run beside the new model
        (output_dir / name).unlink(missing_ok=True)
    best.write(str(output_dir))
    write_summary(best, output_dir)
    return best


def _seed(seed: int | None) -> int:
    seed = DEFAULT_SEED if seed is None else int(seed)
    pycolmap.set_random_seed(seed)
    return seed


# ----------------------------------------------------------------------------------------------
# mappers
# ----------------------------------------------------------------------------------------------


def incremental(
    db_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    options: Mapping[str, Any] | pycolmap.IncrementalPipelineOptions | None = None,
    seed: int | None = None,
) -> pycolmap.Reconstruction | None:
    """Incremental SfM (``pycolmap.incremental_mapping``).

    All models go to ``output_dir/models/<k>``; the largest (most registered images) is also written to
    ``output_dir`` itself with ``summary.json``, and returned (``None`` if nothing was reconstructed).
    ``options`` overrides ``IncrementalPipelineOptions``; colours are extracted only if every database
    image exists under ``image_dir``, unless ``extract_colors`` is given.
    """
    _check_db(db_path)
    out = _prepare_output(output_dir)
    seed = _seed(seed)
    defaults: dict[str, Any] = {"extract_colors": _images_present(db_path, image_dir)}
    opts = _options(pycolmap.IncrementalPipelineOptions, options, defaults, seed)
    models_dir = out / "models"
    if models_dir.exists():
        shutil.rmtree(models_dir)
    models_dir.mkdir()
    models = pycolmap.incremental_mapping(str(db_path), _image_path(image_dir, out), str(models_dir), options=opts)
    return _pick_largest(models, out, "incremental")


def global_mapping(
    db_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    options: Mapping[str, Any] | pycolmap.GlobalPipelineOptions | None = None,
    seed: int | None = None,
) -> pycolmap.Reconstruction | None:
    """Global SfM (GLOMAP, ``pycolmap.global_mapping``); output as in :func:`incremental`.

    GPU solvers are switched off unless pycolmap was built with CUDA. pycolmap has no colour switch
    here; without the image files pycolmap logs a warning per image and colours stay black.
    """
    _check_db(db_path)
    out = _prepare_output(output_dir)
    seed = _seed(seed)
    defaults: dict[str, Any] = {}
    if not pycolmap.has_cuda:
        defaults["mapper"] = {"global_positioning": {"use_gpu": False},
                              "bundle_adjustment": {"ceres": {"use_gpu": False}}}
    opts = _options(pycolmap.GlobalPipelineOptions, options, defaults, seed)
    # pycolmap needs an existing folder; without the images it warns per image and colours stay black.
    image_path = str(image_dir) if _images_present(db_path, image_dir) else str(out)
    models_dir = out / "models"
    if models_dir.exists():
        shutil.rmtree(models_dir)
    models_dir.mkdir()
    models = pycolmap.global_mapping(str(db_path), image_path, str(models_dir), options=opts)
    return _pick_largest(models, out, "global")


#: Short alias.
global_ = global_mapping


def database_from_reconstruction(
    reference: pycolmap.Reconstruction | str | os.PathLike, db_path: str | os.PathLike
) -> dict[str, int]:
    """Write the cameras, rigs, frames and images of ``reference`` into a database with the same ids.

    Keypoints and matches are then added with :mod:`mast3r_colmap.export.colmap_db` using the returned
    ``{name: image_id}``. Re-running on a database made this way is a no-op; a database whose images
    disagree with the reference (same id, other name or camera) raises :class:`ValueError`.
    """
    rec = _load_reference(reference)
    ids = {img.name: int(img_id) for img_id, img in rec.images.items()}
    with open_database(db_path) as db:
        stored = {int(img.image_id): img for img in db.read_all_images()}
        if stored:
            for img_id, img in rec.images.items():
                s = stored.get(int(img_id))
                if s is None or s.name != img.name or int(s.camera_id) != int(img.camera_id):
                    raise ValueError(f"database {str(db_path)!r} already holds images that do not match the "
                                     f"reference (image id {img_id}, {img.name!r})")
            extra = set(stored) - set(ids.values())
            if extra:
                logger.warning("database has %d images that are not in the reference", len(extra))
            return ids
        with pycolmap.DatabaseTransaction(db):
            for cam_id, cam in rec.cameras.items():
                db.write_camera(cam, use_camera_id=True)
            for rig in rec.rigs.values():
                db.write_rig(rig, use_rig_id=True)
            for frame in rec.frames.values():
                db.write_frame(frame, use_frame_id=True)
            for img_id, img in rec.images.items():
                db.write_image(pycolmap.Image(name=img.name, camera_id=img.camera_id, image_id=img_id),
                               use_image_id=True)
    logger.info("database_from_reconstruction: %d cameras, %d images written to %s",
                len(rec.cameras), len(ids), db_path)
    return ids


def _load_reference(reference: pycolmap.Reconstruction | str | os.PathLike) -> pycolmap.Reconstruction:
    if isinstance(reference, pycolmap.Reconstruction):
        return reference
    path = Path(reference)
    if not path.is_dir():
        raise ValueError(f"reference model {str(path)!r} is not a folder")
    return pycolmap.Reconstruction(str(path))


def triangulate(
    reference: pycolmap.Reconstruction | str | os.PathLike,
    db_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    options: Mapping[str, Any] | pycolmap.IncrementalPipelineOptions | None = None,
    refine_intrinsics: bool = False,
    seed: int | None = None,
) -> pycolmap.Reconstruction:
    """Triangulate points with the known poses of ``reference`` (``pycolmap.triangulate_points``).

    The database must come from :func:`database_from_reconstruction` (same image ids and names) and hold
    verified two-view geometries. Existing 3D points of the reference are dropped. The model and
    ``summary.json`` are written to ``output_dir``.
    """
    _check_db(db_path)
    rec = pycolmap.Reconstruction(_load_reference(reference))  # never modify the caller's model
    with open_database(db_path) as db:
        for img_id, img in rec.images.items():
            if not db.exists_image(int(img_id)) or db.read_image(int(img_id)).name != img.name:
                raise ValueError(f"database {str(db_path)!r} does not match the reference: image id {img_id} "
                                 f"({img.name!r}); build it with database_from_reconstruction")
        if db.num_verified_image_pairs() == 0:
            logger.warning("database %s has no verified two-view geometries: nothing to triangulate", db_path)
    out = _prepare_output(output_dir)
    seed = _seed(seed)
    defaults: dict[str, Any] = {"extract_colors": _images_present(db_path, image_dir)}
    opts = _options(pycolmap.IncrementalPipelineOptions, options, defaults, seed)
    for name in _MODEL_FILES:
        (out / name).unlink(missing_ok=True)
    result = pycolmap.triangulate_points(rec, str(db_path), _image_path(image_dir, out), str(out), clear_points=True,
                                         options=opts, refine_intrinsics=refine_intrinsics)
    result.write(str(out))
    write_summary(result, out)
    return result


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------


def summary(reconstruction: pycolmap.Reconstruction) -> dict[str, Any]:
    """Headline numbers of a model (plain JSON-able values)."""
    rec = reconstruction
    track_lengths = [p.track.length() for p in rec.points3D.values()]
    return {
        "num_images": int(rec.num_images()),
        "num_registered_images": int(rec.num_reg_images()),
        "num_cameras": int(rec.num_cameras()),
        "num_points3D": int(rec.num_points3D()),
        "num_observations": int(sum(track_lengths)),
        "mean_track_length": float(np.mean(track_lengths)) if track_lengths else 0.0,
        "mean_reprojection_error": float(rec.compute_mean_reprojection_error()) if track_lengths else 0.0,
    }


def write_summary(reconstruction: pycolmap.Reconstruction, output_dir: str | os.PathLike) -> Path:
    """Write :func:`summary` to ``output_dir/summary.json``, log it and return the path."""
    s = summary(reconstruction)
    path = Path(output_dir) / SUMMARY_FILE
    path.write_text(json.dumps(s, indent=2) + "\n")
    logger.info("model %s: %d/%d images registered, %d points, track length %.2f, reprojection error %.3f px",
                output_dir, s["num_registered_images"], s["num_images"], s["num_points3D"],
                s["mean_track_length"], s["mean_reprojection_error"])
    return path
