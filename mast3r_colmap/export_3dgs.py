"""Hand a model to Gaussian Splatting: COLMAP's undistorted layout, as 3DGS trainers read it.

    python -m mast3r_colmap.export_3dgs MODEL_DIR IMAGES DIR [--overwrite]
    mast3r-colmap IMAGES DATABASE --export-3dgs DIR      (after the mapping of a run)

:func:`export_3dgs` writes::

    DIR/images/<name>                        every registered image, undistorted (subfolders kept)
    DIR/sparse/0/{cameras,images,points3D,rigs,frames}.bin
    DIR/mast3r-colmap.json                   marks the folder as ours (see below)

the layout of COLMAP's ``image_undistorter`` after graphdeco-inria's ``convert.py``, read by
``train.py -s DIR`` of the reference 3DGS code, gsplat's ``simple_trainer.py --data_dir DIR`` and other
trainers. The work is ``pycolmap.undistort_images``; then:

* cameras: all PINHOLE (``fx fy cx cy``). The undistorter turns every model into PINHOLE, except that it
  keeps SIMPLE_PINHOLE, which is rewritten as the same PINHOLE. Image sizes change with undistortion
  (``UndistortCameraOptions``: by default the largest image without blank pixels); each written image
  has its camera's size, and the 2D points of the model are undistorted with it.
* pixel frame: cameras and keypoints are in the frame of the *stored* pixels, as COLMAP reads them (the
  EXIF orientation is ignored, see :mod:`mast3r_colmap.images`), and so is the undistortion. COLMAP
  copies the EXIF orientation tag into its output; it is removed here (JPEG re-encoded with the same
  quantisation tables), so that every reader, EXIF-aware or not, sees the pixels the cameras describe.
* COLMAP's multi-view-stereo extras (``stereo/``, ``run-colmap-*.sh``) are not kept.

Output folder (never half written, never someone else's files): everything is written into a scratch
folder beside ``DIR`` (in its parent) and renamed into place on success. A folder that is empty or
missing is used; one holding a previous export of ours (its ``mast3r-colmap.json`` lists everything in
it) is replaced only with ``overwrite``; any other non-empty folder is refused, with or without
``overwrite``. ``DIR`` may not hold the model or the image folder, nor lie inside the image folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Optional

import pycolmap
from PIL import Image

from . import __version__, cli
from .mapping import MARKER_FILE, _scratch, load_reference
from .options import build as build_options
from .options import parse_option_args
from .utils import atomic_replace, check_writable, colmap_log_to_python, missing_folders, remove_empty

__all__ = ["EXPORT_KIND", "build_parser", "check_output", "export_3dgs", "main"]

logger = logging.getLogger(__name__)

#: ``export`` of the marker of a 3DGS export folder.
EXPORT_KIND = "3dgs"
_LAYOUT = ("images", "sparse")  # what the marker lists
_ORIENTATION = 0x0112  # EXIF orientation tag


def _is_inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it (both resolved)."""
    return path == folder or folder in path.parents


def _previous_export(out: Path) -> bool:
    """``out`` holds a 3DGS export of ours and nothing else (its marker lists every entry)."""
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(marker, dict) and marker.get("tool") == "mast3r-colmap" and marker.get("export") == EXPORT_KIND):
        return False
    ours = {str(n) for n in marker.get("files", [])} | {MARKER_FILE}
    return {p.name for p in out.iterdir()} <= ours


