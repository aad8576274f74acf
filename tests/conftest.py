"""Shared pytest fixtures: shared real data and tiny hand-made MIND files."""

from __future__ import annotations

import gc
import os
import pathlib
from typing import Callable

import pytest
from tests.helpers import TINY_BEHAVIORS, TINY_NEWS, write_tsv

try:
  import fcntl  # POSIX: lets xdist workers share the Goodreads cache
except ImportError:
  fcntl = None

# The tests' models are tiny, so their time goes to XLA compiling on the CPU
# more than to running; at LLVM's optimization level 0 the five preset
# training tests took 47 s instead of 71 s. Set before JAX starts, and inherited by the run.py subprocesses;
# user runs and the benchmarks keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """A config.data.data_dir for one test module's prepared datasets."""
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The shared real data folder; skips the test when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared data folder {SHARED_DATA} is absent")
  return SHARED_DATA


@pytest.fixture(scope="session")
def goodreads_dir(shared_data) -> pathlib.Path:
  path = shared_data / "goodreads"
  if not (path / "news.tsv").is_file():
    pytest.skip(f"Goodreads release not found at {path}")
  return path


@pytest.fixture(scope="session")
def goodreads_cache(tmp_path_factory, goodreads_dir) -> pathlib.Path:
  """One config.data.data_dir, the Goodreads release prepared (TFDS) in it,
  for the tests that train or evaluate on the release.

  Shared by all of a run's xdist workers: the first to get here prepares it
  (about 40 s of CPU) under a file lock, the others wait and reuse it
  (without fcntl, on Windows, each worker prepares its own).
  """
  from genre_jax import config as config_lib
  from genre_jax import data as data_lib

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER") and fcntl is not None:
    root = root.parent  # the run's folder, above each worker's own
  path = root / "goodreads_cache"
  with open(root / "goodreads_cache.lock", "w") as lock:
    if fcntl is not None:
      fcntl.flock(lock, fcntl.LOCK_EX)
    done = path / "prepared"
    if not done.exists():
      config = config_lib.base_config()
      config_lib.apply_dataset(config, "goodreads")
      config.data.path = str(goodreads_dir)
      config.data.data_dir = str(path)
      data_lib.load_dataset(config.data)
      done.touch()
  return path


@pytest.fixture(scope="session")
def mind_sample_dir(shared_data) -> pathlib.Path:
  path = shared_data / "mind_sample"
  if not (path / "news.tsv").is_file():
    pytest.skip(f"MIND sample not found at {path}")
  return path


@pytest.fixture
def make_tiny_mind() -> Callable[..., str]:
  """Returns make(root, layout="goodreads", variant="small", splits=...).

  layout "goodreads": root/news.tsv + root/<split>/behaviors.tsv.
  layout "official": root/MIND<variant>_<split>/{news,behaviors}.tsv, with
  the news rows spread over the splits (overlapping, as the real release).
  """

  def make(root, layout: str = "goodreads", variant: str = "small",
           splits=("train", "dev", "test")) -> str:
    root = pathlib.Path(root)
    if layout == "goodreads":
      write_tsv(root / "news.tsv", TINY_NEWS)
      for split in splits:
        write_tsv(root / split / "behaviors.tsv", TINY_BEHAVIORS[split])
    elif layout == "official":
      for k, split in enumerate(splits):
        folder = root / f"MIND{variant}_{split}"
        # Each split's news.tsv: all but one item, a different one each time.
        write_tsv(folder / "news.tsv",
                  [r for j, r in enumerate(TINY_NEWS) if j != 4 - k])
        write_tsv(folder / "behaviors.tsv", TINY_BEHAVIORS[split])
    else:
      raise ValueError(f"unknown layout {layout!r}")
    return str(root)

  return make


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown
def pytest_sessionfinish(session):
  """Collects the run's garbage now, then exempts what is left from gc.

  After this hook, xdist reports the worker finished and pytest runs five
  more full collections; over a worker's heap (JAX, PyTorch, tokenizers)
  those took 1-3 s each, and execnet interrupts a worker still busy 5 s
  after its last report, which ended many suite runs with a KeyboardInterrupt
  warning from inside JAX's gc callback. Garbage made by the tests is still
  collected (and any error in its finalizers still reported) here.
  """
  del session
  gc.collect()
  gc.freeze()
