"""Data for every stage: the one batch layout, JSONL readers that name the file, line and key of a mistake, and the
encoding of rows into token ids with the checks that they fit.

    batch = collate(prompts, responses, pad_id)   # the one batch layout, below
    rows = read_sft("sft.jsonl")                  # list[SFTRow]; read_preferences, read_prompts
    ids = encode_examples(rows, tok, 256, 256, lambda r: [r.response])   # (prompt ids, response ids) per row

The token ids come from hf.Tokenizer (the checkpoint's own tokenizer, special tokens and chat template); the
built-in task's data is written by task.py in these same formats.
"""
import dataclasses
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from checks import UserError
from parallel import D, all_sum, print0, progress_iter, to_device

# -----------------------------------------------------------------------------
# The batch layout. Every stage uses one: prompts LEFT-padded to a common width P, responses RIGHT-padded to
# width R, concatenated into (B, P+R):
#
#     [pad pad p1 p2 p3 | r1 r2 EOS pad]      input_ids, attention_mask (B, P+R); response_mask (B, R)
#
# Left padding puts every prompt's last token in column P-1, so generation starts in the same column for every
# row, and the response token in column P+j is predicted by the logits in column P+j-1 (ppo.response_logprobs).
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


# Which examples each step sees


def global_batch(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of global batch `step`: epochs are seeded permutations of the n examples, a global batch is a
    contiguous slice of one. Derived from (seed, step) alone, so a resumed run sees exactly the batches the
    uninterrupted run would have."""
    epoch, k = divmod(step, n // batch_size)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """This rank's share of global batch `step`: rank r takes every world-th example of it."""
    return global_batch(step, n, batch_size, seed)[D.rank::D.world]


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from (seed, step, rank, ...): every random draw in a step is a function of these."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def response_texts(buf: dict, tok) -> list[str]:
    """The decoded text of every sampled response (its real tokens, the stop id dropped by decode)."""
    P, mask = buf["prompt_len"], buf["response_mask"]
    return [tok.decode(buf["input_ids"][r, P:][mask[r]].tolist()) for r in range(mask.shape[0])]


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


# -----------------------------------------------------------------------------
# Rows -> token ids, and the checks that they fit


ENCODE_CHUNK = 4096  # rows rendered and tokenized together: the tokenizer's threads get a batch, memory stays bounded


@contextmanager
def row_errors(row):
    """A DataError raised while encoding this row names its file and line."""
    try:
        yield
    except DataError as e:
        raise DataError(f"{row.where}: {e}") from None


def encode_examples(rows, tok, max_prompt_len: int, max_response_len: int, answers=lambda r: []) -> list[tuple]:
    """Every row as (prompt ids, *response ids); answers(row) gives its response texts (none for a prompt file,
    [response] for SFT, [chosen, rejected] for preferences). Rows are rendered one by one (a template's refusal names
    the row's file and line), and every distinct text of a chunk is tokenized in one batch on the tokenizer's own
    threads while the next chunk renders, so a 60k-row file costs the same per row as a small one (`python bench.py
    data`). A prompt longer than max_prompt_len loses the middle of its longest message (hf.Tokenizer.fit_prompt), a
    response its end beyond max_response_len; how many of each is printed. Text that spells a special token becomes
    that control token, as transformers tokenizes it too: legal, but rarely meant, so it is warned about."""
    out, cuts = [], {"prompts": [], "responses": 0}
    with ThreadPoolExecutor(1) as tokenizer_thread:
        pending = None
        for lo in range(0, len(rows) + ENCODE_CHUNK, ENCODE_CHUNK):
            chunk = rows[lo:lo + ENCODE_CHUNK]
            parts = []
            for r in chunk:  # (Python, while the tokenizer's threads encode the chunk before)
                with row_errors(r):
                    prompt = tok.prompt_text(r.prompt)
                    parts.append((prompt, [tok.response_texts(r.prompt, a, prompt) for a in answers(r)]))
            texts = list(dict.fromkeys(t for p, rs in parts for t in [p, *(x for texts in rs for x in texts)]))
            if pending is not None:
                out += assemble(*pending, tok, max_prompt_len, max_response_len, answers, cuts)
            pending = (chunk, parts, texts, tokenizer_thread.submit(tok.encode_many, texts)) if chunk else None
    where = rows[0].where.rsplit(":", 1)[0] if rows else ""
    if cuts["prompts"]:
        c = cuts["prompts"]
        print0(f"{where}: {len(c)} of {len(rows)} prompts were longer than max_prompt_len {max_prompt_len}: the middle "
               f"of their longest message was cut ({min(c)} to {max(c)} tokens, {sum(c) / len(c):.0f} on average)")
    if cuts["responses"]:
        print0(f"{where}: {cuts['responses']} responses were longer than max_response_len {max_response_len}: cut at "
               f"their end (they have no EOS)")
    warn_special_text(rows, tok)
    return out


def assemble(chunk, parts, texts, encoded, tok, max_prompt_len, max_response_len, answers, cuts) -> list[tuple]:
    """The ids of each row of a chunk from its texts' ids (encoded: the tokenizer thread's future)."""
    ids = dict(zip(texts, encoded.result()))
    out = []
    for r, (p, rs) in zip(chunk, parts):
        with row_errors(r):
            prompt, cut = tok.fit_prompt(r.prompt, tok.prompt_ids(ids[p]), max_prompt_len)
            responses = [tok.response_ids(a, t, [ids[x] for x in t], 1 << 62) for a, t in zip(answers(r), rs)]
        cuts["prompts"] += [cut] if cut else []
        cuts["responses"] += sum(len(x) > max_response_len for x in responses)
        out.append((prompt, *(x[:max_response_len] for x in responses)))
    return out


def warn_special_text(rows, tok):
    """Name the first row whose text spells one of the tokenizer's special tokens, and how many rows do."""
    texts = tok.special_texts()
    if not texts:
        return
    specials = re.compile("|".join(map(re.escape, texts)))
    odd = [(r.where, m.group(0)) for r in rows for text in row_texts(r) if (m := specials.search(text))]
    if odd:
        rows_with = len({w for w, _ in odd})
        print0(f"warning: {odd[0][0]}: the text holds {odd[0][1]!r}, which the tokenizer reads as that special token "
               f"(a control token mid-text; transformers does the same); {rows_with} of {len(rows)} rows do")


def check_context(rows, seqs, max_seq_len: int):
    """Every example must fit the model's context (config.json max_position_embeddings); name the first that
    does not. seqs: per row, the id lists that are concatenated into one sequence."""
    for r, parts in zip(rows, seqs):
        n = max(len(parts[0]) + len(p) for p in parts[1:])
        if n > max_seq_len:
            raise UserError(f"{r.where}: prompt + response is {n} tokens, more than the model's context of "
                            f"{max_seq_len} (config.json max_position_embeddings): lower --max_prompt_len or "
                            f"--max_response_len")


def check_pairs(rows, pairs, path: str):
    """A pair whose chosen and rejected responses are the same ids carries no preference; all of them: an error."""
    same = [r.where for r, (_, c, rj) in zip(rows, pairs) if c == rj]
    if len(same) == len(pairs):
        raise UserError(f"{path}: in every pair the chosen and rejected responses are identical (after tokenizing): "
                        f"nothing to learn from")
    if same:
        print0(f"warning: {len(same)} of {len(pairs)} pairs have identical chosen and rejected responses "
               f"(first: {same[0]}); they add nothing but a constant to the loss")


def chunks(xs: list, size: int) -> list[list]:
    """xs in consecutive pieces of `size` (the last may be shorter): micro-batches of row indices."""
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def pair_batch(pairs, tok) -> dict:
    """Id triples (prompt, chosen, rejected) -> one batch: [chosen rows; rejected rows], the same prompt layout for both
    halves (one forward pass scores both), on this rank's device."""
    prompts = [p for p, _, _ in pairs]
    return to_device(collate(prompts + prompts, [c for _, c, _ in pairs] + [r for _, _, r in pairs], tok.pad_id))


@torch.no_grad()
def pair_values(fn, pairs, tok, micro: int, bar: str = "") -> torch.Tensor:
    """(n, 2) values [chosen, rejected] of every pair, fn(batch) -> (2k,) for a pair batch of k. Each rank
    computes every world-th pair and all ranks receive the whole table. bar: a progress bar with this title."""
    n = len(pairs)
    out = torch.zeros(n, 2, dtype=torch.float64, device=D.device)
    mine = list(range(D.rank, n, D.world))
    forwards = math.ceil(math.ceil(n / D.world) / micro)  # the same number on every rank (FSDP)
    for k in progress_iter(range(forwards), bar):
        idx = mine[k * micro:(k + 1) * micro]
        v = fn(pair_batch([pairs[i] for i in idx or [0]], tok)).double()
        if idx:
            out[idx, 0], out[idx, 1] = v[:len(idx)], v[len(idx):]
    return all_sum(out)
