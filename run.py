r"""genre_jax entry point: train, eval, recommend (and the LLM data tools).

  # Train a preset (on the built-in synthetic demo unless the config says so),
  # evaluate its best checkpoint and write recommendations:
  python run.py --mode=train --config=configs/nrms.py --workdir=/tmp/nrms

  # Evaluate a trained run on a split or on any MIND-format behaviors file:
  python run.py --mode=eval --workdir=/tmp/nrms --split=test
  python run.py --mode=eval --workdir=/tmp/nrms --eval_file=path/behaviors.tsv

  # The MIND leaderboard's prediction.txt and prediction.zip for a split
  # (MIND-large's unlabelled test), under --out (default WORKDIR/prediction):
  python run.py --mode=predict --workdir=/tmp/nrms --split=test

  # Top-K items of the whole catalogue for some users, as JSONL:
  python run.py --mode=recommend --workdir=/tmp/nrms --user_ids=U1,U2 \
      --out=/tmp/recs.jsonl

  # GENRE: LLM-generated data for a dataset (replay | openai | local):
  python run.py --mode=generate --config=configs/nrms.py:goodreads \
      --generate.scheme=summarizer --generate.provider=replay \
      --generate.replay.path=../shared/data/goodreads/genre --workdir=/tmp/gen

  # Masked-LM pretraining of the item encoder on the item corpus:
  python run.py --mode=pretrain --config=configs/mlm_minilm.py --workdir=/tmp/mlm

Any config field can be overridden: --config.model.user_encoder=gru.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from genre_jax import config as config_lib
from genre_jax import workdir as workdir_lib
from genre_jax.config import flag_error_message
from genre_jax.errors import ConfigError, exit_on_input_error
from genre_jax.genre import generate as generate_lib
from genre_jax.genre.providers import ProviderError
from genre_jax.logs import json_line, quiet_library_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Preset file, e.g. configs/nrms.py (train/generate).",
    lock_config=True)
try:  # ml_collections applies --generate.* overrides here, on import.
  _GENERATE = config_flags.DEFINE_config_dict(
      "generate", generate_lib.generate_config(),
      "GENRE generation settings (--mode=generate), e.g. "
      "--generate.scheme=summarizer --generate.provider=replay.")
except (KeyError, AttributeError) as _error:
  print(f"error: {flag_error_message(_error, sys.argv)}", file=sys.stderr)
  sys.exit(2)
_MODE = flags.DEFINE_enum(
    "mode", "train",
    ["train", "eval", "recommend", "export", "predict", "generate",
     "pretrain"],
    "What to do.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, config.json, metrics.json.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", "", "Start training from the best weights of this workdir.")
_WANDB_MODE = flags.DEFINE_enum(
    "wandb_mode", "disabled", ["disabled", "offline", "online"],
    "Weights & Biases logging (disabled: no network, no files).")
_SPLIT = flags.DEFINE_string(
    "split", "test", "eval: split to evaluate; export: split whose "
    "impressions' user vectors are written; predict: split whose "
    "impressions are ranked.")
_EVAL_FILE = flags.DEFINE_string(
    "eval_file", "", "eval: a MIND-format behaviors.tsv to evaluate instead "
    "of a split (users unseen in training are scored from their history).")
_USER_IDS = flags.DEFINE_list("user_ids", [], "recommend: user ids.")
_BEHAVIORS_FILE = flags.DEFINE_string(
    "behaviors_file", "", "recommend: recommend for every user of this "
    "MIND-format behaviors file (their last row's history).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "recommend: items per user.",
                               lower_bound=1)
_OUT = flags.DEFINE_string(
    "out", "", "recommend: output JSONL (default WORKDIR/"
    "recommendations.jsonl); export: output folder (default WORKDIR/export);"
    " predict: output folder (default WORKDIR/prediction).")
_DEMO_USERS = flags.DEFINE_integer(
    "demo_recommend_users", 100, "train: after training, write top-K "
    "recommendations for this many test users (0 = none).")


# Column titles of the metric table; other names: nDCG@K, Hit@K, Recall@K.
_METRIC_TITLES = {"auc": "AUC", "mrr": "MRR", "ndcg5": "nDCG@5",
                  "ndcg10": "nDCG@10", "gauc": "GAUC",
                  "global_auc": "GlobalAUC", "logloss": "LogLoss"}


def _metric_names(m: dict) -> list[str]:
  """The metrics of an evaluation result, in order (config.eval.metrics)."""
  return [k for k in m if not k.startswith("num_")]


def _metric_column(name: str) -> tuple[str, int]:
  """(title, width) of a metric's column."""
  if name in _METRIC_TITLES:
    title = _METRIC_TITLES[name]
  else:  # ndcg@K, hit@K, recall@K
    kind, _, k = name.partition("@")
    title = {"ndcg": "nDCG", "hit": "Hit", "recall": "Recall"}.get(
        kind, kind) + "@" + k
  return title, 8 if name in ("auc", "mrr") else max(9, len(title) + 2)


