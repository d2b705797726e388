"""Data: the CompVis data module, image folders with captions, shards, the embedded shapes set."""
