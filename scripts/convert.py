"""Convert checkpoints: SD/ours <-> diffusers folder, prune/EMA/fp16; see `python scripts/convert.py --help`."""

import sys

from ldm.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