def metric_table(rows: list[tuple[str, str, dict]]) -> str:
  """A readable table of (split, users, metrics) rows: a column for each
  metric of the evaluation (config.eval.metrics, and AUC)."""
  # As wide as the longest split name (an --eval_file's name) and a space.
  width = max([len("split")] + [len(split) for split, _, _ in rows]) + 1
  columns = [(k, *_metric_column(k)) for k in _metric_names(rows[0][2])]
  header = (f"{'split':<{width}}{'users':<7}"
            + "".join(f"{title:>{w}}" for _, title, w in columns)
            + f"{'impressions':>13}")
  lines = [header, "-" * len(header)]
  for split, users, m in rows:
    lines.append(f"{split:<{width}}{users:<7}"
                 + "".join(f"{m[k]:>{w}.4f}" for k, _, w in columns)
                 + f"{m['num_impressions']:>13d}")
  return "\n".join(lines)


def _metrics_json(m: dict) -> str:
  return json_line({k: m[k] for k in _metric_names(m) + ["num_impressions"]})


def _train(config, workdir):
  from genre_jax import recommend
  from genre_jax import train

  summary = train.train_and_evaluate(config, workdir,
                                     init_from=_INIT_FROM.value,
                                     wandb_mode=_WANDB_MODE.value)
  rows = [(split, users, summary[split][key])
          for split in ("valid", "dev", "test") if split in summary
          for users, key in (("all", "all"), ("cold", "cold"))]
  print(metric_table(rows))
  if "oracle" in summary:
    oracle = summary["oracle"]
    parts = [f"{s} {oracle[s]['auc']:.4f}" for s in ("dev", "test")
             if s in oracle]
    print(f"Planted-model (oracle) AUC: {', '.join(parts)}; a random scorer: "
          f"{oracle.get('random_auc', float('nan')):.4f}")
    if "topic_auc" in oracle.get("test", {}):
      print(f"Planted topic preference alone (item quality is not in the "
            f"text; the ceiling of a content model): test "
            f"{oracle['test']['topic_auc']:.4f}")
  print(f"Trained {summary['steps']} steps in {summary['train_seconds']:.1f}s "
        f"({summary['samples_per_s']:.0f} samples/s); best "
        f"{summary.get('selected_on', 'dev')} at step {summary['best_step']}.")
  if summary.get("note"):
    print(f"Note: {summary['note']}.")
  if _DEMO_USERS.value > 0:
    from genre_jax import data as data_lib

    split = "test" if "test" in summary else "dev"
    dataset = data_lib.load_dataset(config.data)
    users = list(dict.fromkeys(dataset.splits[split].user_ids))
    out = os.path.join(workdir, "recommendations.jsonl")
    recommend.recommend(workdir, out, user_ids=users[:_DEMO_USERS.value],
                        top_k=_TOP_K.value)
    print(f"Recommendations for {min(len(users), _DEMO_USERS.value)} {split} "
          f"users: {out}")
  final = summary.get("test", summary.get("dev"))
  print(json_line({"workdir": os.path.abspath(workdir),
                   "dev": summary.get("dev", {}).get("all"),
                   "test": summary.get("test", {}).get("all"),
                   "test_cold": summary.get("test", {}).get("cold"),
                   "oracle": summary.get("oracle"),
                   "train_seconds": summary["train_seconds"]}
                  if final else {}))


