"""``python -m ldm fit|validate|test --config FILE``: the LightningCLI-style front door
(``ldm.lightning_cli``); ``main.py`` takes the CompVis flags for the same runs. Errors are
reported as by the other commands (``ldm.errors``): exit 2 for usage, 1 for failures."""

from __future__ import annotations

import sys

from ldm.errors import exit_code, report
from ldm.malloc_policy import retain_freed_memory


def main() -> int:
    from ldm.lightning_cli import main as cli_main

    try:
        return cli_main()
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise  # a bug of ours: the traceback is wanted
        return report("python -m ldm", err, code)


if __name__ == "__main__":
    retain_freed_memory()
    sys.exit(main())
