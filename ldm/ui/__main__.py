"""``python -m ldm.ui``: serve the web interface (see ``ldm.ui.cli``)."""

import sys

from ldm.malloc_policy import retain_freed_memory
from ldm.ui.cli import main

retain_freed_memory()
sys.exit(main())
