"""Tests for data.py: readers (every error path), tokenizer rules, collation layout, WordTask."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import Regex, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import (DataError, PrefRow, PromptRow, SFTRow, Tokenizer, WordTask, collate, pad_left,  # noqa: E402
                  read_preferences, read_prompts, read_sft, train_tokenizer)


def write_lines(tmp_path, lines, name="d.jsonl"):
    """lines: dicts are JSON-encoded, strings written as is."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


# -----------------------------------------------------------------------------
# readers: accepted formats

def test_read_sft_formats(tmp_path):
    sys_msg = {"role": "system", "content": "be brief"}
    path = write_lines(tmp_path, [
        {"prompt": "hi", "response": "hello", "extra": 1},  # unknown keys are ignored
        "",  # blank line skipped
        {"prompt": [sys_msg, {"role": "user", "content": "hi"}], "response": "yo"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ])
    assert read_sft(path) == [
        SFTRow([{"role": "user", "content": "hi"}], "hello"),
        SFTRow([sys_msg, {"role": "user", "content": "hi"}], "yo"),
        SFTRow([{"role": "user", "content": "a"}], "b"),
    ]


def test_read_preferences_strings(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert read_preferences(path) == [PrefRow([{"role": "user", "content": "q"}], "good", "bad")]


def test_read_preferences_ultrafeedback_style(tmp_path):
    user = {"role": "user", "content": "What is 2+2?"}
    system = {"role": "system", "content": "Be exact."}
    path = write_lines(tmp_path, [
        # UltraFeedback-binarized: prompt string, chosen/rejected are the whole conversation
        {"prompt": "What is 2+2?", "chosen": [user, {"role": "assistant", "content": "4"}],
         "rejected": [user, {"role": "assistant", "content": "5"}], "score_chosen": 9.0},
        # earlier messages of chosen win over the prompt string (they carry the system turn)
        {"prompt": "What is 2+2?", "chosen": [system, user, {"role": "assistant", "content": "4"}],
         "rejected": [system, user, {"role": "assistant", "content": "5"}]},
        # lists holding only the answer: the prompt string is used
        {"prompt": "What is 2+2?", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"},
        # a message-list prompt is used as is
        {"prompt": [system, user], "chosen": [user, {"role": "assistant", "content": "4"}], "rejected": "5"},
    ])
    rows = read_preferences(path)
    assert rows[0] == PrefRow([user], "4", "5")
    assert rows[1] == PrefRow([system, user], "4", "5")
    assert rows[2] == PrefRow([user], "4", "5")
    assert rows[3] == PrefRow([system, user], "4", "5")


def test_read_prompts_formats(tmp_path):
    system = {"role": "system", "content": "s"}
    user = {"role": "user", "content": "u"}
    path = write_lines(tmp_path, [{"prompt": "u"}, {"prompt": [system, user]}, {"messages": [user]}])
    assert read_prompts(path) == [PromptRow([user]), PromptRow([system, user]), PromptRow([user])]


# -----------------------------------------------------------------------------
# readers: every error names the file, the 1-based line number and the key

GOOD_SFT = {"prompt": "p", "response": "r"}
GOOD_PREF = {"prompt": "p", "chosen": "c", "rejected": "r"}
USER = {"role": "user", "content": "u"}
ASSISTANT = {"role": "assistant", "content": "a"}

# (reader, bad line, key named in the message or None, words the message must contain)
ERROR_CASES = [
    (read_sft, '{"prompt": "p", "response": ', None, "invalid JSON"),
    (read_sft, "[1, 2]", None, "got list"),
    (read_sft, {"response": "r"}, "prompt", "missing"),
    (read_sft, {"prompt": "p"}, "response", "missing"),
    (read_sft, {"prompt": "p", "response": 5}, "response", "expected str, got int"),
    (read_sft, {"prompt": {"a": 1}, "response": "r"}, "prompt", "got dict"),
    (read_sft, {"prompt": "p", "response": "  \n"}, "response", "empty"),
    (read_sft, {"prompt": "", "response": "r"}, "prompt", "empty"),
    (read_sft, {"prompt": [], "response": "r"}, "prompt", "empty"),
    (read_sft, {"prompt": [{"content": "u"}], "response": "r"}, "prompt[0].role", "missing"),
    (read_sft, {"prompt": [{"role": "user"}], "response": "r"}, "prompt[0].content", "missing"),
    (read_sft, {"prompt": [{"role": "bot", "content": "u"}], "response": "r"}, "prompt[0].role", "unknown role"),
    (read_sft, {"prompt": [USER, {"role": "user", "content": " "}], "response": "r"}, "prompt[1].content", "empty"),
    (read_sft, {"prompt": ["u"], "response": "r"}, "prompt[0]", "got str"),
    (read_sft, {"prompt": [USER, ASSISTANT], "response": "r"}, "prompt", "last message is 'assistant'"),
    (read_sft, {"messages": [USER, USER]}, "messages", "must be 'assistant'"),
    (read_sft, {"messages": [ASSISTANT]}, "messages", "no messages before"),
    (read_sft, {"messages": [USER, {"role": "assistant", "content": ""}]}, "messages[1].content", "empty"),
    (read_preferences, {"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    (read_preferences, {"chosen": "c", "rejected": "r"}, "prompt", "missing"),
    (read_preferences, {"prompt": "p", "chosen": 1.5, "rejected": "r"}, "chosen", "got float"),
    (read_preferences, {"prompt": "p", "chosen": "c", "rejected": " "}, "rejected", "empty"),
    (read_preferences, {"prompt": "p", "chosen": [USER], "rejected": "r"}, "chosen", "must be 'assistant'"),
    (read_preferences, {"prompt": "p", "chosen": "c", "rejected": [USER, {"role": "user", "content": "x"}]},
     "rejected", "must be 'assistant'"),
    (read_preferences, {"prompt": "p", "chosen": [USER, ASSISTANT],
                        "rejected": [{"role": "user", "content": "other"}, ASSISTANT]}, "rejected", "differ"),
    (read_prompts, {"text": "p"}, "prompt", "missing"),
    (read_prompts, {"prompt": None}, "prompt", "got NoneType"),
    (read_prompts, {"messages": [USER, ASSISTANT]}, "messages", "last message is 'assistant'"),
    (read_prompts, {"prompt": [{"role": "tool", "content": "x"}]}, "prompt[0].role", "unknown role"),
]


@pytest.mark.parametrize("reader,bad,key,words", ERROR_CASES)
def test_reader_errors(tmp_path, reader, bad, key, words):
    good = {read_sft: GOOD_SFT, read_preferences: GOOD_PREF, read_prompts: {"prompt": "p"}}[reader]
    # good line, blank line, bad line: the bad one is line 3 of the file
    path = write_lines(tmp_path, [good, "", bad, good])
    with pytest.raises(DataError) as e:
        reader(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: "), msg
    if key is not None:
        assert f"key '{key}'" in msg, msg
    assert words in msg, msg


@pytest.mark.parametrize("reader", [read_sft, read_preferences, read_prompts])
def test_reader_empty_file(tmp_path, reader):
    for text in ["", "\n  \n"]:
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        with pytest.raises(DataError, match="empty.jsonl"):
            reader(path)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# -----------------------------------------------------------------------------
# tokenizer

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def word_level(words, specials):
    """A tiny hand-built tokenizer: word i has id i, "\\n\\n" is its own piece, specials follow."""
    vocab = {w: i for i, w in enumerate(words)}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # keep "\n\n" and every run of non-space characters as pieces, drop single spaces
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|[^\s]+"), behavior="removed", invert=True)
    tk.add_special_tokens(specials)
    return tk


CHAT_WORDS = ["[UNK]", "system", "user", "assistant", "\n\n", "be", "brief", "hi", "there"]


def test_chat_template_exact_ids():
    tk = word_level(CHAT_WORDS, LLAMA3_SPECIALS + ["<|finetune_right_pad_id|>"])
    bot, eot_text, start, end, eot, pad = range(9, 15)  # specials get ids after the 9 words
    system, user, assistant, nn, be, brief, hi, there = range(1, 9)
    tok = Tokenizer(tk)
    assert tok.chat
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bot, eot, pad)  # chat EOS is <|eot_id|>, not <|end_of_text|>
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = [bot,
                start, system, end, nn, be, brief, eot,
                start, user, end, nn, hi, eot,
                start, assistant, end, nn]
    assert tok.encode_prompt(msgs, max_len=100) == expected
    # same as the tokenizer's own added-token handling on the rendered template
    rendered = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tk.encode(rendered, add_special_tokens=False).ids == expected
    # truncation keeps BOS and the end, so the generation cue survives
    assert tok.encode_prompt(msgs, max_len=6) == [bot, eot, start, assistant, end, nn]
    # chat responses have no leading space and end with <|eot_id|>
    assert tok.encode_response("hi there", max_len=10) == [hi, there, eot]
    assert tok.encode_response("hi there", max_len=2) == [hi, there]


def test_plain_template_exact_ids():
    words = ["[UNK]", "user:", "system:", "assistant:", "be", "brief", "hi"]
    tk = word_level(words, ["<s>", "</s>"])
    tok = Tokenizer(tk)
    assert not tok.chat
    bos, eos = 7, 8
    # no pad token in the vocab: a new "<|pad|>" is added at the next id
    assert tok.pad_id == 9 and tok.vocab_size == 10 and tk.id_to_token(9) == "<|pad|>"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.encode_prompt(msgs, max_len=100) == [bos, 2, 4, 5, 1, 6, 3]
    assert tok.encode_prompt(msgs, max_len=3) == [bos, 6, 3]
    assert tok.encode_response("hi", max_len=5) == [6, eos]


@pytest.mark.parametrize("specials,pad_name", [
    (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"], "<|reserved_special_token_0|>"),
    (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"],
     "<|finetune_right_pad_id|>"),
    (["<s>", "</s>", "<pad>"], "<pad>"),
    (["<|bos|>", "<|eos|>", "<|pad|>"], "<|pad|>"),
])
def test_special_id_lookup(specials, pad_name):
    tk = word_level(["[UNK]", "a"], specials)
    tok = Tokenizer(tk)
    assert tok.bos_id == tk.token_to_id(specials[0])
    assert tok.eos_id == tk.token_to_id(specials[1])
    assert tok.pad_id == tk.token_to_id(pad_name)
    assert tok.vocab_size == 2 + len(specials)  # nothing added


def test_missing_bos_or_eos_is_an_error():
    with pytest.raises(ValueError, match="no EOS"):
        Tokenizer(word_level(["[UNK]", "a"], ["<s>"]))
    with pytest.raises(ValueError, match="no BOS"):
        Tokenizer(word_level(["[UNK]", "a"], ["</s>"]))


def test_from_dir_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


@pytest.fixture(scope="module")
def task_tok():
    task = WordTask()
    return task, train_tokenizer(task.corpus(), vocab_size=512)


def test_trained_tokenizer_specials_and_round_trip(task_tok, tmp_path):
    task, tok = task_tok
    ids = {name: tok.tk.token_to_id(name) for name in ["<|bos|>", "<|eos|>", "<|pad|>"]}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids["<|bos|>"], ids["<|eos|>"], ids["<|pad|>"])
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3 and None not in ids.values()
    assert not tok.chat and tok.vocab_size <= 512
    for text in ["topic cats", " red blue", "Unseen TEXT, with ünïcödé ✓ and\n\nnewlines  ", ""]:
        assert tok.decode(tok.encode(text)) == text
    # specials are skipped on decode unless asked for
    assert tok.decode([tok.bos_id] + tok.encode("hi") + [tok.eos_id]) == "hi"
    assert tok.decode([tok.bos_id], skip_special=False) == "<|bos|>"
    # save / load keeps everything
    tok.save(tmp_path / "tk")
    tok2 = Tokenizer.from_dir(tmp_path / "tk")
    for attr in ["bos_id", "eos_id", "pad_id", "vocab_size"]:
        assert getattr(tok2, attr) == getattr(tok, attr)
    assert tok2.encode("topic cats red") == tok.encode("topic cats red")


def test_train_tokenizer_deterministic(task_tok):
    task, tok = task_tok
    assert train_tokenizer(task.corpus(), vocab_size=512).tk.to_str() == tok.tk.to_str()


def test_word_task_tokenizes_compactly(task_tok):
    task, tok = task_tok
    for w in task.words:  # one token per response word, so per-word reward == per-token reward
        assert len(tok.encode(" " + w)) == 1, w
    response = " ".join(task.words[:5])
    assert tok.encode_response(response, 64) == [tok.encode(" " + w)[0] for w in task.words[:5]] + [tok.eos_id]
    prompt = tok.encode_prompt([{"role": "user", "content": task.prompt_text(0)}], 64)
    assert len(prompt) <= 10


def test_plain_truncation_rules(task_tok):
    task, tok = task_tok
    msgs = [{"role": "user", "content": "topic cats red blue green"}]
    full = [tok.bos_id] + tok.encode("user: topic cats red blue green\nassistant:")
    assert tok.encode_prompt(msgs, max_len=len(full)) == full
    cut = tok.encode_prompt(msgs, max_len=5)
    assert len(cut) == 5 and cut[0] == tok.bos_id and cut[1:] == full[-4:]
    assert tok.decode(cut[1:]).endswith("assistant:")
    body = tok.encode(" red blue green")
    assert len(body) == 3
    assert tok.encode_response("red blue green", max_len=4) == body + [tok.eos_id]  # exact fit keeps EOS
    assert tok.encode_response("red blue green", max_len=3) == body  # cut: EOS lost, last word kept
    assert tok.encode_response("red blue green", max_len=2) == body[:2]


# -----------------------------------------------------------------------------
# collation

def test_collate_layout():
    b = collate([[5, 6, 7], [8]], [[1], [2, 3, 4]], pad_id=0)
    assert b["prompt_len"] == 3
    assert torch.equal(b["input_ids"], torch.tensor([[5, 6, 7, 1, 0, 0],
                                                     [0, 0, 8, 2, 3, 4]]))
    assert torch.equal(b["attention_mask"], torch.tensor([[1, 1, 1, 1, 0, 0],
                                                          [0, 0, 1, 1, 1, 1]]))
    assert torch.equal(b["response_mask"], torch.tensor([[True, False, False],
                                                         [True, True, True]]))
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
    assert b["response_mask"].dtype == torch.bool
    ids, mask = pad_left([[1, 2], [3]], pad_id=9)
    assert torch.equal(ids, torch.tensor([[1, 2], [9, 3]])) and torch.equal(mask, torch.tensor([[1, 1], [0, 1]]))
    with pytest.raises(ValueError):
        collate([[1]], [[1], [2]], pad_id=0)


# -----------------------------------------------------------------------------
# WordTask

def test_gold_reward_with_target_length():
    """-length_cost * |n - target| by hand, for responses shorter than, at and longer than the target."""
    task = WordTask(seed=5, n_topics=2, n_words=6, length_cost=0.5, target_words=3)
    prompt = "topic " + task.topics[1]
    s = task.scores[1]
    for idx in ([], [0], [0, 1, 2], [5, 4, 3, 2, 1]):
        response = " ".join(task.words[i] for i in idx)
        expected = sum(s[i] for i in idx) - 0.5 * abs(len(idx) - 3)
        assert task.gold_reward(prompt, response) == pytest.approx(expected)
        assert sum(task.word_rewards(prompt, response)) - 0.5 * 3 == pytest.approx(expected)
    # per-word terms: + length_cost before the target, - after
    resp = " ".join(task.words[i] for i in [0, 1, 2, 3])
    assert task.word_rewards(prompt, resp) == pytest.approx([s[0] + .5, s[1] + .5, s[2] + .5, s[3] - .5])


def test_gold_reward_hand_computed():
    task = WordTask(seed=3, n_topics=3, n_words=10, length_cost=0.25, unknown_word_score=-1.5, target_words=0)
    assert task.scores.shape == (3, 10)
    prompt = "topic " + task.topics[2]
    response = f"{task.words[4]} {task.words[0]} zzz {task.words[4]}"
    s = task.scores
    terms = [s[2, 4] - 0.25, s[2, 0] - 0.25, -1.5 - 0.25, s[2, 4] - 0.25]
    assert task.word_rewards(prompt, response) == pytest.approx(terms)
    assert task.gold_reward(prompt, response) == pytest.approx(sum(terms))
    assert task.gold_reward(prompt, "") == 0.0
    assert task.gold_reward([{"role": "user", "content": prompt}], response) == pytest.approx(sum(terms))
    with pytest.raises(ValueError):
        task.gold_reward("topic nonsense", response)
    # the score table depends on the seed only
    assert np.array_equal(WordTask(seed=3, n_topics=3, n_words=10).scores, task.scores)
    assert not np.array_equal(WordTask(seed=4, n_topics=3, n_words=10).scores, task.scores)


def test_sample_response_neutral():
    task = WordTask(min_words=2, max_words=4)
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(300):
        words = task.sample_response(rng).split(" ")
        assert all(w in task.words for w in words)
        lengths.add(len(words))
    assert lengths == {2, 3, 4}
    assert task.sample_prompt(rng) in {task.prompt_text(t) for t in range(task.n_topics)}


def test_write_data(tmp_path):
    task = WordTask()
    paths = task.write_data(tmp_path, n_sft=7, n_pref=2000, n_prompts=5, n_eval=3, rng_seed=1)
    assert set(paths) == {"sft", "prefs", "prompts", "eval_prefs", "eval_prompts"}
    assert len(read_sft(paths["sft"])) == 7 and len(read_prompts(paths["prompts"])) == 5
    assert len(read_preferences(paths["eval_prefs"])) == 3 and len(read_prompts(paths["eval_prompts"])) == 3
    # Bradley-Terry labels: P(chosen is the higher-gold response) = mean sigmoid(|gold gap|)
    pairs = read_preferences(paths["prefs"])
    gaps = np.array([task.gold_reward(p.prompt, p.chosen) - task.gold_reward(p.prompt, p.rejected) for p in pairs])
    frac_right = np.mean(gaps > 0)
    expected = np.mean([1 / (1 + math.exp(-abs(g))) for g in gaps])
    sd = math.sqrt(expected * (1 - expected) / len(gaps))
    assert frac_right > 0.6
    assert abs(frac_right - expected) < 4 * sd, (frac_right, expected)
    assert frac_right < 0.99  # labels are sampled, not argmax
    # same seed, same files
    again = task.write_data(tmp_path / "again", n_sft=7, n_pref=2000, n_prompts=5, n_eval=3, rng_seed=1)
    assert all(again[k].read_text() == paths[k].read_text() for k in paths)
