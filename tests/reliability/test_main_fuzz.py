"""Random flags and config overrides given to ``main.py``: exit code 0, 1 or 2 with one message,
never a traceback; a run directory is created only for a run that starts.

The fast test stops each run where training would start (``Trainer.fit`` replaced): everything
the command line and the config decide is checked by then. The slow one trains (3 steps at most).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import main as main_py

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "configs" / "cli" / "toy.yaml")
EDGE = [
    "-1", "0", "1", "2", "0.5", "1.5", "-0.5", "1e400", "nan", "inf", "-inf", "abc", "''", "null",
    "[1,2]", "{a: 1}", "true", "99999999999999999999", "1e-3", "-3", "'1'",
]  # fmt: skip
TEXT = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=10
)
VALUES = st.one_of(st.sampled_from(EDGE), TEXT, st.integers(-(2**40), 2**40).map(str))
KEYS = [
    "trainer.max_steps", "trainer.max_epochs", "trainer.min_steps", "trainer.accumulate_grad_batches",
    "trainer.check_val_every_n_epoch", "trainer.val_check_interval", "trainer.limit_train_batches",
    "trainer.limit_val_batches", "trainer.log_every_n_steps", "trainer.gradient_clip_val",
    "trainer.precision", "trainer.devices", "trainer.accelerator", "trainer.num_sanity_val_steps",
    "trainer.gpus", "trainer.strategy", "trainer.num_nodes", "trainer.deterministic",
    "model.base_learning_rate", "model.params.hidden", "model.params.in_dim",
    "model.params.monitor", "model.target", "model.params", "data.params.batch_size",
    "data.params.num_workers", "data.params.train.params.n", "data.params.validation",
    "data.target", "lightning.modelcheckpoint.params.every_n_train_steps",
    "lightning.modelcheckpoint.params.save_top_k", "lightning.callbacks.image_logger.params.batch_frequency",
    "lightning.callbacks.image_logger.params.max_images", "lightning", "data", "model",
    "lightning.trainer", "trainer.not_an_argument", "modle.params.hidden",
]  # fmt: skip
FLAGS = {
    "-s": VALUES,
    "-n": TEXT,
    "-p": TEXT,
    "-f": TEXT,
    "--scale_lr": st.sampled_from(["true", "false", "maybe", "1", ""]),
    "--no-test": st.sampled_from(["true", "false", "x"]),
    "-t": st.sampled_from(["true", "false", "yes", "2"]),
    "-d": st.sampled_from(["false"]),
}
FAST = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Run directories to resume: a good one, one whose only checkpoint is cut off, a file."""
    from ldm.launch import run
    from ldm.launch_cli import parse_command

    d = tmp_path_factory.mktemp("runs")
    argv = ["-b", TOY, "-t", "--no-test", "-l", str(d / "logs"), "--trainer.max_steps", "2",
            "lightning.callbacks.image_logger=null"]  # fmt: skip
    good = run(parse_command(argv).spec).run_dir
    cut = run(parse_command(argv).spec).run_dir
    for ckpt in (cut / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    (d / "file.txt").write_text("x")
    return {
        "good": str(good),
        "cut": str(cut),
        "file": str(d / "file.txt"),
        "missing": str(d / "no"),
    }


@st.composite
def main_argv(draw: st.DrawFn, runs: dict[str, str], logdir: Path, slow: bool) -> list[str]:
    resume = draw(st.sampled_from([None, None, None, "good", "cut", "file", "missing"]))
    argv = ["-r", f"<{resume}>"] if resume else ["-b", TOY, "-l", str(logdir)]
    argv += ["-t", "--no-test", "lightning.callbacks.image_logger=null"]
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            key = draw(st.sampled_from(KEYS))
            if slow and key in ("trainer.min_steps", "trainer.gpus"):
                continue  # the slow test trains: its length and processes stay bounded
            sep = draw(st.sampled_from(["=", " "]))
            value = draw(VALUES)
            argv += [f"{key}={value}"] if sep == "=" else [f"--{key}", value]
        else:
            flag = draw(st.sampled_from(sorted(FLAGS)))
            argv += [flag, draw(FLAGS[flag])]
    if slow:  # bounded, and one process: DDP would start this test's command line again
        argv += ["trainer.max_steps=3", "trainer.max_epochs=1", "data.params.num_workers=0",
                 "trainer.devices=1", "trainer.num_nodes=1", "trainer.accelerator=cpu",
                 "trainer.strategy=auto"]  # fmt: skip
    return argv


def _run(argv: list[str], figures: Counter, tag: str) -> int:
    figures[f"main.py fuzz ({tag}): cases"] += 1
    err = io.StringIO()
    logging.disable(logging.NOTSET)
    with contextlib.redirect_stderr(err):
        try:
            code = main_py.main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    assert code in (0, 1, 2), f"exit code {code!r} for {argv}"
    figures[f"main.py fuzz ({tag}): exit {code}"] += 1
    return code


def _with_copies(argv: list[str], runs: dict[str, str], scratch: Path) -> list[str]:
    """``<good>`` etc. -> a fresh copy of that run (a resume adds its configs to the run)."""
    import shutil
    import uuid

    out = []
    for tok in argv:
        if tok.startswith("<") and tok.endswith(">"):
            src = Path(runs[tok[1:-1]])
            if src.is_dir():
                dst = scratch / uuid.uuid4().hex / src.name
                shutil.copytree(src, dst)
                tok = str(dst)
            else:
                tok = str(src)
        out.append(tok)
    return out


def _run_and_check_dirs(argv: list[str], figures: Counter, tag: str, logdir: Path) -> None:
    """A launch that fails before training starts leaves no run directory behind (one that
    fails later keeps the configs and logs it wrote, for a look at what happened)."""
    before = set(logdir.iterdir()) if logdir.is_dir() else set()
    code = _run(argv, figures, tag)
    after = set(logdir.iterdir()) if logdir.is_dir() else set()
    if code != 0:
        empty = [p.name for p in after - before if p.is_dir() and not any(p.rglob("*.yaml"))]
        assert empty == [], f"exit {code} left run directories without configs: {empty}"


def test_flags_and_overrides_fail_cleanly(runs, figures, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: None)
    logdir = tmp_path / "logs"

    @FAST
    @given(main_argv(runs, logdir, slow=False))
    def case(argv: list[str]) -> None:
        argv = _with_copies(argv, runs, tmp_path / "copies")
        _run_and_check_dirs(argv, figures, "checks", logdir)

    case()


@pytest.mark.slow
def test_flags_and_overrides_fail_cleanly_when_training(runs, figures, tmp_path) -> None:
    logdir = tmp_path / "logs"

    @settings(FAST, max_examples=400, derandomize=False)
    @given(main_argv(runs, logdir, slow=True))
    def case(argv: list[str]) -> None:
        argv = _with_copies(argv, runs, tmp_path / "copies")
        _run_and_check_dirs(argv, figures, "training", logdir)

    case()
