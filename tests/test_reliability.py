"""Fail loudly and early, lose nothing. Each case below is a mistake or a fault a user could really meet; every one
must stop with a message that says what is wrong and where, and leave every file on disk as it was (inputs, run
directories, checkpoints), including the run directory the failed command was pointed at."""
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from test_checkpoints import chat_data, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch_size", "4", "--micro_batch_size", "2", "--max_prompt_len", "96", "--no-progress"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a base checkpoint, data, trained SFT / DPO / RM checkpoints, and an SFT run with a resumable
    checkpoint (step 2 of 3, final/ written)."""
    d = tmp_path_factory.mktemp("ws")
    base = make_checkpoint("llama3.1", d / "base")
    data = chat_data(d, "llama3.1")
    steps = ["--max_steps", "2", *SMALL]
    train.main(["sft", "--model", str(base), "--data", str(data["sft"]), "--out", str(d / "sft"), *steps])
    sft = d / "sft" / "final"
    train.main(["dpo", "--model", str(sft), "--data", str(data["prefs"]), "--out", str(d / "dpo"), *steps])
    train.main(["rm", "--model", str(sft), "--data", str(data["prefs"]), "--eval_data", str(data["prefs"]),
                "--out", str(d / "rm"), *steps])
    train.main(["sft", "--model", str(base), "--data", str(data["sft"]), "--out", str(d / "resumable"),
                "--max_steps", "3", "--save_every", "1", *SMALL])
    assert train.latest_checkpoint(d / "resumable").name == "step_000002"
    return d


def sft_args(ws, out, *extra, model=None):
    return ["sft", "--model", str(model or ws / "base"), "--data", str(ws / "sft.jsonl"), "--out", str(out),
            "--max_steps", "2", *SMALL, *extra]


def resume_args(ws, *extra):
    return ["sft", "--model", str(ws / "base"), "--data", str(ws / "sft.jsonl"), "--out", str(ws / "resumable"),
            "--max_steps", "3", "--save_every", "1", *SMALL, "--resume", *extra]


def ppo_args(ws, out, *extra, rm=None, dpo=None):
    return ["ppo", "--algo", "rto", "--policy", str(ws / "sft" / "final"), "--dpo", str(dpo or ws / "dpo" / "final"),
            "--rm", str(rm or ws / "rm" / "final"), "--prompts", str(ws / "prompts.jsonl"), "--out", str(out),
            "--rollout_batch_size", "4", "--max_response_len", "8", "--max_steps", "2", *SMALL, *extra]


def copy_ckpt(ws, src, name):
    dst = ws / "cases" / name
    shutil.copytree(src, dst)
    return dst


def with_tensor(ws, name, fn):
    """A copy of the base checkpoint with one tensor changed by fn."""
    d = copy_ckpt(ws, ws / "base", name)
    sd = load_file(d / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    sd[key] = fn(sd[key])
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def with_config(ws, src, name, **change):
    d = copy_ckpt(ws, src, name)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    return d


def with_file(ws, src, name, file, data: bytes):
    d = copy_ckpt(ws, src, name)
    (d / file).write_bytes(data)
    return d


def data_file(ws, name, lines):
    p = ws / "cases" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines))
    return p


class Pwn:
    """Unpickling this writes a file: if that file appears, checkpoint code ran."""
    target = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def evil_metadata(ws, name, rewrite_manifest: bool):
    """A copy of the resumable run whose checkpoint's .metadata is a pickle that runs code; optionally with the
    manifest rewritten to match (an attacker who can write the directory can do that too)."""
    d = ws / "cases" / name
    shutil.copytree(ws / "resumable", d)
    ckpt = train.latest_checkpoint(d)
    Pwn.target = str(ws / "cases" / f"{name}.pwned")
    (ckpt / ".metadata").write_bytes(pickle.dumps(Pwn()))
    if rewrite_manifest:
        import checkpoint
        checkpoint.write_manifest(ckpt)
    return d


def truncated_shard(ws, name):
    d = ws / "cases" / name
    shutil.copytree(ws / "resumable", d)
    ckpt = train.latest_checkpoint(d)
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    import checkpoint
    checkpoint.write_manifest(ckpt)  # a file this project wrote, then damaged by the disk, say: the manifest matches
    return d


def rm_with_zero_std(ws):
    return with_config(ws, ws / "rm" / "final", "rm_std0", rto_score_std=0.0)


def other_tokenizer_dpo(ws):
    d = copy_ckpt(ws, ws / "dpo" / "final", "dpo_other_tok")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ROOT / "tests" / "fixtures" / "chat" / "smollm2" / f, d / f)
    return d


LIVE = {}


def live_lock(ws):
    """A lock held by another live process (a sleeping child of the test), with its pid and start time."""
    import rundir

    out = ws / "cases" / "locked"
    out.mkdir(parents=True)
    LIVE["proc"] = subprocess.Popen(["sleep", "120"])
    pid = LIVE["proc"].pid
    (out / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                              "start": rundir.proc_start(pid)}))
    return out


def finished(ws):
    out = ws / "cases" / "finished"
    shutil.copytree(ws / "sft", out)
    return out


# (id, setup(ws) -> argv, message regex). Every case: the message, and nothing on disk changed.
CASES = [
    # Bad: resume never runs a checkpoint's code
    ("resume-replaced-metadata", lambda ws: resume_args(ws, "--out", str(evil_metadata(ws, "evil1", False))),
     r"differ from manifest.json .* refusing to resume"),
    ("resume-replaced-metadata-and-manifest",
     lambda ws: resume_args(ws, "--out", str(evil_metadata(ws, "evil2", True))),
     r"pathlib.Path.write_text is not part of a checkpoint's metadata|is not part of a checkpoint's metadata"),
    # Bad: non-finite values stop the run before anything is saved from them
    ("ppo-beta3-1e39", lambda ws: ppo_args(ws, ws / "cases" / "nan_ppo", "--beta3", "1e39", "--save_every", "1"),
     r"step 1: reward.* not finite"),
    ("dpo-beta-inf", lambda ws: ["dpo", "--model", str(ws / "sft" / "final"), "--data", str(ws / "prefs.jsonl"),
                                 "--out", str(ws / "cases" / "dpo_inf"), "--beta", "inf", *SMALL],
     r"--beta inf: must be in \(0, inf\)"),
    ("nan-weights", lambda ws: sft_args(ws, ws / "cases" / "o_nan", model=with_tensor(
        ws, "nan", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))),
     r"tensor 'model.layers.0.mlp.up_proj.weight' holds NaN or infinite values"),
    # Bad: --resume with a changed meaning
    ("resume-changed-batch", lambda ws: [a if a != "4" else "8" for a in resume_args(ws)],
     r"--resume: .*step_000002 was written with other settings \(batch_size: 4 -> 8"),
    ("resume-changed-lr", lambda ws: resume_args(ws, "--lr", "1e-3"), r"other settings \(lr: 1e-05 -> 0.001\)"),
    ("resume-nothing", lambda ws: sft_args(ws, ws / "cases" / "never_ran", "--resume"),
     r"--resume: no complete checkpoint in .*never_ran/checkpoints"),
    # Bad: two runs in one directory, a finished run overwritten
    ("live-lock", lambda ws: sft_args(ws, live_lock(ws)), r"is in use by pid \d+ on .*run.lock"),
    ("finished-final", lambda ws: sft_args(ws, finished(ws)), r"final holds a finished run: pass --overwrite"),
    # Bad: values that make no sense
    *[(f"range-{flag}-{value}", (lambda f, v: lambda ws: ppo_args(ws, ws / "cases" / f"r_{f}", f"--{f}", v))(flag, value),
       rf"--{flag} {re.escape(value)}(\.0)?: must be in ")
      for flag, value in [("beta2", "-1"), ("lr", "inf"), ("top_p", "0"), ("batch_size", "0"),
                          ("micro_batch_size", "0"), ("ppo_epochs", "0"), ("max_response_len", "0"),
                          ("epochs", "0"), ("max_steps", "-1"), ("save_every", "-1"), ("temperature", "0"),
                          ("beta3", "nan")]],
    ("mixed-forms", lambda ws: ["sft", "--model", str(ws / "base"), "--out", str(ws / "cases" / "o_mixed"), *SMALL,
                                "--data", str(data_file(ws, "mixed.jsonl", [
                                    {"prompt": "a", "response": "b"},
                                    {"prompt": "a", "messages": [{"role": "user", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]}]))],
     r"mixed.jsonl:2: key 'messages': the row also has \['prompt'\]"),
    # Bad: the wrong kind of checkpoint in a slot
    ("rm-slot-policy", lambda ws: ppo_args(ws, ws / "cases" / "o_rmslot", "--no-normalize_reward",
                                           rm=ws / "sft" / "final"),
     r"--rm .* is a LlamaForCausalLM, a causal LM \(a policy\); --rm takes a reward model"),
    ("sample-on-rm", lambda ws: ["sample", "--model", str(ws / "rm" / "final"), "--prompt", "hi"],
     r"--model .* is a LlamaForSequenceClassification, a reward model"),
    ("dpo-other-tokenizer", lambda ws: ppo_args(ws, ws / "cases" / "o_tok", dpo=other_tokenizer_dpo(ws)),
     r"dpo_other_tok/tokenizer.json maps text to ids differently from .*sft/final/tokenizer.json \(--dpo against "
     r"--policy"),
    # Weak: say what and where
    ("config-not-json", lambda ws: sft_args(ws, ws / "cases" / "o_cfg", model=with_file(
        ws, ws / "base", "badcfg", "config.json", b'{"hidden_size": 32,')), r"config.json: not valid JSON"),
    ("config-wrong-type", lambda ws: sft_args(ws, ws / "cases" / "o_type", model=with_config(
        ws, ws / "base", "strcfg", hidden_size="32")), r"field 'hidden_size' is '32'; expected a positive integer"),
    ("tokenizer-not-json", lambda ws: sft_args(ws, ws / "cases" / "o_tk", model=with_file(
        ws, ws / "base", "badtok", "tokenizer.json", b"{oops")), r"tokenizer.json: not a tokenizers file"),
    ("tokenizer-config-bad", lambda ws: sft_args(ws, ws / "cases" / "o_tkc", model=with_file(
        ws, ws / "base", "badtkc", "tokenizer_config.json", b'{"eos_token": "<|nope|>", "added_tokens_decoder": {}}')),
     r"field 'eos_token' is '<\|nope\|>', which tokenizer.json does not hold"),
    ("safetensors-truncated", lambda ws: sft_args(ws, ws / "cases" / "o_st", model=with_file(
        ws, ws / "base", "badst", "model.safetensors", (ws / "base" / "model.safetensors").read_bytes()[:200])),
     r"model.safetensors: not a readable safetensors file"),
    ("dcp-shard-damaged", lambda ws: resume_args(ws, "--out", str(truncated_shard(ws, "badshard"))),
     r"step_000002: the checkpoint does not load"),
    ("data-not-utf8", lambda ws: sft_args(ws, ws / "cases" / "o_utf") + ["--data", str(data_file(
        ws, "latin1.jsonl", [{"prompt": "a", "response": "b"}, '{"prompt": "caf\xe9", "response": "b"}'.encode("latin-1")]))],
     r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"),
    ("prompt-longer-than-context", lambda ws: sft_args(ws, ws / "cases" / "o_ctx", "--max_prompt_len", "200",
                                                       model=with_config(ws, ws / "base", "ctx64",
                                                                         max_position_embeddings=40)),
     r"sft.jsonl:\d+: prompt \+ response is \d+ tokens, more than the model's context of 40"),
    ("rm-std-zero", lambda ws: ppo_args(ws, ws / "cases" / "o_std", rm=rm_with_zero_std(ws)),
     r"rm_std0/config.json: field 'rto_score_std' is 0.0"),
    ("degenerate-prefs", lambda ws: ["rm", "--model", str(ws / "sft" / "final"), "--out", str(ws / "cases" / "o_deg"),
                                     *SMALL, "--data", str(data_file(ws, "same.jsonl", [
                                         {"prompt": "q", "chosen": "same", "rejected": "same"}] * 8))],
     r"same.jsonl: in every pair the chosen and rejected responses are identical"),
]


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def with_meta(ws, name, **change):
    """A copy of the resumable run whose checkpoint's meta.json is changed, the manifest rewritten to match (the
    damage a buggy tool or a careless hand can do while keeping the hashes right)."""
    import checkpoint

    d = ws / "cases" / name
    shutil.copytree(ws / "resumable", d)
    ckpt = train.latest_checkpoint(d)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, **change}))
    checkpoint.write_manifest(ckpt)
    return d


def with_ckpt_file(ws, name, file, data: bytes):
    d = ws / "cases" / name
    shutil.copytree(ws / "resumable", d)
    (train.latest_checkpoint(d) / file).write_bytes(data)
    return d


def with_run_file(ws, name, file, data: bytes):
    d = ws / "cases" / name
    shutil.copytree(ws / "resumable", d)
    (d / file).write_bytes(data)
    return d


def with_json(ws, src, name, file, **change):
    d = copy_ckpt(ws, src, name)
    obj = json.loads((d / file).read_text())
    (d / file).write_text(json.dumps({**obj, **change}))
    return d


def long_eval_rows(ws):
    """Held-out preference rows longer than a context of 96 tokens (the training rows fit)."""
    long = " ".join(["word"] * 200)
    return data_file(ws, "long_eval.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                             {"prompt": "q", "chosen": long, "rejected": "b"}])


def rm_args(ws, out, *extra, model=None):
    return ["rm", "--model", str(model or ws / "sft" / "final"), "--data", str(ws / "prefs.jsonl"), "--out", str(out),
            "--max_steps", "1", *SMALL, *extra]


# The second fault trial's cases (a hostile user: lying checkpoints, hostile data): each one line, nothing changed.
CASES += [
    ("config-rope-theta-inf", lambda ws: sft_args(ws, ws / "cases" / "o_rt", model=with_config(
        ws, ws / "base", "rt_inf", rope_theta=float("inf"))), r"config.json: field 'rope_theta' is inf; expected a finite"),
    ("config-norm-eps-inf", lambda ws: sft_args(ws, ws / "cases" / "o_eps", model=with_config(
        ws, ws / "base", "eps_inf", rms_norm_eps=float("inf"))), r"field 'rms_norm_eps' is inf; expected a finite"),
    ("config-a-hundred-million-layers", lambda ws: sft_args(ws, ws / "cases" / "o_layers", model=with_config(
        ws, ws / "base", "layers", num_hidden_layers=10**8)),
     r"layers/config.json: .*B parameters .*num_hidden_layers 100000000.* more than the .* GiB free"),
    ("config-max-pos-null", lambda ws: sft_args(ws, ws / "cases" / "o_mp0", model=with_config(
        ws, ws / "base", "mp_null", max_position_embeddings=None)), r"field 'max_position_embeddings' is null"),
    ("config-max-pos-string", lambda ws: sft_args(ws, ws / "cases" / "o_mps", model=with_config(
        ws, ws / "base", "mp_str", max_position_embeddings="4k")), r"field 'max_position_embeddings' is '4k'"),
    ("config-rope-scaling-string", lambda ws: sft_args(ws, ws / "cases" / "o_rs", model=with_config(
        ws, ws / "base", "rs_str", rope_scaling="llama3")), r"field 'rope_scaling' is 'llama3'; expected an object"),
    ("config-model-type-list", lambda ws: sft_args(ws, ws / "cases" / "o_mt", model=with_config(
        ws, ws / "base", "mt_list", model_type=["llama"])), r"field 'model_type' is \['llama'\]"),
    ("config-negative-kv-heads", lambda ws: sft_args(ws, ws / "cases" / "o_kv", model=with_config(
        ws, ws / "base", "kv_neg", num_key_value_heads=-1)), r"field 'num_key_value_heads' is -1"),
    ("config-negative-head-dim", lambda ws: sft_args(ws, ws / "cases" / "o_hd", model=with_config(
        ws, ws / "base", "hd_neg", head_dim=-16)), r"field 'head_dim' is -16"),
    ("config-heads-do-not-divide", lambda ws: sft_args(ws, ws / "cases" / "o_div", model=with_config(
        ws, ws / "base", "heads3", num_key_value_heads=3)), r"heads3/config.json: n_heads 2 is not divisible by n_kv"),
    ("config-tie-string", lambda ws: sft_args(ws, ws / "cases" / "o_tie", model=with_config(
        ws, ws / "base", "tie_str", tie_word_embeddings="false")), r"field 'tie_word_embeddings' is 'false'; expected true"),
    ("config-bias-string", lambda ws: sft_args(ws, ws / "cases" / "o_bias", model=with_config(
        ws, ws / "base", "bias_str", attention_bias="no")), r"field 'attention_bias' is 'no'; expected true or false"),
    ("config-pad-beyond-vocab", lambda ws: sft_args(ws, ws / "cases" / "o_pad", model=with_config(
        ws, ws / "base", "pad_big", pad_token_id=10**6)), r"field 'pad_token_id' is 1000000; expected token ids in \[0, "),
    ("config-nested-json", lambda ws: sft_args(ws, ws / "cases" / "o_nest", model=with_file(
        ws, ws / "base", "nested_cfg", "config.json", nested_json(100000))), r"config.json: not valid JSON: RecursionError"),
    ("rm-score-std-string", lambda ws: ppo_args(ws, ws / "cases" / "o_stds", rm=with_config(
        ws, ws / "rm" / "final", "rm_std_str", rto_score_std="1.0")), r"field 'rto_score_std' is '1.0'; expected a finite"),
    ("tokenizer-special-tokens-int", lambda ws: sft_args(ws, ws / "cases" / "o_ast", model=with_json(
        ws, ws / "base", "ast_int", "tokenizer_config.json", additional_special_tokens=5)),
     r"field 'additional_special_tokens' is 5; expected a list"),
    ("generation-config-negative-stop", lambda ws: sft_args(ws, ws / "cases" / "o_neg", model=with_json(
        ws, ws / "base", "neg_stop", "generation_config.json", eos_token_id=[421, -1])),
     r"generation_config.json field 'eos_token_id': expected a token id \(an int >= 0\)"),
    ("data-nested-json", lambda ws: sft_args(ws, ws / "cases" / "o_dnest") + ["--data", str(data_file(
        ws, "nested.jsonl", [{"prompt": "a", "response": "b"}, b'{"prompt": ' + nested_json(100000) + b"}"]))],
     r"nested.jsonl:2: invalid JSON: nested deeper than Python can read"),
    ("data-lone-surrogate", lambda ws: sft_args(ws, ws / "cases" / "o_sur") + ["--data", str(data_file(
        ws, "surrogate.jsonl", [{"prompt": "a", "response": "b"}, b'{"prompt": "a", "response": "x\\ud800y"}']))],
     r"surrogate.jsonl:2: key 'response': holds a lone surrogate \('\\ud800' at character 2\)"),
    ("data-duplicate-key", lambda ws: sft_args(ws, ws / "cases" / "o_dup") + ["--data", str(data_file(
        ws, "dup.jsonl", [{"prompt": "a", "response": "b"}, b'{"prompt": "a", "response": "b", "prompt": "c"}']))],
     r"dup.jsonl:2: key 'prompt': appears twice"),
    ("data-response-only-eos", lambda ws: sft_args(ws, ws / "cases" / "o_eos") + ["--data", str(data_file(
        ws, "only_eos.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "<|eot_id|>"}]))],
     r"only_eos.jsonl:2: the response '<\|eot_id\|>' holds no text once tokenized"),
    ("rm-eval-rows-past-the-context", lambda ws: rm_args(ws, ws / "cases" / "o_ev", "--eval_data",
                                                         str(long_eval_rows(ws)), model=with_config(
        ws, ws / "sft" / "final", "sft_ctx", max_position_embeddings=120)),
     r"long_eval.jsonl:2: prompt \+ response is \d+ tokens, more than the model's context of 120"),
    ("out-is-the-input", lambda ws: sft_args(ws, ws / "sft" / "final", "--overwrite", model=ws / "sft" / "final"),
     r"--out .*sft/final holds the input --model"),
    ("out-holds-the-input", lambda ws: sft_args(ws, ws / "sft", "--overwrite", model=ws / "sft" / "final"),
     r"--out .*/sft holds the input --model .*sft/final"),
    ("resume-train-config-damaged", lambda ws: resume_args(ws, "--out", str(with_ckpt_file(
        ws, "bad_tc", "train_config.json", b'{"lr": '))), r"train_config.json: JSONDecodeError: .*damaged"),
    ("resume-metrics-damaged", lambda ws: resume_args(ws, "--out", str(with_run_file(
        ws, "bad_metrics", "metrics.jsonl", b'{"step": 1, "loss": 1.0}\n{"step": "two"}\n'))),
     r"metrics.jsonl:2: not a metrics row"),
    ("resume-meta-string-step", lambda ws: resume_args(ws, "--out", str(with_meta(ws, "str_step", step="2"))),
     r"meta.json: expected \{'step': an int >= 1"),
]


# ----------------------------------------------------------------------------------------------------------
# The third fault trial: mixed tokenizers, links and pipes in run directories, prompts that cannot fit, hostile
# tokenizer files, commands that read less than they are given. Each: one line, nothing on disk changed.


def reordered_merges_dpo(ws):
    """The DPO model's tokenizer with the same vocabulary (the same size, the same tokens and ids) but its BPE merges
    in another order: the same text gets other ids."""
    d = copy_ckpt(ws, ws / "dpo" / "final", "dpo_merges")
    tk = json.loads((d / "tokenizer.json").read_text())
    tk["model"]["merges"] = tk["model"]["merges"][::-1]
    (d / "tokenizer.json").write_text(json.dumps(tk))
    return d


def cut_vocabulary(ws):
    """The base model with its embedding cut to fewer rows than its tokenizer's ids."""
    d = copy_ckpt(ws, ws / "base", "cut_vocab")
    sd = load_file(d / "model.safetensors")
    rows = sd["model.embed_tokens.weight"].shape[0] - 40
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in sd:
            sd[k] = sd[k][:rows].contiguous()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows, "bos_token_id": None, "eos_token_id": None,
                                               "pad_token_id": None}))
    return d


