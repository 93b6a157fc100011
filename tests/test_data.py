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
from data import (DataError, PrefRow, PromptRow, SFTRow, collate, pad_left,  # noqa: E402
                  read_preferences, read_prompts, read_sft)
from hf import Tokenizer  # noqa: E402
from task import WordTask, train_tokenizer  # noqa: E402


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
# tokenizer: special tokens and chat templates as transformers reads them (fixtures by make_chat_fixture.py)

FIXTURES = Path(__file__).parent / "fixtures" / "chat"
LAYOUTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.json").is_file())


def expected_of(layout):
    return json.loads((FIXTURES / layout / "expected.json").read_text(encoding="utf-8"))


def test_every_layout_has_a_fixture():
    assert {"llama3.1", "qwen2.5", "smollm2", "gemma2", "mistral", "deepseek-r1", "legacy-map"} <= set(LAYOUTS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_special_ids_match_transformers(layout):
    exp, tok = expected_of(layout), Tokenizer.from_dir(FIXTURES / layout)
    assert tok.chat and tok.bos_id == exp["bos_token_id"]
    gen_eos = exp["generation_eos_token_id"]
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    # every id transformers' generate stops on stops ours too, and so does what a response ends with
    assert set(gen_eos) | {exp["eos_token_id"]} <= set(tok.stop_ids) and tok.eos_id in tok.stop_ids
    # padding is never an end: a pad declared equal to a stop id (smollm2, qwen2.5, deepseek-r1) is replaced
    assert tok.pad_id not in tok.stop_ids
    if exp["pad_token_id"] is not None and exp["pad_token_id"] not in tok.stop_ids:
        assert tok.pad_id == exp["pad_token_id"]  # a usable declared pad is kept (gemma2, legacy-map's map file)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chat_ids_match_transformers(layout):
    """Prompt ids equal apply_chat_template(add_generation_prompt=True); prompt + response equal
    apply_chat_template(prompt + answer) up to and including the end-of-turn token, or, where the template renders a
    finished turn differently from its generation prompt, the response is the answer closed by the turn's end."""
    exp, tok = expected_of(layout), Tokenizer.from_dir(FIXTURES / layout)
    checked = 0
    for conv in exp["conversations"]:
        msgs, answer = conv["messages"], conv["response"]
        if "error" in conv:  # the template refused (gemma: no system role): so do we, with its words
            with pytest.raises(DataError, match=conv["error"]):
                tok.encode_prompt(msgs, 10_000)
            continue
        p, r = tok.encode_prompt(msgs, 10_000), tok.encode_response(msgs, answer, 10_000)
        assert p == conv["prompt_ids"]
        assert r[-1] == tok.eos_id and sum(i in tok.stop_ids for i in r) == 1
        full = conv["full_ids"]
        if full[:len(p)] == p:
            assert full[:len(p) + len(r)] == p + r
            rest = tok.decode(full[len(p) + len(r):], skip_special=False)
            assert rest.strip() == ""  # only the layout after the end token ("\n" after <|im_end|>)
        else:  # mistral with a system turn, deepseek-r1 (its prompt ends in "<think>\n")
            eot_text = tok.tk.id_to_token(tok.eos_id)
            assert r == tok.tk.encode(answer + eot_text, add_special_tokens=False).ids
        checked += 1
    assert checked >= 3


def test_response_end_of_turn_tokens():
    ends = {layout: Tokenizer.from_dir(FIXTURES / layout) for layout in LAYOUTS}
    names = {layout: t.tk.id_to_token(t.eos_id) for layout, t in ends.items()}
    assert names["llama3.1"] == "<|eot_id|>" and names["qwen2.5"] == "<|im_end|>"
    assert names["gemma2"] == "<end_of_turn>"  # not tokenizer_config's eos_token "<eos>"
    assert names["mistral"] == "</s>" and names["smollm2"] == "<|im_end|>"


def middle_cut_of(content: str, kept: str) -> bool:
    """kept is content with characters removed from its middle only: its start and its end, nothing else."""
    head = (len(kept) + 1) // 2
    return len(kept) < len(content) and kept[:head] == content[:head] and content.endswith(kept[head:])


@pytest.mark.parametrize("layout", ["llama3.1", "qwen2.5"])
def test_chat_truncation_cuts_inside_the_message(layout):
    """A prompt longer than max_len loses the middle of its message's content and is rendered again: the template's
    header (Llama-3.1's system block, its date), the system turn and the generation cue survive whole, the content
    keeps its start and its end; with no room even for an empty message it is an error that says so."""
    tok = Tokenizer.from_dir(FIXTURES / layout)
    content = "Tell me a joke about " + " ".join(f"w{i}" for i in range(60)) + " and end with a pun."
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}]
    full = tok.encode_prompt(msgs, 10_000)
    cut = tok.encode_prompt(msgs, len(full) - 25)
    assert len(full) - 25 - 8 <= len(cut) <= len(full) - 25  # within a few tokens of the limit, never above
    rendered = tok.render(msgs, add_generation_prompt=True)
    before, after = rendered.split(content)
    text = tok.decode(cut, skip_special=False)
    assert text.startswith(before) and text.endswith(after) and "Answer briefly." in before
    assert middle_cut_of(content, text[len(before):len(text) - len(after)])
    header = len(tok.encode(before))
    assert cut[:header] == full[:header]  # the ids of everything before the message, unchanged
    with pytest.raises(DataError, match=r"with its longest message emptied it is still \d+, more than max_prompt_len"):
        tok.encode_prompt(msgs, header - 1)
    r = tok.encode_response(msgs, "Why did the cat sit on the computer?", 10_000)
    assert tok.encode_response(msgs, "Why did the cat sit on the computer?", len(r) - 1) == r[:-1]  # cut: no EOS