def check_output(output_dir: str | os.PathLike, *, overwrite: bool = False,
                 model_dir: Optional[str | os.PathLike] = None,
                 image_dir: Optional[str | os.PathLike] = None) -> None:
    """Raise ValueError if :func:`export_3dgs` may not write ``output_dir`` (see the module docstring): a
    file, a non-empty folder that is not an export of ours, an export of ours without ``overwrite``, a
    folder holding ``model_dir`` or ``image_dir`` or inside ``image_dir``, a parent that is not writable."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"3DGS export folder {str(out)!r} is a file")
    target = out.resolve()
    for path, what in ((model_dir, "model"), (image_dir, "image folder")):
        if path is not None and _is_inside(Path(path).resolve(), target):
            raise ValueError(f"3DGS export folder {str(out)!r} holds the {what} {os.fspath(path)!r}: choose "
                             "another folder")
    if image_dir is not None and _is_inside(target, Path(image_dir).resolve()):
        raise ValueError(f"3DGS export folder {str(out)!r} is inside the image folder {os.fspath(image_dir)!r} "
                         "(a later run would take its images as input): choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not _previous_export(out):
            raise ValueError(f"3DGS export folder {str(out)!r} is not empty and not an export of mast3r-colmap "
                             f"(no {MARKER_FILE} lists all of it); it is never overwritten: choose another "
                             "folder or move it away")
        if not overwrite:
            raise ValueError(f"3DGS export folder {str(out)!r} already holds an export; replace it with "
                             "overwrite=True (--overwrite) or choose another folder")
    check_writable(Path(os.path.abspath(out)).parent, "folder of the 3DGS export", create=False)


def _registered_names(rec: pycolmap.Reconstruction) -> List[str]:
    return sorted(rec.images[i].name for i in rec.reg_image_ids())


def _check_images(names: List[str], image_dir: Path) -> None:
    if not image_dir.is_dir():
        raise ValueError(f"image folder {str(image_dir)!r} does not exist or is not a folder")
    missing = [n for n in names if not (image_dir / n).is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{len(missing)} image(s) of the model are not in {str(image_dir)!r}: "
                         f"{', '.join(repr(n) for n in missing[:5])}{more}")


def _to_pinhole(rec: pycolmap.Reconstruction) -> None:
    """SIMPLE_PINHOLE cameras become the same PINHOLE; any other model left is an error."""
    for cam in rec.cameras.values():
        if cam.model == pycolmap.CameraModelId.SIMPLE_PINHOLE:
            f, cx, cy = cam.params
            cam.model = pycolmap.CameraModelId.PINHOLE
            cam.params = [f, f, cx, cy]
        elif cam.model != pycolmap.CameraModelId.PINHOLE:
            raise RuntimeError(f"undistortion left camera {cam.camera_id} as {cam.model.name}")


def _drop_orientation(path: Path) -> bool:
    """Remove the EXIF orientation tag of an image file (pixels kept; JPEG with its own tables)."""
    with Image.open(path) as im:
        exif = im.getexif()
        if exif.get(_ORIENTATION, 1) == 1:
            return False
        del exif[_ORIENTATION]
        kwargs: dict[str, Any] = {"exif": exif.tobytes()}
        if im.format == "JPEG":
            kwargs.update(quality="keep", subsampling="keep")
        if im.info.get("icc_profile"):
            kwargs["icc_profile"] = im.info["icc_profile"]
        with atomic_replace(path) as tmp:
            im.save(tmp, format=im.format, **kwargs)
    return True


def _finish(tmp_out: Path, rec_in: pycolmap.Reconstruction) -> dict[str, Any]:
    """Turn the undistorter's output in ``tmp_out`` into the 3DGS layout; check it; return the counts."""
    for extra in ("stereo", "run-colmap-geometric.sh", "run-colmap-photometric.sh"):
        path = tmp_out / extra
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    rec = pycolmap.Reconstruction(str(tmp_out / "sparse"))
    _to_pinhole(rec)
    shutil.rmtree(tmp_out / "sparse")
    (tmp_out / "sparse" / "0").mkdir(parents=True)
    rec.write(str(tmp_out / "sparse" / "0"))
    names = _registered_names(rec)
    unreadable = [n for n in _registered_names(rec_in) if not (tmp_out / "images" / n).is_file()]
    if unreadable:
        raise ValueError(f"COLMAP could not undistort {len(unreadable)} image(s) (unreadable files?): "
                         f"{', '.join(repr(n) for n in unreadable[:5])}")
    rotated = 0
    for img_id in rec.reg_image_ids():
        image = rec.images[img_id]
        cam = rec.cameras[image.camera_id]
        path = tmp_out / "images" / image.name
        rotated += _drop_orientation(path)
        with Image.open(path) as im:
            if im.size != (cam.width, cam.height):
                raise RuntimeError(f"undistorted {image.name} is {im.size[0]}x{im.size[1]}, its camera "
                                   f"{cam.width}x{cam.height}")
    if rotated:
        logger.info("3DGS export: EXIF orientation tag removed from %d image(s) (pixels stay as stored, as the "
                    "cameras describe them)", rotated)
    return {"num_images": len(names), "num_cameras": int(rec.num_cameras()),
            "num_points3D": int(rec.num_points3D())}


