"""Make the README's pictures (docs/images/matches.png, docs/images/model.png) on the synthetic scene.

    python docs/pictures.py [--workdir DIR] [--out docs/images]

The scene of the end-to-end tests (:mod:`mast3r_colmap.testing.synthetic`: textured planes seen by 8
known cameras) stands in for photos, and its oracle stands in for the MASt3R network inside the
production :class:`~mast3r_colmap.matching.matcher.Matcher`; :func:`~mast3r_colmap.pipeline.reconstruct`
then writes the database and the model as ``mast3r-colmap`` does. (The test checkpoints' untrained
weights would give meaningless matches.) The pictures are drawn by the commands shown in the README, run
in the run's folder::

    python -m mast3r_colmap.visualize matches database.db cam_002.png cam_003.png --images images -o matches.png
    python -m mast3r_colmap.visualize model sparse --images images -o model.png

at 1200 pixels wide, then stored as 256-colour palette PNGs to keep the repository small (the scene's
noise textures compress badly). About a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import mast3r_colmap  # noqa: F401  (first: Pillow before pycolmap)
from PIL import Image

from mast3r_colmap import visualize
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.pipeline import PipelineConfig, reconstruct
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene
from mast3r_colmap.utils import atomic_replace

HERE = Path(__file__).resolve().parent
PAIR = ("cam_002.png", "cam_003.png")
WIDTH = 1200  # pixels


def make_run(root: Path) -> dict:
    """Images (``images/``), database (``database.db``) and model (``sparse/``) of the synthetic scene."""
    scene = SyntheticScene.make(num_cameras=8, image_size=(640, 480), seed=0, kind="planes")
    scene.write_images(root / "images")
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=320), image_dir=root / "images")
    config = PipelineConfig(pairs="sequential:3", camera_model="PINHOLE", progress=False)
    return reconstruct(root / "images", root / "database.db", matcher, config, output_dir=root / "sparse")


def to_palette(path: Path) -> None:
    """Rewrite a PNG with a 256-colour palette (octree: rare colours such as the red marks survive)."""
    with Image.open(path) as img:
        palette = img.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    with atomic_replace(path) as tmp:
        palette.save(tmp, format="PNG", optimize=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=HERE / "images", help="folder of the pictures")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.out.resolve()
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        logging.info("synthetic run: %s", make_run(root))
        os.chdir(root)  # the commands as a user types them in the run's folder
        try:
            codes = [visualize.main(["matches", "database.db", *PAIR, "--images", "images", "--width", WIDTH,
                                     "-o", out / "matches.png"]),
                     visualize.main(["model", "sparse", "--images", "images", "--width", WIDTH,
                                     "-o", out / "model.png"])]
        finally:
            os.chdir(cwd)
    if any(codes):
        return max(codes)
    for name in ("matches.png", "model.png"):
        to_palette(out / name)
        logging.info("%s: %.0f KB", out / name, (out / name).stat().st_size / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