def out_with(ws, name, entry, make):
    """A run directory holding `entry` made by make(path)."""
    out = ws / "cases" / name
    out.mkdir(parents=True)
    make(out / entry)
    return out


def user_file(ws) -> Path:
    p = ws / "cases" / "users_notes.txt"
    if not p.exists():
        p.write_text("a file of the user's, not the run's")
    return p


def resumable_with_fifo(ws, name, file, in_checkpoint: bool):
    d = ws / "cases" / name
    shutil.copytree(ws / "resumable", d)
    where = train.latest_checkpoint(d) if in_checkpoint else d
    (where / file).unlink(missing_ok=True)
    os.mkfifo(where / file)
    return d


def simpo_export_without_its_run(ws):
    """A DPO-stage export made with SimPO (its config.json says so), without the train_config.json beside it."""
    d = copy_ckpt(ws, ws / "dpo" / "final", "simpo_bare")
    (d / "train_config.json").unlink()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rto_loss_type": "simpo", "rto_implicit_reward": False}))
    return d


def panicking_tokenizer(ws):
    """The base model with a pre-tokenizer whose regex backtracks past the regex engine's limit on some text."""
    d = copy_ckpt(ws, ws / "base", "panic_tok")
    tk = json.loads((d / "tokenizer.json").read_text())
    tk["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False},
        tk["pre_tokenizer"]]}
    (d / "tokenizer.json").write_text(json.dumps(tk))
    return d


