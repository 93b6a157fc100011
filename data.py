"""Data for every stage: the batch layout, JSONL readers that name the file, line and key of a mistake, and
the built-in tasks whose true per-token reward is known.

    batch = collate(prompts, responses, pad_id)   # the one batch layout, below
    rows = read_sft("sft.jsonl")                  # list[SFTRow]; read_preferences, read_prompts
    task = WordTask(seed=0, **TASKS["credit"])    # gold_reward(prompt, response), write_data(...)

The token ids come from hf.Tokenizer (the checkpoint's own tokenizer, special tokens and chat template).
WordTask is the built-in demo: a toy "write words about a topic" task whose true reward is a known
sum of per-word scores, so SFT -> DPO -> RM -> PPO can be judged against the true per-token reward.
"""
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------
# The batch layout. Every stage uses one: prompts LEFT-padded to a common width P, responses RIGHT-padded to
# width R, concatenated into (B, P+R):
#
#     [pad pad p1 p2 p3 | r1 r2 EOS pad]      input_ids, attention_mask (B, P+R); response_mask (B, R)
#
# Left padding puts every prompt's last token in column P-1, so generation starts in the same column for every
# row, and the response token in column P+j is predicted by the logits in column P+j-1 (train.response_logprobs).
# Position ids are cumsum(mask) - 1 (model.Llama.forward), so padding never changes a row's logits.


def _pad(seqs, pad_id, left):
    """Pad id lists to the longest. Returns ids (B, T) long, mask (B, T) long, 1 on real ids."""
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_left(seqs, pad_id):
    """Left-pad id lists to the longest P. Returns ids (B, P) long, mask (B, P) long, 1 on real ids."""
    return _pad(seqs, pad_id, left=True)


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Prompts left-padded to P, responses right-padded to R, side by side.
    Returns input_ids (B, P+R) long, attention_mask (B, P+R) long (1 on real ids),
    response_mask (B, R) bool (True on real response ids), prompt_len P.
    The response id in column P+j is predicted by the logits in column P+j-1."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    p_ids, p_mask = pad_left(prompts, pad_id)
    r_ids, r_mask = _pad(responses, pad_id, left=False)
    return {
        "input_ids": torch.cat([p_ids, r_ids], dim=1),
        "attention_mask": torch.cat([p_mask, r_mask], dim=1),
        "response_mask": r_mask.bool(),
        "prompt_len": p_ids.shape[1],
    }


# -----------------------------------------------------------------------------
# JSONL readers

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad data file, with the place: "{path}:{lineno}: key '{key}': {what}"."""


@dataclass
class SFTRow:
    prompt: list[Message]
    response: str
    where: str = field(default="", compare=False)  # "file:line", for errors raised when the row is encoded


@dataclass
class PrefRow:
    prompt: list[Message]
    chosen: str
    rejected: str
    where: str = field(default="", compare=False)


@dataclass
class PromptRow:
    prompt: list[Message]
    where: str = field(default="", compare=False)


def _err(path, lineno, key, what):
    where = f"{path}:{lineno}: key '{key}'" if key is not None else f"{path}:{lineno}"
    return DataError(f"{where}: {what}")


def _lines(path):
    """Yield (lineno, obj) for each non-blank line of a JSONL file; lineno is 1-based."""
    n_rows = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _err(path, lineno, None, f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as e:
                raise _err(path, lineno, None, f"invalid JSON: {e}") from None
            except DuplicateKey as e:
                raise _err(path, lineno, e.args[0], "appears twice in one object (which one is meant?)") from None
            except RecursionError:
                raise _err(path, lineno, None, "invalid JSON: nested deeper than Python can read") from None
            if not isinstance(obj, dict):
                raise _err(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            n_rows += 1
            yield lineno, obj
    if n_rows == 0:
        raise DataError(f"{path}: no rows (the file is empty)")


class DuplicateKey(ValueError):
    """A JSON object with one key twice (json.loads would silently keep the last)."""


def _no_duplicate_keys(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise DuplicateKey(k)
        seen.add(k)
    return dict(pairs)


def _get(obj, key, path, lineno):
    if key not in obj:
        raise _err(path, lineno, key, "missing")
    return obj[key]


def _text(x, key, path, lineno):
    """A non-blank string."""
    if not isinstance(x, str):
        raise _err(path, lineno, key, f"expected str, got {type(x).__name__}")
    if not x.strip():
        raise _err(path, lineno, key, "empty or whitespace-only")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to half a surrogate pair: no text at all
        raise _err(path, lineno, key, f"holds a lone surrogate ({x[e.start]!r} at character {e.start + 1}): not "
                                      f"valid Unicode text") from None
    return x


def _messages(x, key, path, lineno):
    """A non-empty list of {"role", "content"} dicts, validated; returns clean copies."""
    if not isinstance(x, list):
        raise _err(path, lineno, key, f"expected list of messages, got {type(x).__name__}")
    if not x:
        raise _err(path, lineno, key, "empty message list")
    out = []
    for i, m in enumerate(x):
        k = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _err(path, lineno, k, f"expected a message object, got {type(m).__name__}")
        if "role" not in m:
            raise _err(path, lineno, k + ".role", "missing")
        role = m["role"]
        if role not in ROLES:
            raise _err(path, lineno, k + ".role", f"unknown role {role!r}, expected one of {ROLES}")
        if "content" not in m:
            raise _err(path, lineno, k + ".content", "missing")
        out.append({"role": role, "content": _text(m["content"], k + ".content", path, lineno)})
    return out


def _prompt(x, key, path, lineno):
    """A prompt: a string (-> one user message) or a message list not ending with the assistant."""
    if isinstance(x, str):
        return [{"role": "user", "content": _text(x, key, path, lineno)}]
    if not isinstance(x, list):
        raise _err(path, lineno, key, f"expected str or list of messages, got {type(x).__name__}")
    msgs = _messages(x, key, path, lineno)
    # the template appends the assistant cue; a prompt ending in an assistant turn would give two
    if msgs[-1]["role"] == "assistant":
        raise _err(path, lineno, key, "last message is 'assistant'; a prompt must end with a user or system turn")
    return msgs


def _split_conversation(x, key, path, lineno):
    """A conversation ending in the assistant's turn -> (earlier messages, response text)."""
    msgs = _messages(x, key, path, lineno)
    if msgs[-1]["role"] != "assistant":
        raise _err(path, lineno, key, f"last message must be 'assistant', got {msgs[-1]['role']!r}")
    return msgs[:-1], msgs[-1]["content"]


