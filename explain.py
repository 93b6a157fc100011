"""Read a trained checkpoint back: `train.py sample` prints its answers, `train.py explain` shows RTO's token reward
beta1 * log(pi_dpo / pi_ref) on every token of a response (coloured in a terminal, numbers when piped, and an HTML
page), beside the gold per-token reward on a built-in task.

    python train.py sample --model runs/demo/rto/final --prompt "topic cats"
    python train.py explain --dpo runs/demo/dpo/final --ref runs/demo/sft/final --prompt "topic cats" --task words
"""
from __future__ import annotations

import html as html_mod
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import open_model, open_tokenizer
import train
from checks import UserError, check_implicit_reward, check_slot
from config import (COUNT, Bf16Field, DeviceField, SamplingFields, SeedField, SetField, TaskFields, check_range,
                    option)
from cli import parse_sets
from data import collate, pad_left
from hf import Tokenizer
from model import generate
from parallel import D, decode_view, to_device
from ppo import response_logprobs
from task import WordTask, load_task

# ==========================================================================================================
# `train.py sample`


@dataclass
class SampleConfig(SeedField, DeviceField, Bf16Field, SamplingFields):
    model: str = option("", "HF-format Llama directory with tokenizer.json (any stage's final/, or a downloaded model)")
    prompt: list = option([], "prompt text (repeat --prompt for several)")
    n: int = option(1, "completions per prompt", COUNT)
    max_new_tokens: int = option(128, "tokens to generate at most", COUNT)


@torch.no_grad()
def run_sample(cfg: SampleConfig):
    check_range(cfg)
    if not cfg.model or not cfg.prompt:
        raise UserError("give --model DIR and at least one --prompt TEXT")
    check_slot(cfg.model, "model", "lm")
    tok = open_tokenizer(cfg.model)
    model = open_model(cfg.model, "lm", cfg, tok, frozen=True)  # the one loader every stage uses
    prompts = [tok.encode_prompt([{"role": "user", "content": p}], model.args.max_seq_len) for p in cfg.prompt
               for _ in range(cfg.n)]
    ids, mask = pad_left(prompts, tok.pad_id)
    gen = torch.Generator(device=D.device).manual_seed(cfg.seed)
    toks, tmask = generate(decode_view(model), ids.to(D.device), mask.to(D.device), cfg.max_new_tokens,
                           stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, generator=gen, compile_decode=cfg.compile_decode)
    for k, p in enumerate(prompts):
        print(f"--- {cfg.prompt[k // cfg.n]!r} ({'chat template' if tok.chat else 'plain format'})")
        print(tok.decode(toks[k][tmask[k]].tolist()))


# ==========================================================================================================
# `train.py explain`: the token reward made visible


@dataclass
class ExplainConfig(DeviceField, TaskFields, SetField):
    """Show RTO's dense reward beta1 * log(pi_dpo / pi_ref) on every token of a response (and the gold per-token
    reward beside it on a built-in task)."""
    dpo: str = option("", "the DPO checkpoint (pi_dpo)")
    ref: str = option("", "the reference the DPO run started from (pi_ref, the SFT checkpoint)")
    prompt: list = option([], "prompt text (repeat --prompt for several)")
    response: list = option([], "response text, one per --prompt (default: the DPO model's greedy answer)")
    max_new_tokens: int = option(64, "tokens to generate when no --response is given", COUNT)
    html: str = option("explain.html", "write the same view as a standalone HTML file here ('' for none)")


@torch.no_grad()
def dpo_log_ratios(dpo_model, ref, tok: Tokenizer, prompts: list, responses: list) -> list[list[float]]:
    """log(pi_dpo / pi_ref)(y_h) for every response token (no beta1, no clip), one list per (prompt, response)."""
    b = to_device(collate(prompts, responses, tok.pad_id))
    diff = response_logprobs(dpo_model, b) - response_logprobs(ref, b)
    return [diff[i, :len(r)].tolist() for i, r in enumerate(responses)]


def gold_per_token(task: WordTask, prompt_msgs, tok: Tokenizer, response_ids: list[int]) -> list[float | None] | None:
    """The task's true reward term of each response token (each task word is one token; the EOS earns 0), or None
    when the tokens do not line up one to one with the words."""
    body = [i for i in response_ids if i not in tok.stop_ids]
    text = tok.decode(body)
    words = task.word_rewards(prompt_msgs, text)
    if len(words) != len(body):
        return None
    return words + [0.0] * (len(response_ids) - len(body))


def ansi(text: str, r: float, scale: float) -> str:
    """text on a background from red (negative) through none to green (positive), by |r| / scale."""
    level = min(5, round(5 * abs(r) / scale)) if scale > 0 else 0
    if level == 0:
        return text
    code = 16 + (36 * level if r < 0 else 6 * level)  # the 6x6x6 colour cube: pure red or pure green
    return f"\x1b[48;5;{code}m{text}\x1b[0m"