def deeply_nested_template(ws):
    d = copy_ckpt(ws, ws / "base", "nested_tpl")
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    template = "{% if true %}" * 5000 + "{{ messages }}" + "{% endif %}" * 5000
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return d


CASES += [
    ("tokenizer-same-vocabulary-other-merges", lambda ws: ppo_args(ws, ws / "cases" / "o_merges",
                                                                   dpo=reordered_merges_dpo(ws)),
     r"dpo_merges/tokenizer.json maps text to ids differently from .*sft/final/tokenizer.json \(--dpo against "
     r"--policy: their model differ"),
    ("tokenizer-larger-than-the-model", lambda ws: sft_args(ws, ws / "cases" / "o_cut", model=cut_vocabulary(ws)),
     r"cut_vocab/tokenizer.json makes ids up to \d+, but .*cut_vocab/config.json has vocab_size \d+"),
    ("run-lock-a-link", lambda ws: sft_args(ws, out_with(ws, "lock_link", "run.lock",
                                                         lambda p: p.symlink_to(user_file(ws)))),
     r"lock_link/run.lock is a symbolic link, where a file of this run belongs"),
    ("train-config-a-pipe", lambda ws: sft_args(ws, out_with(ws, "tc_fifo", "train_config.json", os.mkfifo)),
     r"tc_fifo/train_config.json is a named pipe \(FIFO\), where a file of this run belongs"),
    ("metrics-a-pipe", lambda ws: sft_args(ws, out_with(ws, "m_fifo", "metrics.jsonl", os.mkfifo)),
     r"m_fifo/metrics.jsonl is a named pipe"),
    ("resume-metrics-a-pipe", lambda ws: resume_args(ws, "--out", str(resumable_with_fifo(ws, "rm_fifo",
                                                                                          "metrics.jsonl", False))),
     r"rm_fifo/metrics.jsonl is a named pipe"),
    ("resume-checkpoint-config-a-pipe", lambda ws: resume_args(ws, "--out", str(resumable_with_fifo(
        ws, "ck_fifo", "train_config.json", True))), r"step_000002/train_config.json is a named pipe"),
    ("final-tmp-a-link", lambda ws: sft_args(ws, out_with(ws, "tmp_link", "final.tmp",
                                                          lambda p: p.symlink_to(ws / "base"))),
     r"tmp_link/final.tmp is a symbolic link, where this run's export belongs"),
    ("final-a-link-overwritten", lambda ws: sft_args(ws, out_with(ws, "final_link", "final",
                                                                  lambda p: p.symlink_to(ws / "sft" / "final")),
                                                     "--overwrite"),
     r"final_link/final is a symbolic link"),
    ("prompt-that-cannot-fit", lambda ws: sft_args(ws, ws / "cases" / "o_fit", "--max_prompt_len", "40") + [
        "--data", str(data_file(ws, "long_system.jsonl", [{"messages": [
            {"role": "system", "content": " ".join(["rule"] * 60)}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]}]))],
     r"long_system.jsonl:1: the prompt is \d+ tokens: with its longest message emptied it is still \d+, more than "
     r"max_prompt_len 40"),
    ("simpo-export-as-dpo-without-its-run", lambda ws: ppo_args(ws, ws / "cases" / "o_simpo",
                                                                dpo=simpo_export_without_its_run(ws)),
     r"simpo_bare was trained with loss_type 'simpo', which has no reference model"),
    ("explain-set-a-dpo-field", lambda ws: ["explain", "--dpo", str(ws / "dpo" / "final"), "--ref",
                                            str(ws / "sft" / "final"), "--prompt", "hi", "--set", "dpo.beta=0.2",
                                            "--html", ""],
     r"--set 'dpo.beta=0.2': expected STAGE.FIELD=VALUE with STAGE one of ppo"),
    ("tokenizer-regex-panics", lambda ws: sft_args(ws, ws / "cases" / "o_panic", model=panicking_tokenizer(ws)) + [
        "--data", str(data_file(ws, "aaa.jsonl", [{"prompt": "a" * 40 + "b", "response": "ok"}]))],
     r"panic_tok/tokenizer.json: the tokenizer failed on this text \(.*retry-limit"),
    ("template-nested-too-deeply", lambda ws: sft_args(ws, ws / "cases" / "o_nest_tpl", model=deeply_nested_template(ws)),
     r"nested_tpl: chat_template cannot be compiled \(RecursionError"),
]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fails_loudly_and_changes_nothing(ws, case):
    name, setup, pattern = case
    argv = setup(ws)
    before = tree(ws)
    with pytest.raises((ValueError, KeyError, OSError)) as e:
        train.main(argv)
    msg = e.value.args[0] if isinstance(e.value, KeyError) else str(e.value)
    assert re.search(pattern, msg), msg
    assert tree(ws) == before  # nothing written, nothing left behind, nothing half-changed
    assert not list((ws / "cases").glob("*.pwned"))  # and no checkpoint code ran


