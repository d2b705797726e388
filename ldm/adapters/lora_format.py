"""Which LoRA file format a state dict is in: kohya (sd-scripts) or diffusers/peft; refuse the rest.

kohya: `lora_unet_*` / `lora_te*_*` modules with `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
diffusers/peft: `<component>.<module path>.lora_A.weight` / `.lora_B.weight`, peft's
`base_model.model.` prefix, and the older attention-processor names (`.to_q_lora.down.weight`,
`.lora.down.weight`, `.lora_linear_layer.down.weight`). LyCORIS LoHa / LoKr / Tucker and DoRA
change weights in other ways than `up @ down` and are refused by name, as are LyCORIS full
(`.diff`) files and textual-inversion embeddings (sent to --embedding).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ldm.adapters.lora_weights import LoraError
from ldm.checkpoint.file_kinds import embedding_key

KOHYA = "kohya"
DIFFUSERS = "diffusers"
FORMATS = (KOHYA, DIFFUSERS)

# key pattern -> what the file is (LyCORIS / DoRA naming)
_UNSUPPORTED = {
    r"\.hada_": "LoHa (LyCORIS Hadamard product, `hada_*` keys)",
    r"\.lokr_": "LoKr (LyCORIS Kronecker product, `lokr_w1`/`lokr_w2` keys)",
    r"\.lora_mid\.": "LoCon/LoRA with a Tucker core (LyCORIS `lora_mid` keys)",
    r"\.dora_scale": "DoRA (weight-decomposed LoRA, `dora_scale` keys)",
    r"\.lora_magnitude_vector": "DoRA (peft `lora_magnitude_vector` keys)",
    r"\.oft_": "OFT (orthogonal fine-tuning, `oft_*` keys)",
    r"\.diff(_b)?$": 'LyCORIS "full" (diff) weights (`.diff`/`.diff_b` keys)',
}
_DIFFUSERS_MARKS = (".lora_A.", ".lora_B.", "_lora.down.", "_lora.up.", ".lora.down.", ".lora.up.")
_DIFFUSERS_MARKS += (".lora_linear_layer.down.", ".lora_linear_layer.up.")


def refuse_unsupported(keys: Iterable[str], source: str) -> None:
    """LoraError naming the adapter kind when the file is LoHa / LoKr / Tucker / DoRA / OFT /
    LyCORIS full (diff)."""
    keys = list(keys)
    for mark, what in _UNSUPPORTED.items():
        hits = [k for k in keys if re.search(mark, k)]
        if hits:
            raise LoraError(
                f"{source} is a {what} file, e.g. `{hits[0]}`; only plain LoRA (up @ down) is "
                "supported. Use a plain LoRA, or merge this one into the checkpoint with the tool "
                "that trained it."
            )


def refuse_embedding(state: Mapping[str, Any] | Iterable[str], source: str) -> None:
    """LoraError sending a textual-inversion embedding given as a LoRA to --embedding."""
    key = embedding_key(state)
    if key is not None:
        raise LoraError(
            f"{source} is a textual-inversion embedding, not a LoRA (key `{key}`): pass it with "
            f"--embedding {source} (generate(embeddings=...))."
        )


def detect_format(keys: Mapping[str, Any] | Iterable[str], source: str) -> str:
    """'kohya' or 'diffusers' from the key names (a state dict: its keys); LoraError for anything
    else, naming an embedding or an unsupported adapter kind as such."""
    state = keys
    keys = list(keys)
    refuse_unsupported(keys, source)
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return KOHYA
    if any(any(m in k for m in _DIFFUSERS_MARKS) for k in keys):
        return DIFFUSERS
    refuse_embedding(state, source)
    sample = ", ".join(sorted(keys)[:5]) or "no tensors"
    raise LoraError(
        f"{source} is not a LoRA file we know: expected kohya keys (`lora_unet_*.lora_down.weight`, "
        f"`.lora_up.weight`, `.alpha`) or diffusers/peft keys (`unet.*.lora_A.weight`, "
        f"`.lora_B.weight`); found {sample}. Convert it with the tool that made it."
    )
