"""``python -m ldm.ui``: serve the web interface (see ``ldm.ui.cli``)."""

import sys

from ldm.ui.cli import main

sys.exit(main())
