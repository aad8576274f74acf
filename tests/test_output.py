"""What a run prints: a progress bar on terminals only, no library noise."""

import io
import logging as pylogging

from absl import logging

from genre_jax import config as config_lib
from genre_jax import data as data_lib
from genre_jax import logs
from tests.helpers import TINY_BEHAVIORS, TINY_NEWS, write_tsv


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_bar_on_a_terminal_and_none_elsewhere():
  assert logs.progress_bar(100, stream=io.StringIO()) is None
  screen = _Terminal()
  bar = logs.progress_bar(1000, initial=200, desc="epoch 1/2", stream=screen)
  bar.update(300)
  bar.set_postfix_str("step 5/10 loss 1.2345")
  bar.close()
  shown = screen.getvalue()
  assert "epoch 1/2" in shown and "500/1.00k" in shown
  assert "sample/s" in shown and "loss 1.2345" in shown


def _record(path, level):
  return pylogging.LogRecord("absl", level, path, 1, "message", (), None)


def test_library_info_lines_are_dropped_and_their_warnings_kept():
  logs.quiet_library_logging()
  [quiet] = [f for f in logging.get_absl_handler().filters
             if isinstance(f, logs._LibraryInfoFilter)]  # pylint: disable=protected-access
  probe = "/venv/lib/python3.11/site-packages/jax/_src/xla_bridge.py"
  assert not quiet.filter(_record(probe, pylogging.INFO))
  assert quiet.filter(_record(probe, pylogging.WARNING))
  assert quiet.filter(_record("/repo/genre_jax/train.py", pylogging.INFO))


def test_preparing_local_data_prints_no_download_lines(tmp_path, capsys):
  root = tmp_path / "release"
  write_tsv(root / "news.tsv", TINY_NEWS)
  for split, rows in TINY_BEHAVIORS.items():
    write_tsv(root / split / "behaviors.tsv", rows)
  config = config_lib.load_preset("nrms")
  config.data.name = "goodreads_genre"
  config.data.path = str(root)
  config.data.data_dir = str(tmp_path / "data")
  data_lib.load_dataset(config.data)
  printed = capsys.readouterr()
  assert "Downloading" not in printed.out + printed.err
  assert "downloaded and prepared" not in printed.out + printed.err
