"""Train from CompVis-style YAML configs: ``python main.py --base CONFIG.yaml -t`` (see --help).

The names CompVis configs use as targets resolve here too: ``main.DataModuleFromConfig``,
``main.ImageLogger``, ``main.SetupCallback``, ``main.CUDACallback``, ``main.WrappedDataset``.
"""

from __future__ import annotations

import sys

from ldm.callbacks import CUDACallback, ImageLogger, SetupCallback
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset
from ldm.launch import get_parser, main

__all__ = [
    "CUDACallback",
    "DataModuleFromConfig",
    "ImageLogger",
    "SetupCallback",
    "WrappedDataset",
    "get_parser",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