def test_blow_up_mid_run_stops_before_saving(ws):
    """A learning rate that blows the weights up after a few steps: the run stops at the first non-finite loss or
    gradient norm, names it, saves no checkpoint or export from that state, and its metrics file stays valid JSON."""
    out = ws / "cases" / "blowup"
    with pytest.raises(ValueError, match=r"step (\d+): (loss|grad_norm|model weights|model outputs).* not finite") as e:
        train.main(sft_args(ws, out, "--lr", "1e30", "--max_steps", "6", "--save_every", "1"))
    bad_step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] in (list(range(1, bad_step)), list(range(1, bad_step + 1)))  # nothing after
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert not (out / "final").exists()
    last = train.latest_checkpoint(out)
    assert last is None or int(last.name.split("_")[1]) < bad_step


def test_enough_cases():
    assert len(CASES) >= 17


def test_cli_prints_one_line_not_a_traceback(ws):
    cmd = [sys.executable, "train.py", *ppo_args(ws, ws / "cases" / "cli", "--top_p", "0")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: --top_p 0.0: must be in (0, 1]",
                                              "(run with --debug or RTO_DEBUG=1 for the traceback)"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "RTO_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_stale_lock_is_reported_and_taken_over(ws, capsys):
    out = ws / "cases" / "stale"
    out.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    train.main(sft_args(ws, out))
    assert f"left by pid {pid}, which is no longer running; taking it over" in capsys.readouterr().out
    assert (out / "final").is_dir() and not (out / "run.lock").exists()  # released at the end


def test_own_pid_or_a_reused_pid_is_a_stale_lock(ws, capsys):
    """In a container pids repeat from run to run: a lock naming this very process (which never took it), or a
    live pid whose start time differs from the one recorded, was left by a dead run."""
    import rundir

    for name, lock in (("ownpid", {"pid": os.getpid()}), ("reused", {"pid": os.getppid(), "start": "1"})):
        out = ws / "cases" / name
        out.mkdir(parents=True)
        (out / "run.lock").write_text(json.dumps({**lock, "host": socket.gethostname()}))
        rundir.take_lock(out)
        assert "taking it over" in capsys.readouterr().out
        assert json.loads((out / "run.lock").read_text())["start"] == rundir.proc_start(os.getpid())
        rundir.release_locks(True)
        assert not (out / "run.lock").exists()


def test_a_zombie_holders_lock_is_stale(ws, capsys):
    """A run killed together with its launcher leaves its workers as zombies until someone reaps them (in a
    container, maybe never): the pid still answers kill(pid, 0), but the process is gone and its flock free."""
    import rundir

    out = ws / "cases" / "zombie"
    out.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while (rundir.proc_stat(child.pid) or ["?"])[0] != "Z":  # exited, not reaped: a zombie
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    (out / "run.lock").write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(),
                                              "start": rundir.proc_start(child.pid)}))
    try:
        rundir.take_lock(out)
        assert f"left by pid {child.pid}, which is no longer running; taking it over" in capsys.readouterr().out
        rundir.release_locks(True)
    finally:
        child.wait()


