"""Data for every stage: JSONL readers, the tokenizer wrapper, batch collation, and a synthetic task.

    rows = read_sft("sft.jsonl")              # list[SFTRow]
    tok = Tokenizer.from_dir("base_model/")   # reads base_model/tokenizer.json
    p = tok.encode_prompt(rows[0].prompt, max_len=512)
    r = tok.encode_response(rows[0].response, max_len=512)
    batch = collate([p], [r], tok.pad_id)     # prompts left-padded, responses right-padded

Every stage uses one batch layout: prompts LEFT-padded to a common width P, responses RIGHT-padded
to width R, concatenated into (B, P+R). Left padding puts every prompt's last token in column P-1,
so generation starts in the same column for every row, and the response token in column P+j is
predicted by the logits in column P+j-1.

WordTask is the built-in demo: a toy "write words about a topic" task whose true reward is a known
sum of per-word scores, so SFT -> DPO -> RM -> PPO can be judged against the true per-token reward.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import tokenizers
import torch

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
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err(path, lineno, None, f"invalid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise _err(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            n_rows += 1
            yield lineno, obj
    if n_rows == 0:
        raise DataError(f"{path}: no rows (the file is empty)")


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
# Tokenizer: the checkpoint's special tokens, stop ids and chat template, read the way transformers reads them

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Only for a bare tokenizer.json with no tokenizer_config.json: the special tokens are then guessed by name, among
# the tokenizer's added *special* tokens only (many vocabularies also hold "<s>" or "</s>" as ordinary text).
FALLBACK_NAMES = {
    "bos_token": ["<|begin_of_text|>", "<|bos|>", "<s>", "<bos>"],
    "eos_token": ["<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end_of_text|>", "<|eos|>", "</s>", "<eos>",
                  "<|endoftext|>"],
    "pad_token": ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>"],
    "unk_token": ["<unk>", "<|unk|>", "[UNK]"],
}
NEW_PAD = "<|pad|>"  # added (and the embedding grown by one row) only when the tokenizer has no usable pad at all
# Stands in for an assistant message when probing a chat template for what closes an assistant turn.
SENTINEL = "RTO_SENTINEL_7c1f"


def read_json_file(path: Path) -> dict | None:
    """A JSON object from path, or None when the file does not exist; a malformed file names itself."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _token_content(value, where: str) -> str | None:
    """A special-token field of tokenizer_config.json: a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise DataError(f"{where}: expected a token string or an object with 'content', got {value!r}")


def _id_list(value, where: str) -> list[int]:
    """eos_token_id of generation_config.json / config.json: an int, a list of ints (Llama-3.1), or null."""
    if value is None:
        return []
    vals = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise DataError(f"{where}: expected an int or a list of ints, got {value!r}")
    return vals


def compile_chat_template(source: str, where: str):
    """A chat template compiled the way transformers' apply_chat_template compiles it: a sandboxed jinja2
    environment (a template is data from a checkpoint: it must not reach Python objects or files), trim_blocks and
    lstrip_blocks, loop controls, the helpers templates call (raise_exception, strftime_now, a tojson that does
    not escape HTML) and the {% generation %} block some templates mark the assistant's text with."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):  # renders its body unchanged (transformers uses it to find masks)
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{where}: chat_template line {e.lineno}: {e.message}") from None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what its checkpoint says about it: the special tokens, the ids that end a
    response, and the chat template (without one, a plain "role: text" format).

    - bos_id: tokenizer_config.json's bos_token (None for checkpoints without one, e.g. ChatML models).
    - eos_id: the token a training response ends with, and so the one the policy learns to emit and the reward
      model reads its score at: the end-of-turn token the chat template closes an assistant turn with
      (<|eot_id|>, <|im_end|>, <end_of_turn>, </s>), or eos_token without a template.
    - stop_ids: every id that ends a sampled response: eos_id, eos_token and generation_config.json's
      eos_token_id (a list for Llama-3.1-Instruct).
    - pad_id: only ever fills; where a row ends comes from its mask, never from the pad id. It is still never a stop
      id, because Hugging Face's sequence classifier reads its score at the last token that is not pad: a reward
      model exported with pad == eos would be read one token early by every tool that loads it.
    notes lists what was chosen and why (train.py prints them at load).
    """

    def __init__(self, tk: tokenizers.Tokenizer, config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | None = None, source: str = "tokenizer", template_file: bool = False):
        self.tk, self.source = tk, source
        self.config = dict(config) if config is not None else None  # tokenizer_config.json as read
        self.generation_config = dict(generation_config or {})
        self.template_file = template_file  # the template came from chat_template.jinja (written back there)
        self.notes: list[str] = []
        self.added_tokens: list[str] = []  # tokens this class added to the vocabulary (the embedding must grow)
        added = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        if config is None:
            self.tokens = {k: next((n for n in names if n in added), None) for k, names in FALLBACK_NAMES.items()}
            self.notes.append(f"{source}: no tokenizer_config.json, special tokens chosen by name: "
                              + ", ".join(f"{k} {v!r}" for k, v in self.tokens.items()))
        else:
            self.tokens = {k: _token_content(config.get(k), f"{source}: tokenizer_config.json field '{k}'")
                           for k in SPECIAL_KEYS}
        ids = {}
        for key, text in self.tokens.items():
            if text is not None:
                ids[key] = tk.token_to_id(text)
                if ids[key] is None:
                    raise DataError(f"{source}: tokenizer_config.json field '{key}' is {text!r}, "
                                    f"which tokenizer.json does not hold")
        if "eos_token" not in ids:
            raise DataError(f"{source}: no EOS token: tokenizer_config.json has no 'eos_token'"
                            + (" (and no added special token is named like one)" if config is None else ""))
        self.bos_id, self.eos_id = ids.get("bos_token"), ids["eos_token"]
        stops = {self.eos_id, *_id_list(self.generation_config.get("eos_token_id"),
                                        f"{source}: generation_config.json field 'eos_token_id'")}
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template, source) if chat_template else None
        self._turn_tail = ""  # what the template writes after an assistant message's text
        if self._template is not None:
            eot = self._end_of_turn()
            if eot is not None and eot != self.eos_id:
                self.notes.append(f"{source}: the chat template ends an assistant turn with "
                                  f"{tk.id_to_token(eot)!r} (id {eot}): responses end there, and it stops sampling")
                self.eos_id = eot
            stops.add(self.eos_id)
        self.stop_ids = sorted(stops)
        self.pad_id = self._choose_pad(ids.get("pad_token"), ids.get("unk_token"), added)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    @property
    def chat(self) -> bool:
        return self._template is not None

    def _choose_pad(self, declared, unk, added) -> int:
        stops = set(self.stop_ids)
        if declared is not None and declared not in stops:
            return declared
        why = ("declares no pad_token" if declared is None else
               f"declares pad_token {self.tokens['pad_token']!r}, which also ends responses")
        # an added special token named like a pad (<|finetune_right_pad_id|>, <pad>, <｜▁pad▁｜>), else a reserved one
        named = sorted(i for t, i in added.items() if "pad" in t.lower() and i not in stops)
        reserved = sorted(i for t, i in added.items() if "reserved" in t and i not in stops)
        if named or reserved:
            pad = (named or reserved)[0]
        elif unk is not None and unk not in stops:
            pad = unk
        else:
            self.tk.add_special_tokens([tokenizers.AddedToken(NEW_PAD, special=True, normalized=False)])
            pad = self.tk.token_to_id(NEW_PAD)
            self.added_tokens.append(NEW_PAD)
        self.tokens["pad_token"] = self.tk.id_to_token(pad)
        self.notes.append(f"{self.source}: the tokenizer {why}; padding with {self.tokens['pad_token']!r} (id {pad})"
                          + (", a new token" if self.added_tokens else "") + "; exports declare it as pad_token")
        return pad

    @classmethod
    def from_dir(cls, d) -> "Tokenizer":
        """Read a checkpoint directory the way transformers' AutoTokenizer + GenerationConfig do:
        tokenizer.json; special tokens from tokenizer_config.json (special_tokens_map.json overrides them when
        tokenizer_config.json lists no added_tokens_decoder, transformers' legacy rule); the chat template from
        chat_template.jinja, else tokenizer_config.json's chat_template (a list of named templates: "default");
        stop ids from generation_config.json, else config.json's eos_token_id."""
        d = Path(d)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file (expected a HF tokenizers 'tokenizer.json')")
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser's message says what is wrong
            raise DataError(f"{path}: not a tokenizers file: {e}") from None
        config = read_json_file(d / "tokenizer_config.json")
        smap = read_json_file(d / "special_tokens_map.json")
        if smap is not None and (config is None or "added_tokens_decoder" not in config):
            config = {**(config or {}), **{k: v for k, v in smap.items() if k in SPECIAL_KEYS}}
        template, template_file = None, (d / "chat_template.jinja").is_file()
        if template_file:
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif config is not None and config.get("chat_template"):
            template = config["chat_template"]
            if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                if "default" not in named:
                    raise DataError(f"{d / 'tokenizer_config.json'}: field 'chat_template' lists templates "
                                    f"{sorted(named)} but none named 'default'")
                template = named["default"]
            if not isinstance(template, str):
                raise DataError(f"{d / 'tokenizer_config.json'}: field 'chat_template' is not a string")
        gen = read_json_file(d / "generation_config.json")
        if gen is None:  # transformers builds the generation config from the model's config.json
            model_cfg = read_json_file(d / "config.json") or {}
            gen = {k: model_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in model_cfg}
        return cls(tk, config, gen, template, source=str(d), template_file=template_file)

    def hf_files(self) -> dict[str, str]:
        """What AutoTokenizer reads: tokenizer.json, tokenizer_config.json (the input's, chat template and special
        tokens intact, pad_token set to the one used here), special_tokens_map.json, and chat_template.jinja when
        the input kept the template there."""
        cfg = dict(self.config) if self.config is not None else {
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key, text in self.tokens.items():
            if text is not None and _token_content(cfg.get(key), key) != text:
                cfg[key] = text
        if self.added_tokens and "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {**cfg["added_tokens_decoder"], **{
                str(self.tk.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True} for t in self.added_tokens}}
        files = {"tokenizer.json": self.tk.to_str()}
        if self.template_file:
            files["chat_template.jinja"] = self.chat_template
        elif self.chat_template is not None and not isinstance(cfg.get("chat_template"), list):
            cfg["chat_template"] = self.chat_template  # (a list of named templates is carried over whole)
        files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
        files["special_tokens_map.json"] = json.dumps({k: v for k, v in self.tokens.items() if v is not None},
                                                      indent=2, ensure_ascii=False) + "\n"
        return files

    def generation_config_json(self) -> str:
        """generation_config.json: the input's (sampling defaults kept) with this tokenizer's ids; eos_token_id
        lists every stop id, so transformers' and vLLM's generate stop where ours does."""
        ids = {"bos_token_id": self.bos_id, "pad_token_id": self.pad_id,
               "eos_token_id": self.stop_ids[0] if len(self.stop_ids) == 1 else self.stop_ids}
        return json.dumps({**self.generation_config, **ids}, indent=2) + "\n"

    def save(self, d):
        Path(d).mkdir(parents=True, exist_ok=True)
        for name, text in self.hf_files().items():
            (Path(d) / name).write_text(text, encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """Text -> ids, special tokens in the text recognised as themselves, no BOS/EOS added (as transformers'
        apply_chat_template tokenizes: add_special_tokens=False skips the post-processor)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render(self, messages, add_generation_prompt: bool) -> str:
        """The chat template applied to messages, with the context transformers gives it (bos_token, eos_token,
        ... as strings; tools and documents None)."""
        import jinja2

        ctx = {k: v for k, v in self.tokens.items() if v is not None}
        if self.config and self.config.get("additional_special_tokens"):
            ctx["additional_special_tokens"] = [_token_content(t, "additional_special_tokens")
                                                for t in self.config["additional_special_tokens"]]
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **ctx)
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template of {self.source} refused this conversation: {e}") from None

    def _end_of_turn(self) -> int | None:
        """The special token the template closes an assistant turn with: render a probe conversation, tokenize
        what follows the assistant's text, return its first special token (None when there is none)."""
        text = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}], False)
        if SENTINEL not in text:
            raise DataError(f"{self.source}: the chat template does not show an assistant message's text")
        self._turn_tail = text[text.index(SENTINEL) + len(SENTINEL):]
        special = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        return next((i for i in self.encode(self._turn_tail) if i in special), None)

    def encode_prompt(self, messages, max_len: int) -> list[int]:
        """Messages -> ids ending with the generation cue (the template's, or "assistant:"). When longer than
        max_len keep the BOS (if any) and the LAST ids: the latest turn and the cue the response follows matter most."""
        assert max_len >= 2, "a prompt needs room for BOS and at least one token"
        if self.chat:
            ids = self.encode(self.render(messages, add_generation_prompt=True))
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)
        if len(ids) > max_len:
            keep = 1 if ids[0] == self.bos_id else 0
            ids = ids[:keep] + ids[len(ids) - (max_len - keep):]
        return ids

    def encode_response(self, messages, text: str, max_len: int) -> list[int]:
        """The response to `messages` -> ids ending with eos_id, keeping the FIRST max_len ids. A response cut this
        way has no EOS: a truncated demonstration teaches no stop, and overwriting its last id with EOS would teach
        a stop the data never made.

        With a chat template the response is what the template writes after the generation prompt (the
        conversation rendered with the answer, minus the prompt rendered with add_generation_prompt, as ids), so
        prompt + response is exactly the ids transformers gives the whole conversation; it ends at its first stop
        id (the "\\n" a template writes after <|im_end|> belongs to the next turn's layout)."""
        assert max_len >= 1
        if not self.chat:  # plain format: the prompt ends in "assistant:", the answer follows after one space
            return (self.encode(" " + text) + [self.eos_id])[:max_len]
        prompt = self.render(messages, add_generation_prompt=True)
        full = self.render(list(messages) + [{"role": "assistant", "content": text}], add_generation_prompt=False)
        if full.startswith(prompt):
            p_ids, f_ids = self.encode(prompt), self.encode(full)
            # a merge across the boundary would make the prompt's ids no prefix: then tokenize the rest on its own
            ids = f_ids[len(p_ids):] if f_ids[:len(p_ids)] == p_ids else self.encode(full[len(prompt):])
        else:
            # The template renders a finished assistant turn differently from a generation prompt followed by the
            # answer (DeepSeek-R1's prompt ends in "<think>\n", a finished turn drops the reasoning): train on what
            # sampling sees, the answer after the prompt, closed the way the template closes a turn.
            ids = self.encode(text + self._turn_tail)
        stop = set(self.stop_ids)
        end = next((k for k, i in enumerate(ids) if i in stop), None)
        ids = ids[:end + 1] if end is not None else ids + [self.eos_id]
        return ids[:max_len]


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


# -----------------------------------------------------------------------------
# Collation

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
