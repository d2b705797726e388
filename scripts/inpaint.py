"""inpaint from a checkpoint with the CompVis flags; see `python scripts/inpaint.py --help`."""

import sys

from ldm.commands.sample import main
from ldm.malloc_policy import retain_freed_memory

if __name__ == "__main__":
    retain_freed_memory()
    sys.exit(main("inpaint"))