def test_lock_is_held_during_the_run_and_released(ws, monkeypatch):
    out = ws / "cases" / "held"
    seen = {}
    real = train.fit

    def spy(cfg, run_dir, *a, **kw):
        seen["lock"] = json.loads((run_dir / "run.lock").read_text())
        return real(cfg, run_dir, *a, **kw)

    monkeypatch.setattr(train, "fit", spy)
    train.main(sft_args(ws, out))
    assert seen["lock"]["pid"] == os.getpid() and seen["lock"]["host"] == socket.gethostname()
    assert not (out / "run.lock").exists()


def test_full_disk_during_export_keeps_the_old_final(ws, monkeypatch):
    """--overwrite into a finished run, and the disk fills while the new final/ is written: the error names the path
    and the cause, and the old final/ is exactly as it was."""
    out = ws / "cases" / "fulldisk"
    shutil.copytree(ws / "sft", out)
    before = tree(out / "final")
    import hf

    def full(path, meta, fetch):  # half a file written, then the disk is full
        path.write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(hf, "write_safetensors", full)
    with pytest.raises(OSError, match=r"could not write .*fulldisk/final: No space left on device"):
        train.main(sft_args(ws, out, "--overwrite"))
    assert tree(out / "final") == before and not (out / "final.tmp").exists()


