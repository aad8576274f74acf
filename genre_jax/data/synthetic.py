"""A deterministic synthetic dataset in MIND format with a planted preference.

The built-in demo: users have sparse topic preferences, items have topic
mixtures that show through (noisily) in the words of their titles and
abstracts, and clicks follow the planted model

  logit(u, i) = scale * <pref_u, topics_i> + quality_i,
  P(click i | impression) = softmax over its candidates of logit + noise.

Because the planted logits are known, `oracle.json` records the best GAUC any
model could reach (the noise-free logits) next to a random scorer's, so a
trained model can be placed between the two. Text reveals topics only partly
(shared and noise words, overlapping topic vocabularies, mislabelled
categories) and item quality not at all, so models land in between.

Usage:
  python -m genre_jax.data.synthetic --out_dir=/tmp/synth --num_users=2000
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
from typing import Sequence

import numpy as np

from genre_jax.workdir import atomic_write_text

SPLITS = ("train", "dev", "test")
# Fractions of impressions (in time order) that go to train and dev.
_TRAIN_FRACTION = 0.8
_DEV_FRACTION = 0.1
# Planted-model strengths (chosen so the oracle GAUC is about 0.8).
_PREF_SCALE = 9.0
_QUALITY_STD = 0.8
_PREF_ALPHA = 0.25  # Dirichlet concentration of user preferences: sparse.
_ZIPF_EXPONENT = 0.9  # Item popularity ~ 1 / rank ** exponent.
# Share of users whose history holds only 1-5 items.
_COLD_SHARE = 0.3
_MEAN_IMPRESSIONS_PER_USER = 10
_SECOND_CLICK_PROB = 0.2  # Chance an impression carries a second click.
_CATEGORY_NOISE = 0.1  # Chance an item is filed under a wrong category.
# Where title/abstract words come from: topic, shared, noise vocabularies.
_WORD_SOURCE_PROBS = (0.4, 0.4, 0.2)
_TOPIC_VOCAB = 40
_TOPIC_OVERLAP = 10  # Words each topic borrows from the next topic's list.
_NOISE_VOCAB = 400
_SUBCATEGORIES_PER_TOPIC = 3
_START_TIME = datetime.datetime(2019, 11, 9, 0, 0, 0)
_SPAN_SECONDS = 7 * 24 * 3600

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SHARED_WORDS = (
    "the a of and to in for on with new how why what after over from about "
    "best first last more most big small good great top inside behind life "
    "world year years day time people story stories guide way ways says report "
    "look back home week today future old young making made real "
    "you your our this that these those will can could just still every").split()


# Topic words, category and subcategory names are real English words that
# common WordPiece vocabularies (BERT's, MiniLM's) keep whole, so a word-level
# item encoder can learn a topic word in one embedding; made-up words would
# split into syllable pieces shared by every topic. Noise words stay made-up.
_WORD_POOL = """
abbey above academic account accused adult affair alcohol alma alps amazing
america amino amount analog anderson anglican annoyed anti apology appealed
archived argue arizona arrange arriving asset atop attic auburn auto avery
backpack backs bailey balance barnes basin batsman bavaria beauty belly
beside bible biggest blank blanket boats boeing bolton bond bone bored boris
borrowed boxes bradford brisbane bulk burned byrne calgary calmly campaign
canyon capacity card carpet chaired chapel cherokee chilean choose citizen
clause claws clearly clinic clive closed closest coin colours compete
competes complete conflict congress contrary cooler cooling coup courtesy
courtney cousins cover crack craig crash create credit crept cries cross
crouched curves custom dagger damon dancing danger darius database dayton
deals debris debts decide decrease degree demo deposit deputy detailed devon
dirt displays donald dose downtown drag drank dreaming dreams dress dubbed
duncan dust dusty dynamic eased eclipse editor eight eighty eleanor election
embarked embraced emerald emmanuel employed employer enzyme erect eugene
exam expense extent extreme faced fails fair families farms favor feathers
feeds feet fellows fertile fields finding findings floods flora flowers
focused forgot fort fossil framed francis freeze friday funny gained gang
gate germans gets gone google gospel grande gravel greatest green groaned
grocery hallway handball hanover harry hated healthy hearing heat helmet
herbert hero hood humans hurling inclined inland insects instance instinct
inter investor isolated jackson jasmine johnson johnston jonas joyce jungle
karl kelly kenneth kerry kicking kingdom klein korean kumar landing lately
laura leap leaves lecturer legend lengthy levels licence liked likewise
linda locate lock locker loves ludwig luis makers mall manga manuel marched
mare maryland mass matrix mature medley melody melted memphis merged merit
metre mine minority missing mist mister mobility mock modeled modified moist
mollusk monkey morgan mortal mortar mostly motor mound movement muller
namely narrowed nasa nassau native neighbor neutral newest nineteen ninth
nordic nowhere obscure occupy offshore opponent ordained orders others paced
painter painting panel paraguay parody parsons parts pays pepper perhaps
perth peter peterson picked pictures pinned places plane platform plots
pointing poll portions portland portugal positive premises prey prime proof
prospect protect protests province pure pursue pursuit pyramid quarry rabbi
rachel radius raids railway ranges rarely raymond rays reached ready reality
realizes rebuild recorder recover recovery reducing regional relief repeat
replaced replies required resisted resource rest results revealed revenue
review rider rituals rogers royal royce ryan sailed sailing sale salem
salvador saving sawyer scales scan scanned scrapped screened sculptor seal
seattle secret seek seemed seized senator sends senses sensors seoul serena
settle seymour shirley shocked shoe showed shri sideways sight silicon
simmons singing sinking sixteen skeleton slim smashed smell smiled snapped
softly soil solving somebody someone spain speaking spectrum spin spinning
spring stage stance stars stated stepped stone strategy strictly strip stuck
stunning summary supports surface sweat swedish swimmer swimming swollen
swore symbols symphony taipei talk tallest tasked tasted teach teased
teasing teenager tessa thinking thirteen throat tier tile tina tiny tires
tobacco tokyo tomb tools touring traces trailer tray trent troops troubled
troubles trunk trust trustee tubes tunisia tunnels ultimate upcoming
upstairs uranium urge utah valid vault vector vessels villa viola virgin
virtue vision volcanic wallace wandered wanting washed wasted wedding
weekend wells welsh wheels whipped wicked wife wilson wind windsor wings
wiping wisdom wonder word wore worthy wyatt younger youth zhang zones
""".split()


@dataclasses.dataclass
class SyntheticSplit:
  """One split's impressions in file order, ragged like the MIND file.

  Attributes:
    users: [M] user numbers k (written as "U<k>").
    times: [M] seconds since the start of the collection window.
    history_offsets: [M+1] int64 offsets into history_items.
    history_items: item numbers k (written as "N<k>"), oldest first.
    cand_offsets: [M+1] int64 offsets into cand_items.
    cand_items: candidate item numbers in impression order.
    cand_labels: int8 click labels aligned with cand_items.
    cand_scores: float64 planted (noise-free) logits aligned with cand_items.
  """

  users: np.ndarray
  times: np.ndarray
  history_offsets: np.ndarray
  history_items: np.ndarray
  cand_offsets: np.ndarray
  cand_items: np.ndarray
  cand_labels: np.ndarray
  cand_scores: np.ndarray


@dataclasses.dataclass
class SyntheticData:
  """Everything the generator draws, before it is written out.

  Attributes:
    categories: [N] category of item k at row k-1.
    subcategories: [N] subcategory of each item.
    titles: [N] titles.
    abstracts: [N] abstracts.
    item_topics: [N, T] each item's topic mixture.
    user_prefs: [U, T] each user's topic preference.
    quality: [N] item quality bias.
    splits: split name -> SyntheticSplit.
  """

  categories: list[str]
  subcategories: list[str]
  titles: list[str]
  abstracts: list[str]
  item_topics: np.ndarray
  user_prefs: np.ndarray
  quality: np.ndarray
  splits: dict[str, SyntheticSplit]


def _make_words(rng: np.random.Generator, count: int,
                taken: set[str]) -> list[str]:
  """Draws `count` distinct word-like lowercase tokens (2-3 syllables)."""
  words = []
  while len(words) < count:
    n = 2 + int(rng.random() < 0.5)
    word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] +
                   _VOWELS[rng.integers(len(_VOWELS))] for _ in range(n))
    if word not in taken:
      taken.add(word)
      words.append(word)
  return words


def _vocabularies(rng: np.random.Generator, num_topics: int):
  """Topic names, subcategories, topic word lists (overlapping) and noise."""
  taken = set(_SHARED_WORDS)
  pool = iter(rng.permutation(_WORD_POOL))

  def real_words(count: int) -> list[str]:
    # Real words while the pool lasts (many topics may exhaust it).
    words = [str(w) for w in itertools.islice(pool, count)]
    taken.update(words)
    return words + _make_words(rng, count - len(words), taken)

  names = real_words(num_topics)
  subcats = [real_words(_SUBCATEGORIES_PER_TOPIC) for _ in range(num_topics)]
  own = [real_words(_TOPIC_VOCAB) for _ in range(num_topics)]
  # Each topic also uses some of the next topic's words: not separable.
  topic_words = [own[t] + own[(t + 1) % num_topics][:_TOPIC_OVERLAP]
                 for t in range(num_topics)]
  noise = _make_words(rng, _NOISE_VOCAB, taken)
  return names, subcats, topic_words, noise


def _item_topics(rng: np.random.Generator, num_items: int,
                 num_topics: int) -> tuple[np.ndarray, np.ndarray]:
  """Topic mixtures concentrated on one or two topics; returns (theta, main)."""
  main = rng.integers(num_topics, size=num_items)
  second = (main + rng.integers(1, num_topics, size=num_items)) % num_topics
  has_second = rng.random(num_items) < 0.5
  w = np.where(has_second, rng.uniform(0.15, 0.45, size=num_items), 0.0)
  theta = 0.05 * rng.dirichlet(np.ones(num_topics), size=num_items)  # [N, T]
  rows = np.arange(num_items)
  theta[rows, main] += 0.95 * (1.0 - w)
  theta[rows, second] += 0.95 * w
  return theta, main


def _text(rng: np.random.Generator, theta: np.ndarray, length: int,
          topic_words: Sequence[Sequence[str]], noise: Sequence[str]) -> str:
  """A bag of words mixing the item's topic words, shared and noise words."""
  source = rng.choice(3, size=length, p=_WORD_SOURCE_PROBS)
  topics = rng.choice(len(theta), size=length, p=theta)
  words = []
  for s, t in zip(source, topics):
    if s == 0:
      vocab = topic_words[t]
    elif s == 1:
      vocab = _SHARED_WORDS
    else:
      vocab = noise
    words.append(vocab[rng.integers(len(vocab))])
  return " ".join(words)


