"""Command lines that call the library: sampling (txt2img / img2img / inpaint) with PNG metadata,
and checkpoint conversion. ``main.py`` (training) parses its own flags (``ldm.launch_cli``)."""