@pytest.mark.parametrize("layout", ["llama3.1", "qwen2.5", "gemma2", "mistral"])
def test_hf_files_round_trip(layout, tmp_path):
    tok = Tokenizer.from_dir(FIXTURES / layout)
    tok.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(tok.generation_config_json())
    back = Tokenizer.from_dir(tmp_path)
    for attr in ["bos_id", "eos_id", "pad_id", "stop_ids", "vocab_size", "chat_template"]:
        assert getattr(back, attr) == getattr(tok, attr), attr
    assert not any("padding" in n for n in back.notes)  # nothing left to choose: the export declares its pad
    src_cfg = json.loads((FIXTURES / layout / "tokenizer_config.json").read_text(encoding="utf-8"))
    out_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in out_cfg.items() if k not in ("pad_token", "added_tokens_decoder")} == \
           {k: v for k, v in src_cfg.items() if k not in ("pad_token", "added_tokens_decoder")}
    assert (tmp_path / "chat_template.jinja").is_file() == (layout == "qwen2.5")  # the template stays where it was
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6 and set(np.atleast_1d(gen["eos_token_id"])) == set(tok.stop_ids)
    if tok.added_tokens:  # qwen2.5: the new pad is an added special token in the written files
        dec = out_cfg["added_tokens_decoder"][str(tok.pad_id)]
        assert dec["content"] == "<|pad|>" and dec["special"]


def write_tok_dir(tmp_path, tk, config=None, template_file=None, gen=None):
    tk.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config) if isinstance(config, dict) else config)
    if template_file is not None:
        (tmp_path / "chat_template.jinja").write_text(template_file)
    if gen is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return tmp_path


def word_level(words, specials):
    """A tiny hand-built tokenizer: word i has id i, "\\n\\n" is its own piece, specials follow."""
    vocab = {w: i for i, w in enumerate(words)}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # keep "\n\n" and every run of non-space characters as pieces, drop single spaces
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|[^\s]+"), behavior="removed", invert=True)
    tk.add_special_tokens(specials)
    return tk


CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant '}}{% endif %}")


def test_hand_built_chatml_ids(tmp_path):
    words = ["[UNK]", "user", "assistant", "hi", "there"]
    tk = word_level(words, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    d = write_tok_dir(tmp_path, tk, {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "bos_token": None,
                                     "unk_token": "<|endoftext|>", "chat_template": CHATML})
    tok = Tokenizer.from_dir(d)
    end_text, start, end = 5, 6, 7
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.pad_id) == (None, end, [end], end_text)  # pad != eos
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.encode_prompt(msgs, 100) == [start, 1, 3, end, start, 2]
    assert tok.encode_response(msgs, "hi there", 100) == [3, 4, end]


def test_template_file_wins_and_named_templates(tmp_path):
    tk = word_level(["[UNK]", "a", "b"], ["<s>", "</s>"])
    other = "{{ 'b ' }}{% for m in messages %}{{ m['content'] + ' ' + eos_token }}{% endfor %}"
    cfg = {"bos_token": "<s>", "eos_token": "</s>",
           "chat_template": [{"name": "tool_use", "template": "{{ raise_exception('no') }}"},
                             {"name": "default", "template": other}]}
    tok = Tokenizer.from_dir(write_tok_dir(tmp_path, tk, cfg))
    assert tok.chat_template == other and tok.encode_prompt([{"role": "user", "content": "a"}], 10) == [2, 1, 4]
    written = json.loads(tok.hf_files()["tokenizer_config.json"])  # an export keeps every named template
    assert written["chat_template"] == cfg["chat_template"]
    # chat_template.jinja beside tokenizer_config.json is the template (transformers >= 4.43 writes it there)
    in_file = other.replace("'b '", "'a '")
    tok = Tokenizer.from_dir(write_tok_dir(tmp_path, tk, cfg, template_file=in_file))
    assert tok.template_file and tok.encode_prompt([{"role": "user", "content": "b"}], 10) == [1, 2, 4]