def _top_k_gumbel(rng: np.random.Generator, logits: np.ndarray,
                  k: int) -> np.ndarray:
  """Samples k distinct indices from softmax(logits), in draw order."""
  keys = logits + rng.gumbel(size=logits.shape)
  k = min(k, int(np.isfinite(logits).sum()))
  top = np.argpartition(-keys, k - 1)[:k]
  return top[np.argsort(-keys[top])]


def generate(*, num_users: int = 2000, num_items: int = 3000,
             num_topics: int = 12, seed: int = 0) -> SyntheticData:
  """Draws the whole synthetic dataset in memory (deterministic by seed)."""
  if num_users < 1 or num_items < 200 or num_topics < 2:
    raise ValueError(
        "synthetic data needs num_users >= 1, num_items >= 200 and "
        f"num_topics >= 2; got {num_users}, {num_items}, {num_topics}")
  vocab_rng, item_rng, user_rng, imp_rng = [
      np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
  names, subcats, topic_words, noise = _vocabularies(vocab_rng, num_topics)

  # Items.
  theta, main = _item_topics(item_rng, num_items, num_topics)  # [N, T], [N]
  wrong = item_rng.random(num_items) < _CATEGORY_NOISE
  shown = np.where(
      wrong, (main + item_rng.integers(1, num_topics, size=num_items))
      % num_topics, main)
  sub = item_rng.integers(_SUBCATEGORIES_PER_TOPIC, size=num_items)
  categories = [names[t] for t in shown]
  subcategories = [subcats[t][s] for t, s in zip(shown, sub)]
  titles = [_text(item_rng, theta[i], int(item_rng.integers(6, 13)),
                  topic_words, noise) for i in range(num_items)]
  abstracts = [_text(item_rng, theta[i], int(item_rng.integers(15, 31)),
                     topic_words, noise) for i in range(num_items)]
  quality = item_rng.normal(0.0, _QUALITY_STD, size=num_items)  # [N]
  ranks = item_rng.permutation(num_items) + 1
  log_pop = -_ZIPF_EXPONENT * np.log(ranks)  # [N]

  # Users: sparse preferences, history lengths with a cold share.
  prefs = user_rng.dirichlet(np.full(num_topics, _PREF_ALPHA),
                             size=num_users)  # [U, T]
  cold = user_rng.random(num_users) < _COLD_SHARE
  warm_len = 6 + np.minimum(user_rng.geometric(1.0 / 20, size=num_users), 74)
  hist_len = np.where(cold, user_rng.integers(1, 6, size=num_users),
                      np.minimum(warm_len, num_items // 4))
  num_imps = 1 + user_rng.poisson(_MEAN_IMPRESSIONS_PER_USER - 1,
                                  size=num_users)

  # Impressions, user by user in time order; a user's clicks join its history.
  rows = []  # (time, user, history, candidates, labels, scores)
  for u in range(num_users):
    logits = _PREF_SCALE * theta @ prefs[u] + quality  # [N]
    history = list(_top_k_gumbel(
        user_rng, logits + 0.5 * log_pop, int(hist_len[u])))
    times = np.sort(imp_rng.integers(_SPAN_SECONDS, size=num_imps[u]))
    for t in times:
      pool = log_pop.copy()
      pool[history] = -np.inf  # Never show an item the user already read.
      n = int(imp_rng.integers(5, 21))
      cands = _top_k_gumbel(imp_rng, pool, n)
      noisy = logits[cands] + imp_rng.gumbel(size=len(cands))
      clicks = 2 if imp_rng.random() < _SECOND_CLICK_PROB else 1
      order = np.argsort(-noisy)
      labels = np.zeros(len(cands), np.int8)
      labels[order[:clicks]] = 1
      rows.append((int(t), u, np.array(history, np.int64), cands, labels,
                   logits[cands]))
      history.extend(int(c) for c in cands[order[:clicks]])

  # Split by time: train first, then dev, then test.
  order = sorted(range(len(rows)), key=lambda r: (rows[r][0], rows[r][1]))
  n_train = int(round(_TRAIN_FRACTION * len(order)))
  n_dev = int(round(_DEV_FRACTION * len(order)))
  bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev),
            "test": (n_train + n_dev, len(order))}
  splits = {}
  for name, (lo, hi) in bounds.items():
    part = [rows[r] for r in order[lo:hi]]
    splits[name] = _pack(part)
  return SyntheticData(categories, subcategories, titles, abstracts, theta,
                       prefs, quality, splits)


def _pack(rows) -> SyntheticSplit:
  """Packs (time, user, history, cands, labels, scores) rows ragged."""
  def offsets(arrays):
    return np.concatenate([[0], np.cumsum([len(a) for a in arrays])]
                          ).astype(np.int64)

  def flat(arrays, dtype):
    return (np.concatenate(arrays).astype(dtype) if arrays
            else np.zeros(0, dtype))

  hists = [r[2] + 1 for r in rows]  # Item numbers are 1-based.
  cands = [r[3] + 1 for r in rows]
  return SyntheticSplit(
      users=np.array([r[1] + 1 for r in rows], np.int64),
      times=np.array([r[0] for r in rows], np.int64),
      history_offsets=offsets(hists),
      history_items=flat(hists, np.int64),
      cand_offsets=offsets(cands),
      cand_items=flat(cands, np.int64),
      cand_labels=flat([r[4] for r in rows], np.int8),
      cand_scores=flat([r[5] for r in rows], np.float64))


def impression_auc(scores: np.ndarray, labels: np.ndarray,
                   offsets: np.ndarray) -> np.ndarray:
  """Per-impression ROC AUC (ties count half); NaN where one class is absent."""
  aucs = np.full(len(offsets) - 1, np.nan)
  for m in range(len(offsets) - 1):
    s = scores[offsets[m]:offsets[m + 1]]
    y = labels[offsets[m]:offsets[m + 1]].astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) and len(neg):
      diff = pos[:, None] - neg[None, :]  # [P, Q]
      aucs[m] = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
  return aucs


