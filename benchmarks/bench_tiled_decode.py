"""Peak memory and time of the SD VAE decoder, untiled vs exact tiled (strips), per image size.

    python benchmarks/bench_tiled_decode.py [--tiled 128,256] [--full 64,96,128] [--out table.md]
    python benchmarks/bench_tiled_decode.py --results runs.jsonl --estimate 256   # tabulate only

The model: the KL-f8 autoencoder of configs/stable-diffusion/v1-inference.yaml (ch 128, ch_mult
1 2 4 4, 2 ResNet blocks per level, mid-block attention), random weights, float32, batch 1, on
the CPU. Each (size, mode) runs in a fresh subprocess: build the autoencoder, then
``decode(z)`` for a latent [1, 4, L, L] (image 8L x 8L). Reported: peak resident memory of that
process (ru_maxrss), its increase over the resident memory after building (what decoding
added), and the decode time. Where both modes ran at a size, the images are compared (max abs
difference). Untiled sizes too big for the machine are not run: the table extrapolates them from
the largest untiled size measured (activation memory grows with the pixel count, L^2), marked
"estimate".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_unet import SD_V1_DDCONFIG as DDCONFIG  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(size: int, mode: str, out: str) -> None:
    """Build, decode once, print a JSON line with the numbers; save the image to ``out``."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.autoencoder_tiled import tiled_decoding

    torch.manual_seed(0)
    ae = AutoencoderKL(DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4).eval()
    z = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "tiled":
            with tiled_decoding(ae.decoder):
                x = ae.decode(z)
        else:
            x = ae.decode(z)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    torch.save(x, out)
    row = {"size": size, "mode": mode, "base_mb": base, "peak_mb": peak, "s": seconds, "image": out}
    print(json.dumps(row))


def run(size: int, mode: str, tmp: Path) -> dict:
    out = tmp / f"{mode}-{size}.pt"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(size), mode, str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{mode} {size}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiled", default="128,256", help="latent sizes decoded tiled")
    p.add_argument("--full", default="64,96,128", help="latent sizes decoded untiled")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument(
        "--results",
        default=None,
        help="JSON lines of runs made before (the lines this script prints, or "
        "`--child SIZE MODE IMAGE.pt` runs): tabulate those instead of running",
    )
    p.add_argument(
        "--estimate",
        default="",
        help="latent sizes to extrapolate (both modes) from the largest measured, by L^2",
    )
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.child[2])
        return
    rows: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.results:
            for line in Path(args.results).read_text().splitlines():
                if line.strip().startswith("{"):
                    row = json.loads(line)
                    rows[row["size"], row["mode"]] = row
        else:
            for size in sorted({int(s) for s in (args.tiled + "," + args.full).split(",") if s}):
                for mode in ("full", "tiled"):
                    if str(size) in (args.full if mode == "full" else args.tiled).split(","):
                        rows[size, mode] = run(size, mode, Path(tmp))
                        print(json.dumps(rows[size, mode]))
        tiled = sorted(s for s, m in rows if m == "tiled")
        full = sorted(s for s, m in rows if m == "full")
        both = [
            s for s in tiled if s in full and all("image" in rows[s, m] for m in ("full", "tiled"))
        ]
        diffs = {
            size: (
                torch.load(rows[size, "full"]["image"]) - torch.load(rows[size, "tiled"]["image"])
            )
            .abs()
            .max()
            .item()
            for size in both
        }
    largest = max(full) if full else None
    largest_tiled = max(tiled) if tiled else None
    estimate = {int(e) for e in args.estimate.split(",") if e}
    lines = [
        f"SD VAE decoder (KL-f8), random weights, fp32, batch 1, CPU, {torch.get_num_threads()} "
        "threads; peak RSS of a fresh process, added = peak minus RSS after building.",
        "",
        "| image | untiled peak / added (MiB) | untiled s | tiled peak / added (MiB) | tiled s "
        "| added: tiled / untiled | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size in sorted(set(tiled) | set(full) | estimate):
        f, t = rows.get((size, "full")), rows.get((size, "tiled"))
        if f:
            f_added = f["peak_mb"] - f["base_mb"]
            f_txt, f_s = f"{f['peak_mb']:.0f} / {f_added:.0f}", f"{f['s']:.1f}"
        elif largest:
            ref = rows[largest, "full"]
            f_added = (ref["peak_mb"] - ref["base_mb"]) * (size / largest) ** 2
            f_txt = f"{ref['base_mb'] + f_added:.0f} / {f_added:.0f} (estimate)"
            f_s = "-"
        else:
            f_added, f_txt, f_s = None, "-", "-"
        t_txt, t_s, ratio, t_added = "-", "-", "-", None
        if t:
            t_added = t["peak_mb"] - t["base_mb"]
            t_txt, t_s = f"{t['peak_mb']:.0f} / {t_added:.0f}", f"{t['s']:.1f}"
        elif size in estimate and largest_tiled:
            ref = rows[largest_tiled, "tiled"]
            t_added = (ref["peak_mb"] - ref["base_mb"]) * (size / largest_tiled) ** 2
            t_txt = f"{ref['base_mb'] + t_added:.0f} / {t_added:.0f} (estimate)"
        if t_added and f_added:
            ratio = f"{t_added / f_added:.2f}"
        diff = f"{diffs[size]:.1e}" if size in diffs else "-"
        lines.append(
            f"| {8 * size}x{8 * size} | {f_txt} | {f_s} | {t_txt} | {t_s} | {ratio} | {diff} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
