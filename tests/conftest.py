"""Fixtures shared by several test files."""

import pytest

from unlearn.world.build import build_world
from unlearn.world.cache import default_cache_dir


@pytest.fixture(scope="session")
def default_world():
    """The default world ($UNLEARN_WORLD_DIR, else ~/.cache/unlearn/world), built here if missing.

    Tests that start subprocesses on the default world use this so the world is built once, in the
    test process, and not inside a subprocess that runs under a timeout (CI starts with no world:
    building it takes 15-20 minutes on 2 cores)."""
    root = default_cache_dir()
    build_world(root, progress=False)
    return root


@pytest.fixture(scope="session")
def finished_sd_run(tmp_path_factory, default_world):
    """A complete 3-step FTTP run on grom on the default world SD (tests/sd_audit.py), made once for every
    SD audit test. Read only: a test that writes into a run (an audit) copies it first."""
    from tests.sd_audit import make_sd_run

    return make_sd_run(tmp_path_factory.mktemp("sd-run") / "run")
