"""Mutation testing of the core with mutmut 3, one module at a time (docs/mutation.md).

    python scripts/mutation.py --list
    python scripts/mutation.py --module ema            # mutate, test, print the score
    python scripts/mutation.py --module ema --show     # and the diff of every survivor
    python scripts/mutation.py --all                   # every module, small ones first

Each module runs in its own folder ``.mutation/<module>/`` (ignored by git): links to ``ldm`` and
``tests``, and a ``pyproject.toml`` with the module's ``[tool.mutmut]`` section (only its files
mutated, only the test files that exercise it run). mutmut copies the project into
``.mutation/<module>/mutants/`` and keeps its results there, so a second run only re-tests what
changed; ``--fresh`` starts over. Lines that raise, log or warn are not mutated: their text is for
people, and the errors' wording is tested where it matters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"

#: module -> (files mutated, test files run). Small ones first (the order of --all).
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "ema": (
        ["ldm/ema.py", "ldm/checkpoint/ema.py"],
        [
            "tests/test_ema.py",
            "tests/test_mut_ema.py",
            "tests/test_ema_placement.py",
            "tests/checkpoint/test_ckpt_load_model.py",
        ],
    ),
    "guidance": (
        ["ldm/samplers/guidance.py", "ldm/samplers/guiders.py"],
        [
            "tests/samplers/test_sampler_guidance.py",
            "tests/modules/encoders/test_long_prompt_guidance.py",
            "tests/engine/test_engine.py",
        ],
    ),
    "first_stage": (
        ["ldm/engine/first_stage.py"],
        ["tests/engine/test_first_stage.py", "tests/engine/test_engine.py"],
    ),
    "keymaps": (
        [
            "ldm/checkpoint/keymap_text.py",
            "ldm/checkpoint/keymap_unet.py",
            "ldm/checkpoint/keymap_vae.py",
        ],
        [
            "tests/checkpoint/test_ckpt_keymaps.py",
            "tests/checkpoint/test_ckpt_diffusers.py",
            "tests/checkpoint/test_mut_keymaps.py",
        ],
    ),
    "buckets": (
        ["ldm/data/buckets.py", "ldm/data/bucket_sampler.py"],
        ["tests/data/test_mut_buckets.py"],
    ),
    "data_splits": (
        ["ldm/data/datamodule.py"],
        ["tests/data/test_datamodule.py", "tests/data/test_mut_data_splits.py"],
    ),
    "conditioner": (
        ["ldm/engine/conditioner.py"],
        [
            "tests/engine/test_conditioner_dropout.py",
            "tests/engine/test_mut_conditioner.py",
            "tests/models/test_diffusion_units.py",
            "tests/engine/test_engine.py",
        ],
    ),
    "diffusion_math": (
        [
            "ldm/diffusion/gaussian.py",
            "ldm/diffusion/schedules.py",
            "ldm/diffusion/denoiser.py",
            "ldm/diffusion/edm.py",
        ],
        ["tests/diffusion"],
    ),
    "diffusion_loss": (
        ["ldm/diffusion/losses.py", "ldm/diffusion/objective.py"],
        [
            "tests/diffusion",
            "tests/models/test_diffusion_units.py",
        ],
    ),
    "ae_losses": (
        [
            "ldm/modules/losses/contperceptual.py",
            "ldm/modules/losses/vqperceptual.py",
            "ldm/modules/losses/gan.py",
            "ldm/modules/losses/discriminator.py",
            "ldm/modules/losses/lpips.py",
            "ldm/modules/losses/perceptual.py",
        ],
        ["tests/modules/test_losses.py", "tests/modules/test_mut_ae_losses.py"],
    ),
    "solver": (
        ["ldm/samplers/driver.py", "ldm/diffusion/discretization.py"],
        # the targeted driver / discretization tests; the solver x discretization matrix
        # (test_solver_discretizations.py, ~4 min) would be re-run whole for every survivor
        [
            "tests/samplers/test_mut_driver.py",
            "tests/samplers/test_mut_discretization.py",
            "tests/samplers/test_sampler_api.py",
        ],
    ),
}

#: Expressions on these lines are not mutated: the text of errors, logs and warnings.
NO_MUTATE_PATTERNS = [
    r"^\s*raise ",
    r"\b(logger|log|logging)\.(debug|info|warning|error|exception)\(",
    r"\bwarnings\.warn\(",
]
#: Copied next to the mutated package: what the selected tests read from the repository.
ALSO_COPY = ["configs", "scripts", "checkpoints", "main.py", "setup.py"]


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(module: str, fresh: bool) -> Path:
    """Make ``.mutation/<module>/`` with links to the code and its mutmut configuration."""
    files, tests = MODULES[module]
    work = WORK / module
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in ["ldm", "tests", *ALSO_COPY]:
        link = work / name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(ROOT / name)
    base = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["ldm"]',
            f"only_mutate = {_toml_list(files)}",
            f"also_copy = {_toml_list(ALSO_COPY)}",
            f"do_not_mutate_patterns = {_toml_list(NO_MUTATE_PATTERNS)}",
            f"pytest_add_cli_args_test_selection = {_toml_list(tests)}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider"]',
            "use_git_change_detection = false",
            "",
        ]
    )
    (work / "pyproject.toml").write_text(base + section, encoding="utf-8")
    return work


def run(module: str, max_children: int, fresh: bool, show: bool) -> dict[str, int]:
    work = prepare(module, fresh)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
    with open(work / "run.log", "w", encoding="utf-8") as log:
        subprocess.run(cmd, cwd=work, env=env, check=False, stdout=log, stderr=subprocess.STDOUT)
    subprocess.run(
        [sys.executable, "-m", "mutmut", "export-cicd-stats"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    survivors = [line.split(":")[0].strip() for line in out.splitlines() if ": survived" in line]
    total = stats["total"] - stats.get("skipped", 0)
    score = stats["killed"] / total if total else 1.0
    print(f"{module}: killed {stats['killed']} / {total} ({100 * score:.1f}%)")
    for name in survivors:
        print("  survived:", name)
        if show:
            diff = subprocess.run(
                [sys.executable, "-m", "mutmut", "show", name],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            ).stdout
            print(diff)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", choices=sorted(MODULES), action="append")
    parser.add_argument("--all", action="store_true", help="every module, small ones first")
    parser.add_argument("--list", action="store_true", help="the modules and their files")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    args = parser.parse_args()
    if args.list:
        for name, (files, tests) in MODULES.items():
            print(f"{name}: {' '.join(files)}  <- {' '.join(tests)}")
        return
    modules = list(MODULES) if args.all else (args.module or [])
    if not modules:
        parser.error("give --module NAME (repeatable), --all or --list")
    rows = []
    started = time.perf_counter()
    for module in modules:
        t0 = time.perf_counter()
        stats = run(module, args.max_children, args.fresh, args.show)
        rows.append((module, stats, time.perf_counter() - t0))
    table = summary(rows, time.perf_counter() - started)
    print(table)
    WORK.mkdir(exist_ok=True)
    (WORK / "summary.md").write_text(table + "\n", encoding="utf-8")


def summary(rows: list[tuple[str, dict[str, int], float]], total_seconds: float) -> str:
    """The per-module scores and wall times as a Markdown table (also in .mutation/summary.md)."""
    lines = [
        "| module | killed / all | score | survived | no tests | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for module, stats, seconds in rows:
        total = stats["total"] - stats.get("skipped", 0)
        score = 100 * stats["killed"] / total if total else 100.0
        lines.append(
            f"| {module} | {stats['killed']} / {total} | {score:.1f}% | {stats['survived']} "
            f"| {stats.get('no_tests', 0)} | {seconds / 60:.1f} min |"
        )
    lines.append(f"\nTotal wall time: {total_seconds / 60:.1f} min.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
