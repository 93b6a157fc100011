"""The built-in tasks: a toy "write words about a topic" task whose true per-token reward is known, its data, and
the tokenizer trained on it. `python train.py` runs the whole pipeline on it, so every policy is judged against
the truth (the gold reward), not only against its own reward model.

    task = WordTask(seed=0, **TASKS["credit"])     # gold_reward(prompt, response), word_rewards, write_data
    tok = train_tokenizer(task.corpus(), vocab_size=512)
"""
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import tokenizers

from data import DataError
from hf import Tokenizer

TOPIC_NAMES = ["cats", "ships", "music", "rain", "forest", "bread", "stars", "trains",
               "gold", "snow", "chess", "bees", "clocks", "rivers", "salt", "kites"]
WORDS = ["red", "blue", "green", "big", "small", "fast", "slow", "warm", "cold", "soft",
         "hard", "old", "new", "dark", "light", "loud", "quiet", "sweet", "sour", "sharp",
         "round", "tall", "short", "wild", "calm", "bright", "dull", "fresh", "dry", "wet",
         "happy", "sad", "brave", "shy", "proud", "kind", "tiny", "huge", "early", "late",
         "rich", "poor", "clean", "dirty", "heavy", "empty", "full", "thin", "thick", "deep",
         "flat", "smooth", "rough", "plain", "fancy", "lucky", "busy", "lazy", "noisy", "golden",
         "silver", "pink", "gray", "brown"]


# The built-in tasks, by name (train.py --task, sweep.py). "words": short responses, the 45-second demo.
# "credit": responses of 24-48 words whose gold reward is a sum of context-dependent per-word terms, and noisy
# labels (label_temperature 3: a labeller that often prefers the worse response), so a sequence-level RM trained on
# a few thousand pairs is imperfect, as real ones are, and credit assignment over ~40 tokens matters.
TASKS = {
    "words": dict(),
    "credit": dict(n_topics=8, min_words=24, max_words=48, target_words=36, length_cost=0.5, pair_weight=0.5,
                   label_temperature=3.0),
}