def _eval(workdir):
  from genre_jax import train
  from genre_jax.data import genre_augment as augment
  from genre_jax.data import mind

  if _EVAL_FILE.value and not os.path.isfile(_EVAL_FILE.value):
    raise ConfigError(f"--eval_file={_EVAL_FILE.value}: no such file")
  config, dataset, evaluator, params = train.load_for_inference(workdir)
  stats = None
  if _EVAL_FILE.value:
    user_index = {u: i for i, u in enumerate(dataset.user_vocab) if i > 0}
    behaviors, stats = mind.read_behaviors(
        _EVAL_FILE.value, dataset.items.index(), dict(user_index))
    behaviors.users[behaviors.users >= len(dataset.user_vocab)] = 0
    augment.extend_behaviors(behaviors, dataset)
    name = os.path.basename(_EVAL_FILE.value)
    source = f"--eval_file={_EVAL_FILE.value}"
  else:
    if _SPLIT.value not in dataset.splits:
      raise app.UsageError(f"--split={_SPLIT.value}: the dataset has "
                           f"{sorted(dataset.splits)}")
    behaviors, name = dataset.splits[_SPLIT.value], _SPLIT.value
    source = f"--split={_SPLIT.value}"
    if not behaviors.is_labelled():
      raise ConfigError(f"{source}: the {name} split has no labels "
                        "(MIND-large's test), so it has no metrics; "
                        "--mode=predict writes its leaderboard file")
  if len(behaviors):
    result = evaluator.evaluate(params, behaviors)
  if not len(behaviors) or not result["all"]["num_impressions"]:
    raise ConfigError(f"{source}: no impression can be scored: "
                      f"{_why_unscorable(behaviors, stats)}")
  print(metric_table([(name, "all", result["all"]),
                      (name, "cold", result["cold"])]))
  print(_metrics_json(result["all"]))


def _why_unscorable(behaviors, stats) -> str:
  """Why no impression of an eval input has metrics (for the error)."""
  if stats is not None and not stats.rows_read:
    return "the file has no rows"
  if not len(behaviors):
    if stats is not None:
      return (f"every candidate item of its rows ({stats.rows_read}) is "
              "unknown to this run's item table")
    return "the split has no impressions"
  unknown = (f" (after dropping {stats.candidate_ids_dropped} candidates "
             "unknown to this run's item table)"
             if stats is not None and stats.candidate_ids_dropped else "")
  return (f"every impression ({len(behaviors)}) has only clicked or only "
          f"non-clicked candidates{unknown}; AUC, MRR and nDCG need both")


def _recommend(workdir):
  from genre_jax import recommend

  if not _USER_IDS.value and not _BEHAVIORS_FILE.value:
    raise app.UsageError("recommend needs --user_ids or --behaviors_file")
  out = _OUT.value or os.path.join(workdir, "recommendations.jsonl")
  result = recommend.recommend(workdir, out, user_ids=_USER_IDS.value,
                               behaviors_file=_BEHAVIORS_FILE.value,
                               top_k=_TOP_K.value)
  for user_id in result["unknown_users"]:
    print(f"unknown user id '{user_id}': no history for it in the dataset; "
          "pass --behaviors_file with its history to score a new user",
          file=sys.stderr)
  for user_id in result["unserved_users"]:
    print(f"warning: user '{user_id}' in {_BEHAVIORS_FILE.value}: none of "
          "its history item ids is in the item table; not served",
          file=sys.stderr)
  if result["num_fewer_than_k"] or result["num_empty_history"]:
    print(f"warning: {result['num_fewer_than_k']} users got fewer than "
          f"{_TOP_K.value} items (marked fewer_than_k); "
          f"{result['num_empty_history']} had an empty history (marked "
          "empty_history; items in item-row order)", file=sys.stderr)
  figures = result["beyond_accuracy"]
  print(f"beyond accuracy of {figures['num_lists']} top-{_TOP_K.value} "
        f"lists: catalogue coverage {figures['coverage']:.4f}, intra-list "
        f"diversity {figures['diversity']:.4f}, novelty "
        f"{figures['novelty']:.2f} bits, long-tail share "
        f"{figures['long_tail_share']:.4f}", file=sys.stderr)
  print(json_line(result))


def _export(workdir):
  from genre_jax import export

  out = _OUT.value or os.path.join(workdir, "export")
  summary = export.export(workdir, out, split=_SPLIT.value)
  print(f"wrote {summary['items'][0]} item vectors and "
        f"{summary['users'][0]} user vectors ({summary['split']} impressions)"
        f" to {out}", file=sys.stderr)
  print(json_line(summary))


def _predict(workdir):
  from genre_jax import predict

  out = _OUT.value or os.path.join(workdir, "prediction")
  summary = predict.predict(workdir, out, split=_SPLIT.value)
  print(f"wrote the ranks of {summary['impressions']} {summary['split']} "
        f"impressions to {os.path.join(out, predict.PREDICTION_FILE)} and "
        f"{os.path.join(out, predict.PREDICTION_ZIP)}", file=sys.stderr)
  if not summary["complete"]:
    print(f"warning: {summary['rows_dropped']} impressions and "
          f"{summary['candidates_dropped']} candidates of the {summary['split']}"
          " file are not in the prediction (item ids missing from news.tsv);"
          " the leaderboard expects every one", file=sys.stderr)
  print(json_line(summary))


