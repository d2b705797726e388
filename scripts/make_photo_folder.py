"""Write a folder of mixed-aspect photos with captions (scikit-image's bundled photographs).

    python scripts/make_photo_folder.py data/photos
    python main.py --base configs/txt2img.yaml configs/data/image-folder.yaml -t \
        data.params.train.params.root=data/photos
"""

from __future__ import annotations

import argparse
import logging

from ldm.data.photo_folder import write_photo_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("out", help="the folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="crop positions and sizes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_photo_folder(args.out, seed=args.seed)
    logging.info("%d images with captions in %s", len(paths), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