def explain_responses(dpo_model, tok: Tokenizer, cfg: ExplainConfig) -> tuple[list, list, list]:
    """(messages, prompt ids, response ids) of every --prompt: the given --response, or the DPO model's greedy one."""
    msgs = [[{"role": "user", "content": p}] for p in cfg.prompt]
    prompts = [tok.encode_prompt(m, dpo_model.args.max_seq_len // 2) for m in msgs]
    if cfg.response:
        return msgs, prompts, [tok.encode_response(m, r, dpo_model.args.max_seq_len // 2)
                               for m, r in zip(msgs, cfg.response)]
    ids, mask = pad_left(prompts, tok.pad_id)
    toks, tmask = generate(decode_view(dpo_model), ids.to(D.device), mask.to(D.device), cfg.max_new_tokens,
                           stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=0)
    return msgs, prompts, [toks[i][tmask[i]].tolist() for i in range(len(prompts))]


def print_tokens(p_text: str, pieces: list[str], rewards: list[float], lr: list[float], gold: list | None):
    """One response's tokens with their reward and log-ratio (and gold): coloured on a terminal, a table always."""
    print(f"--- {p_text!r}: {len(pieces)} tokens, summed token reward {sum(rewards):+.4f}"
          + (f", gold {sum(g for g in gold):+.3f}" if gold else ""))
    if sys.stdout.isatty():
        scale = max((abs(x) for x in rewards), default=0.0)
        print("".join(ansi(s, x, scale) for s, x in zip(pieces, rewards)))
    print("token\treward\tlog_ratio" + ("\tgold" if gold else ""))
    for k, (s, x, raw) in enumerate(zip(pieces, rewards, lr)):
        print(f"{s!r}\t{x:+.5f}\t{raw:+.5f}" + (f"\t{gold[k]:+.4f}" if gold else ""))


def html_section(p_text: str, pieces: list[str], rewards: list[float], lr: list[float], gold: list | None) -> str:
    """The same view as HTML: the response coloured token by token (a tooltip per token), then the table."""
    esc, scale = html_mod.escape, max((abs(x) for x in rewards), default=0.0)
    spans = []
    for k, (s, x) in enumerate(zip(pieces, rewards)):
        color = f"rgba({'200,0,0' if x < 0 else '0,160,0'},{0.0 if scale == 0 else abs(x) / scale:.2f})"
        tip = f"reward {x:+.5f}, log-ratio {lr[k]:+.5f}" + (f", gold {gold[k]:+.4f}" if gold else "")
        spans.append(f"<span style='background:{color}' title='{tip}'>{esc(s)}</span>")
    rows = "".join(f"<tr><td>{esc(repr(s))}</td><td>{x:+.5f}</td><td>{raw:+.5f}</td>"
                   + (f"<td>{gold[k]:+.4f}</td>" if gold else "") + "</tr>"
                   for k, (s, x, raw) in enumerate(zip(pieces, rewards, lr)))
    return (f"<h3>{esc(p_text)}</h3><p>{''.join(spans)}</p><table><tr><th>token</th><th>reward</th><th>log-ratio</th>"
            + ("<th>gold</th>" if gold else "") + f"</tr>{rows}</table>")


def run_explain(cfg: ExplainConfig):
    check_range(cfg)
    if not (cfg.dpo and cfg.ref and cfg.prompt):
        raise UserError("give --dpo DIR --ref DIR and at least one --prompt TEXT")
    if cfg.response and len(cfg.response) != len(cfg.prompt):
        raise UserError(f"{len(cfg.response)} --response for {len(cfg.prompt)} --prompt: give one per prompt, or none")
    ppo = train.PPOConfig(**parse_sets(cfg.set, {"ppo": train.PPOConfig})["ppo"])  # beta1, dpo_clip: PPO's fields
    check_range(ppo)
    check_slot(cfg.dpo, "dpo", "lm")
    check_slot(cfg.ref, "ref", "lm", policy=cfg.dpo)
    check_implicit_reward(cfg.dpo)
    tok = open_tokenizer(cfg.dpo)
    dpo_model = open_model(cfg.dpo, "lm", cfg, tok, frozen=True)
    ref = open_model(cfg.ref, "lm", cfg, tok, frozen=True)
    task = load_task(cfg.task, cfg.task_seed) if cfg.task else None
    msgs, prompts, responses = explain_responses(dpo_model, tok, cfg)
    logratios = dpo_log_ratios(dpo_model, ref, tok, prompts, responses)
    page = ["<!doctype html><meta charset='utf-8'><title>RTO token rewards</title><body style='font-family:monospace'>",
            f"<p>RTO token reward r = clip({ppo.beta1} * log(pi_dpo / pi_ref), +-{ppo.dpo_clip}); dpo "
            f"{html_mod.escape(cfg.dpo)}, ref {html_mod.escape(cfg.ref)}</p>"]
    for p_text, m, r_ids, lr in zip(cfg.prompt, msgs, responses, logratios):
        rewards = [max(-ppo.dpo_clip, min(ppo.dpo_clip, ppo.beta1 * x)) for x in lr]
        gold = gold_per_token(task, m, tok, r_ids) if task else None
        pieces = [tok.decode([i], skip_special=False) for i in r_ids]
        print_tokens(p_text, pieces, rewards, lr, gold)
        page.append(html_section(p_text, pieces, rewards, lr, gold))
    if cfg.html:
        Path(cfg.html).write_text("\n".join(page) + "\n</body>\n", encoding="utf-8")
        print(f"wrote {cfg.html}")
    return {"responses": responses, "log_ratios": logratios}