def _pretrain(config, workdir):
  from genre_jax.train import pretrain as pretrain_lib

  if "pretrain" not in config:
    raise app.UsageError("--mode=pretrain needs a pretraining preset, e.g. "
                         "--config=configs/mlm_minilm.py")
  summary = pretrain_lib.pretrain(config, workdir)
  # A finished run's summary comes back as recorded; it may list no losses.
  losses = summary.get("losses") or []
  print(f"{'step':>8}{'MLM loss':>10}")
  for record in losses:
    print(f"{record['step']:>8}{record['loss']:>10.4f}")
  print(f"Pretrained {summary['steps']} steps on {summary['num_texts']} item "
        f"texts in {summary['seconds']:.1f}s; use it with "
        f"--config.model.lm.init={os.path.abspath(workdir)}")
  print(json_line({"workdir": os.path.abspath(workdir),
                   "first_loss": losses[0]["loss"] if losses else None,
                   "last_loss": losses[-1]["loss"] if losses else None,
                   "steps": summary["steps"]}))


def _generate(config, workdir):
  g = _GENERATE.value
  out = g.out or (os.path.join(workdir, f"{g.scheme}.jsonl") if workdir
                  else "")
  if not out:
    raise app.UsageError("--mode=generate needs --workdir or --generate.out")
  config_lib.validate(config, sections=("data",))
  config_lib.validate(g, rules=config_lib.GENERATE_RULES, name="--generate")
  # One writer for the outputs and their answer caches.
  with workdir_lib.exclusive(workdir or os.path.dirname(os.path.abspath(out)),
                             "run.py --mode=generate"):
    _generate_into(config, g, out)


def _generate_into(config, g, out):
  """_generate once its settings are checked and its folder held."""
  from genre_jax import data as data_lib
  from genre_jax.data import genre_augment as augment

  # Prompts are built from the original data, whatever augmentation the
  # config switches on for training.
  data_config = config.data.copy_and_resolve_references()
  data_config.genre.summarizer = ""
  data_config.genre.profiler = ""
  data_config.genre.generator = ()
  dataset = data_lib.load_dataset(data_config)
  domain = augment.domain_of(dataset, g)
  provider = generate_lib.make_provider(g, out)
  summary = generate_lib.run_generation(
      g.scheme, domain, provider, dataset, out,
      cold_threshold=int(config.data.cold_threshold), limit=int(g.limit),
      chunk_size=int(g.chunk_size),
      scheme_options={"max_history": int(g.max_history)})
  steps = [summary.get("profiler"), summary]
  print(f"{'scheme':<12}{'domain':<8}{'asked':>8}{'usable':>9}{'seconds':>9}"
        "  output")
  for step in (s for s in steps if s):
    print(f"{step['scheme']:<12}{step['domain']:<8}{step['count']:>8}"
          f"{100 * step['usable_rate']:>8.1f}%{step['seconds']:>9.1f}"
          f"  {step['out_path']}")
  print(json_line(summary, default=str))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config file or override reported in
  one line (file, line, field) instead of ml_collections' traceback."""
  try:
    parsed = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.get("train")  # A file that failed to load raises here.
    return parsed
  except Exception as e:  # pylint: disable=broad-except
    message = flag_error_message(e, argv)
    if message is None:
      if not isinstance(e, flags.Error):
        raise
      message = f"{e}\nPass --helpshort or --helpfull to see help on flags."
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logging()
  workdir = _WORKDIR.value
  mode = _MODE.value
  if mode in ("train", "generate", "pretrain") and _CONFIG.value is None:
    raise app.UsageError(f"--mode={mode} needs --config=configs/<preset>.py")
  if mode in ("train", "eval", "recommend", "export", "predict",
              "pretrain") and not workdir:
    raise app.UsageError(f"--mode={mode} needs --workdir")
  if mode in ("eval", "recommend", "export", "predict") and (
      _CONFIG.value is not None):
    # The run's own config.json decides; --config and its overrides would be
    # silently ignored.
    raise app.UsageError(f"--mode={mode} uses the config the run in "
                         "--workdir was trained with (its config.json); "
                         "drop --config and its --config.* overrides")
  if mode == "generate":  # replay and openai need no JAX; local loads it
    _generate(_CONFIG.value, workdir)
    return
  from genre_jax import train

  train.maybe_initialize_distributed()
  if mode == "train":
    _train(_CONFIG.value, workdir)
  elif mode == "eval":
    _eval(workdir)
  elif mode == "recommend":
    _recommend(workdir)
  elif mode == "export":
    _export(workdir)
  elif mode == "predict":
    _predict(workdir)
  else:
    _pretrain(_CONFIG.value, workdir)


if __name__ == "__main__":
  app.run(exit_on_input_error(main, ProviderError),
          flags_parser=_parse_flags)