def test_generation_block_and_sandbox(tmp_path):
    tk = word_level(["[UNK]", "a", "b"], ["<s>", "</s>"])
    gen_block = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                 "{% endgeneration %}{{ eos_token }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    tok = Tokenizer.from_dir(write_tok_dir(tmp_path, tk, {"eos_token": "</s>", "chat_template": gen_block}))
    assert tok.encode_response([{"role": "user", "content": "a"}], "b", 10) == [2, 4]
    # a template is data from a checkpoint: the sandbox refuses to reach Python internals
    attack = "{{ ().__class__.__base__.__subclasses__() }}{{ eos_token }}"
    with pytest.raises(DataError, match="refused"):
        Tokenizer.from_dir(write_tok_dir(tmp_path, tk, {"eos_token": "</s>", "chat_template": attack}))


@pytest.mark.parametrize("config,words", [
    ('{"eos_token": ', "tokenizer_config.json: not valid JSON"),
    ({"eos_token": "<|nope|>"}, "field 'eos_token' is '<|nope|>', which tokenizer.json does not hold"),
    ({"eos_token": 5}, "field 'eos_token'"),
    ({"bos_token": "<s>"}, "no EOS token"),
    ({"eos_token": "</s>", "chat_template": "{% for %}"}, "chat_template line 1"),
    ({"eos_token": "</s>", "chat_template": [{"name": "rag", "template": "x"}]}, "none named 'default'"),
])
def test_tokenizer_config_errors(tmp_path, config, words):
    tk = word_level(["[UNK]", "a"], ["<s>", "</s>"])
    with pytest.raises(DataError) as e:
        Tokenizer.from_dir(write_tok_dir(tmp_path, tk, config))
    assert words in str(e.value) and str(tmp_path) in str(e.value)


def test_generation_config_errors(tmp_path):
    tk = word_level(["[UNK]", "a"], ["<s>", "</s>"])
    with pytest.raises(DataError, match="generation_config.json field 'eos_token_id'"):
        Tokenizer.from_dir(write_tok_dir(tmp_path, tk, {"eos_token": "</s>"}, gen={"eos_token_id": "2"}))
    # no generation_config.json: config.json's eos_token_id (a list) gives the stop ids, as in transformers
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    assert Tokenizer.from_dir(tmp_path).stop_ids == [1, 3]


def test_plain_template_exact_ids():
    words = ["[UNK]", "user:", "system:", "assistant:", "be", "brief", "hi"]
    tk = word_level(words, ["<s>", "</s>"])
    tok = Tokenizer(tk)  # a bare tokenizer.json: special tokens by name, and the plain format
    assert not tok.chat and "chosen by name" in tok.notes[0]
    bos, eos = 7, 8
    # no pad token and no unk in the vocab: a new "<|pad|>" is added at the next id
    assert tok.pad_id == 9 and tok.vocab_size == 10 and tk.id_to_token(9) == "<|pad|>"
    assert tok.added_tokens == ["<|pad|>"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.encode_prompt(msgs, max_len=100) == [bos, 2, 4, 5, 1, 6, 3]
    with pytest.raises(DataError, match="emptied"):  # the system turn is never cut, "hi" alone is not enough
        tok.encode_prompt(msgs, max_len=3)
    # "hi hi hi hi" (11 characters, 4 tokens) over by 2: 6 characters cut from its middle leave "hi " + "hi"
    long = [msgs[0], {"role": "user", "content": "hi hi hi hi"}]
    assert tok.encode_prompt(long, max_len=8) == [bos, 2, 4, 5, 1, 6, 6, 3]
    assert tok.encode_response(msgs, "hi", max_len=5) == [6, eos]


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


def test_no_bos_is_fine_no_eos_is_an_error():
    with pytest.raises(DataError, match="no EOS"):
        Tokenizer(word_level(["[UNK]", "a"], ["<s>"]))
    tok = Tokenizer(word_level(["[UNK]", "a"], ["</s>"]))
    assert tok.bos_id is None and tok.encode_prompt([{"role": "user", "content": "a"}], 10)[0] != tok.eos_id


def test_from_dir_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizers file"):
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
    assert tok.encode_response([], response, 64) == [tok.encode(" " + w)[0] for w in task.words[:5]] + [tok.eos_id]
    prompt = tok.encode_prompt([{"role": "user", "content": task.prompt_text(0)}], 64)
    assert len(prompt) <= 10


def test_plain_truncation_rules(task_tok):
    task, tok = task_tok
    msgs = [{"role": "user", "content": "topic cats red blue green"}]
    full = [tok.bos_id] + tok.encode("user: topic cats red blue green\nassistant:")
    assert tok.encode_prompt(msgs, max_len=len(full)) == full
    cut = tok.encode_prompt(msgs, max_len=len(full) - 2)
    assert len(cut) <= len(full) - 2 and cut[0] == tok.bos_id
    text = tok.decode(cut[1:])
    assert text.startswith("user: ") and text.endswith("\nassistant:")
    assert middle_cut_of("topic cats red blue green", text[len("user: "):-len("\nassistant:")])
    body = tok.encode(" red blue green")
    assert len(body) == 3
    assert tok.encode_response(msgs, "red blue green", max_len=4) == body + [tok.eos_id]  # exact fit keeps EOS
    assert tok.encode_response(msgs, "red blue green", max_len=3) == body  # cut: EOS lost, last word kept
    assert tok.encode_response(msgs, "red blue green", max_len=2) == body[:2]


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
