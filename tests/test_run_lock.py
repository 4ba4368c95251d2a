"""One process at a time writes a run directory: a second run into it is a clear error that leaves
the directory alone, and figure scripts wait for the first and then reuse its run. A run that fails
while training is marked failed with its error, whatever its kind."""

import json
import subprocess
import sys
import threading
import time

import pytest

from tests.test_sd_run import tiny_world_sd  # noqa: F401  (fixture)
from tests.test_unlearn_mllm import WORLD, world_dir  # noqa: F401  (fixture)
from unlearn.run_mllm import run_mllm
from unlearn.run_sd import run_sd
from unlearn.runs import evaluate_run, run_dir_lock, run_state

HOLD = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); sys.stdin.read()")


def hold_lock(out):
    """Another process holding ``out``'s run lock until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out.parent / f".{out.name}.lock")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def release(proc):
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_held_run_directory_is_refused_or_waited_for(tmp_path):
    out = tmp_path / "run"
    proc = hold_lock(out)
    try:
        with pytest.raises(RuntimeError, match="being written by another process"):
            with run_dir_lock(out):
                pass
        acquired = threading.Event()

        def waiter():
            with run_dir_lock(out, wait=True):
                acquired.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)
        assert not acquired.is_set()  # still held by the other process
    finally:
        release(proc)
    thread.join(timeout=30)
    assert acquired.is_set()
    with run_dir_lock(out), run_dir_lock(out):  # re-entrant within one process
        pass
    with run_dir_lock(out, enabled=False):  # non-main processes of a multi-process run take none
        pass


def test_a_second_run_into_a_directory_in_use_leaves_it_alone(default_world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # the other run's files so far
    proc = hold_lock(out)
    try:
        with pytest.raises(RuntimeError, match="being written by another process"):
            run_sd("vorn", "fttp", out, steps=1, images=2, eval_seeds=1, fd_seeds=2, retained=["blip"],
                   progress=False, overwrite=True)
    finally:
        release(proc)
    assert [p.name for p in out.iterdir()] == ["manifest.json"] and (out / "manifest.json").read_text() == "{}"


class FailsAtFirstStep:
    """A loop callback that raises after the first training step, noting the run's files by then."""

    def __init__(self, out):
        self.out, self.seen = out, []

    def on_step_end(self, step, logs, state):
        self.seen = sorted(p.name for p in self.out.iterdir())
        raise RuntimeError("callback failed")


def test_a_run_failing_in_training_is_recorded_as_failed_whatever_its_kind(tmp_path, world_dir, tiny_world_sd):  # noqa: F811
    runs = {
        "mllm": lambda out, **kw: run_mllm("vorn", "ga", out, steps=2, world_dir=world_dir, world_config=WORLD, **kw),
        "sd": lambda out, **kw: run_sd("vorn", "ga", out, steps=2, images=2, model=str(tiny_world_sd), eval_seeds=1,
                                       fd_seeds=2, retained=["blip"], **kw),
    }
    for kind, run in runs.items():
        new, old = tmp_path / f"{kind}-new", tmp_path / f"{kind}-old"
        old.mkdir()
        (old / "notes.txt").write_text("the user's, not a run's")
        (old / "metrics.json").write_text("{}")  # an earlier run's, replaced with overwrite
        for out, overwrite in ((new, False), (old, True)):
            failing = FailsAtFirstStep(out)
            with pytest.raises(RuntimeError, match="callback failed"):
                run(out, trace=True, callbacks=[failing], progress=False, overwrite=overwrite)
            assert "samples" in failing.seen, (kind, failing.seen)
            manifest = json.loads((out / "manifest.json").read_text())
            assert manifest["state"] == "failed" and manifest["error"] == "RuntimeError: callback failed", kind
            assert run_state(out) == "failed"
            # no result of the failed run, nor of the old one: its state says what happened
            assert not any((out / name).exists() for name in ("metrics.json", "adapter", "weights")), kind
            with pytest.raises(ValueError, match="not complete: failed"):
                evaluate_run(out)
            with pytest.raises(FileExistsError, match="--overwrite"):  # a new run into it must say so
                run(out, progress=False)
        assert (old / "notes.txt").read_text() == "the user's, not a run's", kind  # what is not a run's stays


def test_the_lock_is_the_real_directorys_also_through_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    proc = hold_lock(real)
    try:
        with pytest.raises(RuntimeError, match="being written by another process"):
            with run_dir_lock(tmp_path / "link"):
                pass
    finally:
        release(proc)