def _sigmoid(x):
    # split by sign so exp never overflows
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass
class WordTask:
    """Prompt "topic <name>"; response: space-separated words. The gold reward of n words is

        sum_i (scores[topic, w_i] + pair_weight * pairs[w_{i-1}, w_i])  -  length_cost * |n - target_words|

    (pairs: a context term, how well a word follows the one before it; 0 for the first word and with the
    default pair_weight 0)

    a sum of per-word terms plus a constant: word i earns scores[topic, w_i] + length_cost while
    i < target_words and scores[topic, w_i] - length_cost after, on top of -length_cost * target_words.
    That is the true per-token reward when each word is one token, which the tokenizer trained on
    corpus() makes sure of. The length term has a target, not only a cost: with a pure per-word cost the
    empty response beats the average one, and PPO against a small learned RM collapses onto it."""
    seed: int = 0  # seeds the score table
    n_topics: int = 4  # number of distinct prompts "topic <name>"
    n_words: int = 48  # response vocabulary size (first n_words of WORDS)
    min_words: int = 2  # neutral response length range, inclusive
    max_words: int = 10
    length_cost: float = 0.5  # gold reward pays this per word of distance from target_words
    target_words: int = 6  # the length the gold reward prefers (0: a plain per-word cost)
    unknown_word_score: float = -2.0  # score of a generated word not in the vocabulary
    pair_weight: float = 0.0  # weight of the context term pairs[previous word, word] (0: words score alone)
    label_temperature: float = 1.0  # preference labels: P(a preferred) = sigmoid((gold(a) - gold(b)) / this)
    topics: list = field(init=False, repr=False)
    words: list = field(init=False, repr=False)
    scores: np.ndarray = field(init=False, repr=False)  # (n_topics, n_words) ~ N(0, 1)

    def __post_init__(self):
        if not 1 <= self.n_topics <= len(TOPIC_NAMES):
            raise ValueError(f"n_topics must be in [1, {len(TOPIC_NAMES)}], got {self.n_topics}")
        if not 1 <= self.n_words <= len(WORDS):
            raise ValueError(f"n_words must be in [1, {len(WORDS)}], got {self.n_words}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        self.topics = TOPIC_NAMES[:self.n_topics]
        self.words = WORDS[:self.n_words]
        self._word_index = {w: i for i, w in enumerate(self.words)}
        rng = np.random.default_rng(self.seed)
        self.scores = rng.standard_normal((self.n_topics, self.n_words))
        # drawn after scores, so the default task's table is what it always was
        self.pairs = rng.standard_normal((self.n_words, self.n_words)) if self.pair_weight else None

    def spec(self) -> dict:
        """The fields that define the task (its table follows from them): what task.json holds (load_task)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def prompt_text(self, topic: int) -> str:
        return f"topic {self.topics[topic]}"

    def sample_prompt(self, rng: np.random.Generator) -> str:
        return self.prompt_text(int(rng.integers(self.n_topics)))

    def sample_response(self, rng: np.random.Generator) -> str:
        """The neutral distribution: length uniform in [min_words, max_words], words uniform."""
        n = int(rng.integers(self.min_words, self.max_words + 1))
        return " ".join(self.words[int(i)] for i in rng.integers(self.n_words, size=n))

    def topic_of(self, prompt) -> int:
        """Topic index of a prompt: "topic <name>", or a message list whose last message is that."""
        if isinstance(prompt, list):
            prompt = prompt[-1]["content"]
        parts = prompt.split()
        if len(parts) != 2 or parts[0] != "topic" or parts[1] not in self.topics:
            raise ValueError(f"not a WordTask prompt: {prompt!r}")
        return self.topics.index(parts[1])

    def word_rewards(self, prompt, response: str) -> list[float]:
        """One true reward term per whitespace word: scores[topic, word] + pair_weight * pairs[previous word, word]
        +- length_cost (+ before the target length, - after). gold_reward = sum of these - length_cost *
        target_words."""
        t = self.topic_of(prompt)
        out, prev = [], None
        for w in response.split():
            i = self._word_index.get(w)
            score = float(self.scores[t, i]) if i is not None else self.unknown_word_score
            if self.pairs is not None and i is not None and prev is not None:
                score += self.pair_weight * float(self.pairs[prev, i])
            out.append(score + (self.length_cost if len(out) < self.target_words else -self.length_cost))
            prev = i
        return out

    def gold_reward(self, prompt, response: str) -> float:
        return float(sum(self.word_rewards(prompt, response))) - self.length_cost * self.target_words

    def _pair(self, rng):
        """A preference pair labelled by Bradley-Terry: P(a preferred) = sigmoid(gold(a) - gold(b))."""
        prompt = self.sample_prompt(rng)
        a = self.sample_response(rng)
        b = self.sample_response(rng)
        while b == a:  # an identical pair carries no preference signal
            b = self.sample_response(rng)
        p_a = _sigmoid((self.gold_reward(prompt, a) - self.gold_reward(prompt, b)) / self.label_temperature)
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def write_data(self, out_dir, n_sft: int, n_pref: int, n_prompts: int, n_eval: int, rng_seed) -> dict[str, Path]:
        """Write sft / prefs / prompts / eval_prefs / eval_prompts .jsonl under out_dir; returns their paths."""
        rng = np.random.default_rng(rng_seed)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = {
            "sft": [{"prompt": self.sample_prompt(rng), "response": self.sample_response(rng)} for _ in range(n_sft)],
            "prefs": [self._pair(rng) for _ in range(n_pref)],
            "prompts": [{"prompt": self.sample_prompt(rng)} for _ in range(n_prompts)],
            "eval_prefs": [self._pair(rng) for _ in range(n_eval)],
            "eval_prompts": [{"prompt": self.sample_prompt(rng)} for _ in range(n_eval)],
        }
        paths = {}
        for name, objs in rows.items():
            paths[name] = out_dir / f"{name}.jsonl"
            with open(paths[name], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(o) + "\n" for o in objs)
        return paths

    def corpus(self) -> list[str]:
        """Texts for the tokenizer: every prompt in the plain format, and every word the way a response
        holds it (" word"). The corpus is tiny, so a ~512 vocab has room for a merge up to each whole
        piece: every word becomes one token and per-word rewards are per-token rewards."""
        prompts = [f"user: {self.prompt_text(t)}\nassistant:" for t in range(self.n_topics)]
        return prompts + [" " + " ".join(self.words)]


def load_task(spec: str, seed: int = 0) -> WordTask:
    """A built-in task by name (TASKS, with the seed of its table) or from a task.json (WordTask.spec(), as
    `train.py all` writes it under <out>/data: the seed and any overrides included)."""
    if spec in TASKS:
        return WordTask(seed=seed, **TASKS[spec])
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--task {spec!r}: neither a built-in task ({', '.join(TASKS)}) nor a task.json file")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        return WordTask(**fields)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: not a task description ({e})") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on texts, with special tokens <|bos|>, <|eos|>, <|pad|> (ids 0, 1, 2).
    Byte level means any text encodes and decodes back exactly (no unknown token)."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    # add_prefix_space=False so encode(text) round-trips without an invented leading space
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tk.train_from_iterator(list(texts), trainer=trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    return Tokenizer(tk, config, source="trained tokenizer")
