"""``python -m ldm fit|validate|test --config FILE``: the LightningCLI-style front door
(``ldm.lightning_cli``); ``main.py`` takes the CompVis flags for the same runs."""

from __future__ import annotations

import logging
import sys

from ldm.util import ConfigError


def main() -> int:
    from ldm.lightning_cli import main as cli_main

    try:
        return cli_main()
    except ConfigError as err:
        logging.getLogger("ldm").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