def oracle(data: SyntheticData, seed: int = 0) -> dict:
  """GAUCs per split of the planted noise-free logits ("auc"), of the planted
  topic preference alone ("topic_auc": without item quality, which no text
  reveals, so the most a content model can hope for) and of a random scorer.
  """
  rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[4])
  result = {}
  random_aucs = []

  def gauc(scores, split):
    aucs = impression_auc(scores, split.cand_labels, split.cand_offsets)
    return float(np.nanmean(aucs)) if len(aucs) else None

  for name, split in data.splits.items():
    topic = split.cand_scores - data.quality[split.cand_items - 1]
    rand = impression_auc(rng.random(len(split.cand_items)),
                          split.cand_labels, split.cand_offsets)
    random_aucs.append(rand)
    result[name] = {"auc": gauc(split.cand_scores, split),
                    "topic_auc": gauc(topic, split),
                    "random_auc": (float(np.nanmean(rand)) if len(rand)
                                   else None),
                    "impressions": int(len(split.users))}
  pooled = np.concatenate(random_aucs)
  result["random_auc"] = float(np.nanmean(pooled)) if len(pooled) else None
  return result


def _time_string(seconds: int) -> str:
  """MIND's time format, e.g. "11/15/2019 8:00:00 AM"."""
  t = _START_TIME + datetime.timedelta(seconds=int(seconds))
  hour = t.hour % 12 or 12
  half = "AM" if t.hour < 12 else "PM"
  return f"{t.month}/{t.day}/{t.year} {hour}:{t.minute:02d}:{t.second:02d} {half}"


