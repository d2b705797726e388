"""img2img from a checkpoint with the CompVis flags; see `python scripts/img2img.py --help`."""

import sys

from ldm.commands.sample import main

if __name__ == "__main__":
    sys.exit(main("img2img"))