def _one_form(obj, plain: tuple, chat: str, path, lineno):
    """A row holds one data form: mixing {prompt, response} with {messages} would leave which one counts a guess."""
    mixed = [k for k in plain if k in obj]
    if chat in obj and mixed:
        raise _err(path, lineno, chat, f"the row also has {mixed}: give either {' and '.join(plain)}, or {chat}")


def read_sft(path) -> list[SFTRow]:
    """{"prompt": str | messages, "response": str}, or {"messages": [..., assistant]}."""
    rows = []
    for lineno, obj in _lines(path):
        _one_form(obj, ("prompt", "response"), "messages", path, lineno)
        if "prompt" not in obj and "messages" in obj:
            prompt, response = _split_conversation(obj["messages"], "messages", path, lineno)
            if not prompt:
                raise _err(path, lineno, "messages", "no messages before the assistant's response")
            if prompt[-1]["role"] == "assistant":
                raise _err(path, lineno, "messages", "two assistant turns at the end; "
                           "the prompt must end with a user or system turn")
        else:
            if "prompt" not in obj:
                raise _err(path, lineno, "prompt", "missing (expected 'prompt' and 'response', or 'messages')")
            prompt = _prompt(obj["prompt"], "prompt", path, lineno)
            response = _text(_get(obj, "response", path, lineno), "response", path, lineno)
        rows.append(SFTRow(prompt, response, f"{path}:{lineno}"))
    return rows


def _pref_side(x, key, path, lineno):
    """chosen / rejected: a string, or a whole conversation ending in the assistant's answer.
    Returns (earlier messages or None, response text)."""
    if isinstance(x, str):
        return None, _text(x, key, path, lineno)
    if not isinstance(x, list):
        raise _err(path, lineno, key, f"expected str or list of messages, got {type(x).__name__}")
    earlier, response = _split_conversation(x, key, path, lineno)
    return earlier or None, response


def read_preferences(path) -> list[PrefRow]:
    """{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}.

    Message-list chosen/rejected (UltraFeedback-binarized style) hold the whole conversation; the
    response is the content of the last message, which must be the assistant's. The prompt rule:
      1. "prompt" is a message list -> it is the prompt (the lists' earlier messages are ignored).
      2. "prompt" is a string and `chosen` has messages before its answer -> those messages are the
         prompt (they carry the system turn / multi-turn history the string drops); `rejected`'s
         earlier messages, when present, must be the same conversation.
      3. otherwise -> [{"role": "user", "content": prompt}].
    """
    rows = []
    for lineno, obj in _lines(path):
        raw_prompt = _get(obj, "prompt", path, lineno)
        prompt = _prompt(raw_prompt, "prompt", path, lineno)
        chosen_ctx, chosen = _pref_side(_get(obj, "chosen", path, lineno), "chosen", path, lineno)
        rejected_ctx, rejected = _pref_side(_get(obj, "rejected", path, lineno), "rejected", path, lineno)
        if isinstance(raw_prompt, str) and chosen_ctx is not None:
            if rejected_ctx is not None and rejected_ctx != chosen_ctx:
                raise _err(path, lineno, "rejected", "earlier messages differ from those of 'chosen'; "
                           "a pair must share its prompt")
            prompt = _prompt(chosen_ctx, "chosen", path, lineno)
        rows.append(PrefRow(prompt, chosen, rejected, f"{path}:{lineno}"))
    return rows


def read_prompts(path) -> list[PromptRow]:
    """{"prompt": str | messages} or {"messages": [...]} (no trailing assistant message)."""
    rows = []
    for lineno, obj in _lines(path):
        _one_form(obj, ("prompt",), "messages", path, lineno)
        key = "prompt" if "prompt" in obj or "messages" not in obj else "messages"
        rows.append(PromptRow(_prompt(_get(obj, key, path, lineno), key, path, lineno), f"{path}:{lineno}"))
    return rows


# -----------------------------------------------------------------------------
# WordTask: a synthetic task with a known per-token reward

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
    """A built-in task by name (data.TASKS, with the seed of its table) or from a task.json (WordTask.spec(), as
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


def row_texts(row) -> list[str]:
    """Every text of a data row (message contents, responses), for checks that look at the words themselves."""
    out = []

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            walk(x.get("content"))
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for f in dataclasses.fields(row):
        if f.name != "where":
            walk(getattr(row, f.name))
    return out