def test_resume_may_change_the_safe_fields(ws):
    """max_steps, save_every and progress may change on --resume; the run continues from its checkpoint."""
    d = ws / "cases" / "safe_resume"
    shutil.copytree(ws / "resumable", d)
    args = resume_args(ws, "--out", str(d))
    args[args.index("--max_steps") + 1] = "4"
    args[args.index("--save_every") + 1] = "0"
    train.main(args)
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_metrics_stay_valid_json_with_a_non_finite_metric(tmp_path):
    import rundir

    log = rundir.Logger(tmp_path, 0, ["x"])
    log.log(1, {"x": float("nan"), "y": 1.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "x": None, "y": 1.0}


# ----------------------------------------------------------------------------------------------------------
# Hostile chat templates: each a one-line error naming the template and the data line, and never a hang.

HOSTILE_TEMPLATES = {
    "loops-forever": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                      r"ran for more than 0.5 s"),
    "writes-forever": ("{% for i in range(99999) %}{% for j in range(99999) %}{{ 'x' * 50 }}{% endfor %}{% endfor %}",
                       r"wrote more than \d+ characters"),
    "recurses": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", r"failed on this conversation: RecursionError"),
    "divides-by-zero": ("{{ 1 / 0 }}", r"failed on this conversation: ZeroDivisionError"),
    "range-too-big": ("{% for i in range(10**9) %}x{% endfor %}", r"OverflowError: Range too big"),
    "includes-a-file": ("{% include '/etc/passwd' %}", r"failed on this conversation: TypeError: no loader"),
    # renders the probe conversation, then fails on the data's second row only
    "fails-on-one-row": ("{% for m in messages %}{% if m['content'] == 'Name a colour.' %}{{ 1 / 0 }}{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}", r"sft.jsonl:2: the chat template"),
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_hostile_chat_templates(ws, monkeypatch, name):
    import hf

    monkeypatch.setattr(hf, "TEMPLATE_SECONDS", 0.5)
    template, pattern = HOSTILE_TEMPLATES[name]
    model = copy_ckpt(ws, ws / "base", f"tpl_{name}")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    before = tree(ws)
    with pytest.raises(ValueError, match=pattern) as e:
        train.main(sft_args(ws, ws / "cases" / f"o_tpl_{name}", model=model))
    assert "chat template of " in str(e.value) and "tokenizer_config.json chat_template" in str(e.value)
    assert tree(ws) == before


# ----------------------------------------------------------------------------------------------------------
# One owner per directory: races between runs, and the leftovers of kills and full disks

def _take(out, q):
    """A child process: try to take the lock on out, report, hold it a moment so the others see it held."""
    import time


    import rundir
    try:
        rundir.take_lock(Path(out))
        q.put("won")
        time.sleep(1.0)
    except ValueError as e:
        q.put(f"refused: {e}")


def test_many_takers_of_one_stale_lock_one_winner(tmp_path):
    """Eight processes find the same stale run.lock (its process is gone) at once: exactly one takes it over, the
    other seven are refused naming the winner (the old takeover unlinked whatever lock was there, so several won)."""
    import multiprocessing as mp

    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_take, args=(str(out), q)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = [q.get(timeout=5) for _ in procs]
    assert results.count("won") == 1, results
    assert all(r.startswith("refused: ") and "is in use by pid" in r for r in results if r != "won"), results


def test_two_pipelines_on_one_out(tmp_path):
    """Two `train.py all` on one --out: the second is refused before it writes anything (its data files included),
    and the first finishes on its own data."""
    out = tmp_path / "demo"
    small = ["all", "--out", str(out), "--n_sft", "128", "--n_pref", "128", "--n_prompts", "64", "--n_eval", "16",
             "--set", "sft.epochs=1", "--set", "dpo.epochs=1", "--set", "rm.epochs=1", "--set", "ppo.max_steps=2",
             "--algos", "ppo", "--no-progress"]
    first = subprocess.Popen([sys.executable, "train.py", *small], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    for _ in range(600):  # wait until the first holds the lock
        if (out / "run.lock").exists():
            break
        import time
        time.sleep(0.05)
    data_before = {p.name: p.read_bytes() for p in (out / "data").glob("*.jsonl")} if (out / "data").exists() else {}
    second = subprocess.run([sys.executable, "train.py", *small, "--seed", "1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log[-2000:]
    prompts = (out / "data" / "prompts.jsonl").read_text()
    assert all(data_before.get(p.name, p.read_bytes()) == p.read_bytes() for p in (out / "data").glob("*.jsonl"))
    assert json.loads((out / "ppo" / "final" / "train_config.json").read_text())["seed"] == 0 and prompts


def test_two_sweeps_on_one_out(tmp_path):
    import sweep

    out = tmp_path / "sweep"
    out.mkdir()
    import rundir
    rundir.take_lock(out)  # a running sweep holds it
    try:
        with pytest.raises(ValueError, match="is in use by pid"):
            sweep.main(["--quick", "--out", str(out)])
        assert [p.name for p in out.iterdir()] == ["run.lock"]  # the second wrote nothing
    finally:
        rundir.release_locks(True)


def test_failed_overwrite_keeps_the_finished_runs_records(ws):
    """--overwrite into a finished run that then blows up mid-run: the finished run's final/, metrics.jsonl and
    train_config.json are as they were (the new run's records waited beside them, under .next)."""
    out = ws / "cases" / "overwrite_fail"
    shutil.copytree(ws / "sft", out)
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "train_config.json")}
    final_before = tree(out / "final")
    with pytest.raises(ValueError, match="not finite"):
        train.main(sft_args(ws, out, "--overwrite", "--lr", "1e30", "--max_steps", "6"))
    assert {f: (out / f).read_bytes() for f in before} == before and tree(out / "final") == final_before
    # and a successful overwrite takes all three over
    train.main(sft_args(ws, out, "--overwrite"))
    assert json.loads((out / "train_config.json").read_text())["overwrite"] is True
    assert not list(out.glob("*.next"))


def test_kill_between_the_two_renames_of_an_export(ws, capsys):
    """final.old + final.tmp and no final/ (a kill between replace_dir's renames): the next run finishes the swap and
    says so; a lone final.tmp (a kill mid-write) is removed; nothing is lost."""
    out = ws / "cases" / "killed_swap"
    shutil.copytree(ws / "sft", out)
    os.replace(out / "final", out / "final.old")
    shutil.copytree(out / "final.old", out / "final.tmp")
    (out / "final.tmp" / "marker").write_text("new")
    with pytest.raises(ValueError, match="holds a finished run"):  # restored, then refused as finished
        train.main(sft_args(ws, out))
    assert "moved into place" in capsys.readouterr().out
    assert (out / "final" / "marker").exists() and not (out / "final.old").exists() and not (out / "final.tmp").exists()
    (out / "final.tmp").mkdir()
    with pytest.raises(ValueError, match="holds a finished run"):
        train.main(sft_args(ws, out))
    assert "removed (an export that a kill cut short" in capsys.readouterr().out and not (out / "final.tmp").exists()


def test_lock_that_cannot_be_written_leaves_nothing(ws, monkeypatch):
    import rundir

    out = ws / "cases" / "lock_full"

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=r"could not write .*run.lock: No space left on device"):
        train.main(sft_args(ws, out))
    monkeypatch.undo()
    assert not out.exists()  # not even the directory: nothing for a later run to trip over
    rundir.release_locks(True)


def test_empty_lock_from_a_full_disk_is_taken_over(ws, capsys):
    out = ws / "cases" / "empty_lock"
    out.mkdir(parents=True)
    (out / "run.lock").write_text("")
    train.main(sft_args(ws, out))
    assert (out / "final").is_dir() and not (out / "run.lock").exists()


def test_finite_weights_with_overflowing_outputs_are_not_exported(ws):
    """lr 1e30 for one step: every weight stays finite but the logits overflow; the export is refused."""
    out = ws / "cases" / "overflow"
    with pytest.raises(ValueError, match=r"step export: model outputs not finite"):
        train.main(sft_args(ws, out, "--lr", "1e30", "--max_steps", "1"))
    assert not (out / "final").exists() and not (out / "final.tmp").exists()


def test_file_size_limit_during_export_and_checkpoint(ws, tmp_path):
    """A real limit (ulimit -f): the export and the checkpoint each fail in one line that says so, nothing left."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # the model is 149 KB, the tokenizer 8 KB

    for name, extra, pattern in (("export", [], r"could not write .*final: File too large"),
                                 ("checkpoint", ["--save_every", "1"], r"could not write checkpoint .*a write was cut "
                                                                       r"short: a file-size limit|File too large")):
        out = tmp_path / name
        p = subprocess.run([sys.executable, "train.py", *sft_args(ws, out, *extra)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, preexec_fn=limited)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert re.search(pattern, p.stderr), p.stderr
        assert not (out / "final").exists() and not (out / "final.tmp").exists()
        assert not list((out / "checkpoints").glob("*.tmp")) if (out / "checkpoints").exists() else True


def test_exports_are_readable_by_others(ws):
    final = ws / "sft" / "final"
    modes = {p.name: p.stat().st_mode & 0o777 for p in final.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_special_token_text_in_data_is_named(ws, capsys):
    data = data_file(ws, "special_text.jsonl", [{"prompt": "a", "response": "b"},
                                                 {"prompt": "say <|eot_id|> please", "response": "b"}] * 2)
    train.main(sft_args(ws, ws / "cases" / "o_special") + ["--data", str(data)])
    out = capsys.readouterr().out
    assert "special_text.jsonl:2: the text holds '<|eot_id|>', which the tokenizer reads as that special token" in out
    assert "2 of 4 rows do" in out


def test_temperature_near_zero_samples_the_argmax(ws, capsys):
    """`sample --temperature 1e-30`: logits / T overflows; the sampler shifts first and gives the greedy answer."""
    base = ["sample", "--model", str(ws / "sft" / "final"), "--prompt", "hi", "--max_new_tokens", "6"]
    train.main(base + ["--temperature", "0"])
    greedy = capsys.readouterr().out
    train.main(base + ["--temperature", "1e-30"])
    assert capsys.readouterr().out == greedy


# ----------------------------------------------------------------------------------------------------------
# The third fault trial, continued: what needs a run of its own

TINY_ALL = ["--n_sft", "128", "--n_pref", "128", "--n_prompts", "64", "--n_eval", "16", "--set", "sft.epochs=1",
            "--set", "dpo.epochs=1", "--set", "rm.epochs=1", "--set", "ppo.max_steps=1", "--algos", "ppo",
            "--no-progress", "--reuse"]


def test_reuse_decides_on_content(tmp_path, capsys):
    """--reuse keeps a stage only when its config, its inputs by content and its own weights are what it recorded:
    weights replaced by another model's, data rewritten under the same name (an `all` killed while writing them) and
    a final/ missing its weights are all run again, each saying why; an untouched stage is kept."""
    out = tmp_path / "p"
    train.main(["all", "--out", str(out), *TINY_ALL])

    def mtimes():
        return {s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in ("sft", "dpo", "rm")}
    first = mtimes()
    shutil.copy(out / "sft" / "final" / "model.safetensors", out / "dpo" / "final" / "model.safetensors")
    (out / "rm" / "final" / "model.safetensors").unlink()
    capsys.readouterr()
    train.main(["all", "--out", str(out), *TINY_ALL])
    said = capsys.readouterr().out
    assert re.search(r"dpo/final is run again: its weights were changed since it wrote them \(model.safetensors\)", said)
    assert re.search(r"rm/final is run again: its weight files are missing", said)
    assert re.search(r"sft/final is what this stage would make .*: kept", said)
    second = mtimes()
    assert second["sft"] == first["sft"] and second["dpo"] != first["dpo"] and second["rm"] != first["rm"]
    # the preference file rewritten with other rows (an interrupted run, a hand edit): DPO and the RM train again
    prefs = out / "data" / "prefs.jsonl"
    real = prefs.read_bytes()
    lines = real.splitlines(keepends=True)
    import pipeline
    real_task_data = pipeline.task_data

    def task_data_then_edit(pc):  # the pipeline writes its data, then something changes the file before DPO reads it
        result = real_task_data(pc)
        prefs.write_bytes(b"".join(lines[1:] + lines[:1]))
        return result
    pipeline.task_data = task_data_then_edit
    try:
        train.main(["all", "--out", str(out), *TINY_ALL])
    finally:
        pipeline.task_data = real_task_data
    said = capsys.readouterr().out
    assert re.search(r"dpo/final is run again: its inputs changed since it was made \(--data file\)", said), said
    assert re.search(r"rm/final is run again: its inputs changed since it was made \(--data file\)", said)
    assert mtimes()["sft"] == first["sft"]


FORKED_RANK = '''
import sys
sys.path.insert(0, {root!r})
import os
if os.environ.get("RANK") == "1":
    sys.argv += ["--lr", "0.001"]  # what a per-rank launcher script or environment can do
import train
train.main(sys.argv[1:])
'''


def test_ranks_with_different_configs_stop_before_any_work(ws, tmp_path):
    """A torchrun job whose rank 1 was given another --lr: every rank stops at start with one error naming the field
    and the rank, and the run directory is never created."""
    from test_dist import free_port

    script = tmp_path / "forked.py"
    script.write_text(FORKED_RANK.format(root=str(ROOT)))
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(script), *sft_args(ws, out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert "the ranks of this job disagree: --lr is 1e-05 on rank 0 but 0.001 on rank 1" in p.stdout + p.stderr
    assert not out.exists()


def test_fp16_export_beyond_its_range_is_refused(ws):
    """Weights beyond fp16's largest value (65504) would be exported as inf: the export is refused, naming the tensor
    and its magnitude, and no final/ is written."""
    big = with_tensor(ws, "huge", lambda t: t * 0 + 1e6)
    out = ws / "cases" / "o_fp16"
    with pytest.raises(ValueError, match=r"--export_dtype float16: model.layers.0.mlp.up_proj.weight holds values up "
                                         r"to 1e\+06, beyond that dtype's largest \(65504\)"):
        train.main(sft_args(ws, out, "--export_dtype", "fp16", "--lr", "1e-9", model=big))
    assert not (out / "final").exists() and not (out / "final.tmp").exists()


def test_long_prompts_are_counted_and_cut_inside_the_message(ws, capsys):
    """A prompt longer than max_prompt_len: the run says how many were cut and by how much (that the cut is inside
    the user's message, the template's header and the system turn kept, tests/test_data.py checks)."""
    rows = [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": " ".join(f"w{i}" for i in range(80))},
                          {"role": "assistant", "content": "ok"}]}] + [{"prompt": "hi", "response": "hello"}] * 3
    data = data_file(ws, "long_user.jsonl", rows)
    train.main(sft_args(ws, ws / "cases" / "o_long", "--max_prompt_len", "120") + ["--data", str(data)])
    said = capsys.readouterr().out
    assert re.search(r"long_user.jsonl: 1 of 4 prompts were longer than max_prompt_len 120: the middle of their "
                     r"longest message was cut \(\d+ to \d+ tokens", said)


def test_sweep_checks_its_arguments_first_and_clears_stale_locks(tmp_path):
    """sweep.py refuses bad arguments in one line before anything is created; a finished stage that a killed sweep
    left with its run.lock is kept, and the stale lock removed (a live one stays)."""
    p = subprocess.run([sys.executable, "sweep.py", "--algos", "ppo,nope", "--budgets", "2", "--out",
                        str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--algos: unknown 'nope'" in p.stderr and "--budgets: '2' is not a fraction in (0, 1]" in p.stderr
    assert not (tmp_path / "s").exists()
    import sweep

    stage = tmp_path / "stage"
    (stage / "final").mkdir(parents=True)
    (stage / "final" / "config.json").write_text("{}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (stage / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": "0"}))
    assert sweep.finished(stage, "final/config.json") and not (stage / "run.lock").exists()


def test_what_the_checks_must_not_refuse(ws, capsys):
    """The other side of the checks: inputs that are links (a Hugging Face cache snapshot is all links) are read
    through them; a tokenizer.json written with the older "a b" string merges is the same tokenizer as its
    ["a", "b"] rewrite; an SFT model moved elsewhere is still the one the DPO run started from (by content); a
    tri-state field takes "none" through --set and refuses what is no yes or no."""
    import cli

    snap = ws / "cases" / "snapshot"  # every file a link, as in ~/.cache/huggingface/hub/.../snapshots/<rev>
    snap.mkdir(parents=True)
    for f in (ws / "base").iterdir():
        (snap / f.name).symlink_to(f)
    data = ws / "cases" / "sft_link.jsonl"
    data.symlink_to(ws / "sft.jsonl")
    train.main(["sft", "--model", str(snap), "--data", str(data), "--out", str(ws / "cases" / "o_snap"),
                "--max_steps", "1", *SMALL])
    assert (ws / "cases" / "o_snap" / "final" / "inputs.json").is_file()
    old = copy_ckpt(ws, ws / "dpo" / "final", "dpo_string_merges")
    tk = json.loads((old / "tokenizer.json").read_text())
    tk["model"]["merges"] = [" ".join(m) for m in tk["model"]["merges"]]
    (old / "tokenizer.json").write_text(json.dumps(tk))
    moved = ws / "cases" / "moved" / "sft_final"
    shutil.copytree(ws / "sft" / "final", moved)
    args = ppo_args(ws, ws / "cases" / "o_same", dpo=old, rm=ws / "rm" / "final", *["--max_steps", "1"])
    args[args.index("--policy") + 1] = str(moved)
    train.main(args)  # neither "another tokenizer" nor "was trained from ... but --policy is ..."
    assert (ws / "cases" / "o_same" / "final").is_dir()
    assert cli.parse_sets(["ppo.whiten_advantages=none"], {"ppo": train.PPOConfig}) == {
        "ppo": {"whiten_advantages": None}}
    with pytest.raises(ValueError, match=r"--set 'ppo.whiten_advantages=maybe': 'maybe' is not a valid bool"):
        cli.parse_sets(["ppo.whiten_advantages=maybe"], {"ppo": train.PPOConfig})