def _news_tsv(data: SyntheticData) -> str:
  lines = [f"N{k + 1}\t{data.categories[k]}\t{data.subcategories[k]}\t"
           f"{data.titles[k]}\t{data.abstracts[k]}\t\t[]\t[]\n"
           for k in range(len(data.titles))]
  return "".join(lines)


def _behaviors_tsv(split: SyntheticSplit) -> str:
  hist = np.char.add("N", split.history_items.astype(str))
  cand = np.char.add(np.char.add("N", split.cand_items.astype(str)),
                     np.char.add("-", split.cand_labels.astype(str)))
  lines = []
  for m in range(len(split.users)):
    h = " ".join(hist[split.history_offsets[m]:split.history_offsets[m + 1]])
    c = " ".join(cand[split.cand_offsets[m]:split.cand_offsets[m + 1]])
    lines.append(f"{m + 1}\tU{split.users[m]}\t{_time_string(split.times[m])}"
                 f"\t{h}\t{c}\n")
  return "".join(lines)


def write_synthetic(out_dir: str, *, num_users: int = 2000,
                    num_items: int = 3000, num_topics: int = 12,
                    seed: int = 0) -> dict:
  """Writes news.tsv, <split>/behaviors.tsv and oracle.json; returns the oracle.

  The oracle dict maps each split to {"auc", "topic_auc", "random_auc",
  "impressions"} and holds the pooled "random_auc" at the top level.
  """
  data = generate(num_users=num_users, num_items=num_items,
                  num_topics=num_topics, seed=seed)
  result = oracle(data, seed)
  os.makedirs(out_dir, exist_ok=True)
  atomic_write_text(os.path.join(out_dir, "news.tsv"), _news_tsv(data))
  for name, split in data.splits.items():
    atomic_write_text(os.path.join(out_dir, name, "behaviors.tsv"),
                      _behaviors_tsv(split))
  atomic_write_text(os.path.join(out_dir, "oracle.json"),
                    json.dumps(result, indent=2, sort_keys=True) + "\n")
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  result = write_synthetic(
      FLAGS.out_dir, num_users=FLAGS.num_users, num_items=FLAGS.num_items,
      num_topics=FLAGS.num_topics, seed=FLAGS.seed)
  print(f"wrote {FLAGS.out_dir}")
  for name in SPLITS:
    r = result[name]
    print(f"  {name:5s} impressions={r['impressions']:6d} "
          f"oracle_gauc={r['auc']:.4f} topic_gauc={r['topic_auc']:.4f} "
          f"random_gauc={r['random_auc']:.4f}")
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  # Flags are defined only when run as a script, so importing this module
  # never clashes with the flags of the program that imports it.
  from absl import app
  from absl import flags

  flags.DEFINE_string("out_dir", None, "Folder to write the dataset into.")
  flags.DEFINE_integer("num_users", 2000, "Number of users.")
  flags.DEFINE_integer("num_items", 3000, "Number of items.")
  flags.DEFINE_integer("num_topics", 12, "Number of planted topics.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.mark_flag_as_required("out_dir")
  FLAGS = flags.FLAGS
  app.run(main)