def export_3dgs(
    model_dir: str | os.PathLike | pycolmap.Reconstruction,
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    undistort_options: Mapping[str, Any] | pycolmap.UndistortCameraOptions | None = None,
) -> Path:
    """Write ``model_dir`` (a COLMAP model folder, ``.bin`` or ``.txt``, or a Reconstruction) with the
    pictures of ``image_dir``, undistorted, into ``output_dir`` in the 3DGS layout (``images/`` +
    ``sparse/0/``, PINHOLE cameras): see the module docstring. Returns ``output_dir``.

    ``undistort_options`` override ``pycolmap.UndistortCameraOptions`` (e.g. ``max_image_size``,
    ``blank_pixels``). Raises ValueError for bad input: a missing or unreadable model, one without
    registered images, images missing from ``image_dir``, an output folder :func:`check_output` refuses.
    """
    rec = load_reference(model_dir)
    given = None if isinstance(model_dir, pycolmap.Reconstruction) else Path(model_dir)
    label = "(in memory)" if given is None else repr(str(given))
    if rec.num_reg_images() == 0:
        raise ValueError(f"model {label} has no registered images: nothing to export")
    image_dir, out = Path(image_dir), Path(output_dir)
    _check_images(_registered_names(rec), image_dir)
    check_output(out, overwrite=overwrite, model_dir=given, image_dir=image_dir)
    options = build_options(pycolmap.UndistortCameraOptions, undistort_options)

    target = Path(os.path.abspath(out))  # "." or ".." as DIR: the scratch goes into the real parent
    created = missing_folders(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        with _scratch(target.parent) as tmp:
            model_path = given
            if model_path is None:
                model_path = tmp / "model"
                model_path.mkdir()
                rec.write(str(model_path))
            logger.info("3DGS export: undistorting %d images of model %s into %s", rec.num_reg_images(), label, out)
            with colmap_log_to_python(tmp):
                pycolmap.undistort_images(str(tmp / "export"), str(model_path), str(image_dir),
                                          output_type="COLMAP", undistort_options=options)
            counts = _finish(tmp / "export", rec)
            marker = {"tool": "mast3r-colmap", "version": __version__, "export": EXPORT_KIND,
                      "files": list(_LAYOUT), "model": None if given is None else str(given.absolute()),
                      "images": str(image_dir.absolute()), **counts,
                      "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (tmp / "export" / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():  # empty, or an export of ours (checked above): moved aside, removed with tmp
                os.replace(target, tmp / "previous")
            os.replace(tmp / "export", target)
    except BaseException:
        remove_empty(created)
        raise
    logger.info("3DGS export: %d images, %d PINHOLE camera(s), %d points written to %s (%.1f s)",
                counts["num_images"], counts["num_cameras"], counts["num_points3D"], out, time.monotonic() - start)
    return out


# ---- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m mast3r_colmap.export_3dgs",
                       "Undistort a COLMAP model and its images into the layout Gaussian Splatting trainers "
                       "read: DIR/images/ + DIR/sparse/0/ with PINHOLE cameras.")
    p.add_argument("model", type=Path, metavar="MODEL_DIR",
                   help="COLMAP model folder (cameras, images, points3D as .bin or .txt)")
    p.add_argument("images", type=Path, metavar="IMAGES", help="image folder the model's image names are relative to")
    p.add_argument("output", type=Path, metavar="DIR",
                   help="3DGS folder to write (missing or empty, or an earlier export with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of this tool in DIR")
    p.add_argument("--undistort-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="pycolmap.UndistortCameraOptions, e.g. max_image_size=1600, or blank_pixels=1.0 "
                        "to keep every original pixel (black borders)")
    cli.add_logging_arguments(p)
    return p


def _run(args: argparse.Namespace) -> int:
    options = parse_option_args(args.undistort_options, pycolmap.UndistortCameraOptions)
    out = Path(os.path.abspath(args.output))  # also when DIR is the current folder (it is replaced)
    export_3dgs(args.model, args.images, out, overwrite=args.overwrite, undistort_options=options)
    marker = json.loads((out / MARKER_FILE).read_text())
    print(json.dumps({"output": str(out), **{k: marker[k] for k in ("num_images", "num_cameras", "num_points3D")}},
                     indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m mast3r_colmap.export_3dgs MODEL IMAGES DIR``: bad input exits with 2."""
    return cli.main(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
