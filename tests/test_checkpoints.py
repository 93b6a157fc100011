"""Bring your own checkpoint: the whole pipeline on tiny random checkpoints that carry real tokenizer layouts and
real chat templates (tests/fixtures/chat, made by make_chat_fixture.py with transformers), and what each stage
exports: a complete Hugging Face checkpoint whose files give transformers' own ids back."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import train
import hf
from data import collate
from hf import Tokenizer
from model import Llama, ModelArgs

CHAT = Path(__file__).parent / "fixtures" / "chat"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "generation_config.json", "train_config.json")
PIPELINE_LAYOUTS = ["llama3.1", "qwen2.5", "smollm2", "gemma2", "mistral", "deepseek-r1"]
SYSTEM_OK = {"llama3.1", "qwen2.5", "smollm2", "mistral", "deepseek-r1"}  # gemma's template refuses system turns


def expected_of(layout):
    return json.loads((CHAT / layout / "expected.json").read_text(encoding="utf-8"))


def make_checkpoint(layout: str, dst: Path, seed: int = 0, spare_rows: int | None = None) -> Path:
    """A random 1-layer model around the layout's tokenizer files, shaped like the real family: Mistral's
    model_type, SmolLM2's tied embeddings, Qwen's embedding rows to spare beyond the tokenizer."""
    exp = expected_of(layout)
    if spare_rows is None:
        spare_rows = 16 if layout == "qwen2.5" else 0
    vocab = exp["vocab_size"] + spare_rows
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab, hidden_dim=64, rope_theta=10000.0,
                     max_seq_len=512, tie_embeddings=layout == "smollm2",
                     model_type="mistral" if layout == "mistral" else "llama",
                     bos_token_id=exp["bos_token_id"], eos_token_id=exp["generation_eos_token_id"],
                     pad_token_id=exp["pad_token_id"])
    hf.save(Llama(args), dst)
    for name in TOKENIZER_FILES:
        if (CHAT / layout / name).is_file():
            shutil.copy(CHAT / layout / name, dst / name)
    return dst


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_data(d: Path, layout: str) -> dict:
    """SFT rows in both forms, UltraFeedback-binarized-shaped preference rows, prompt rows."""
    sys_turn = [{"role": "system", "content": "Answer briefly."}] if layout in SYSTEM_OK else []
    qs = ["What is 2+2?", "Name a colour.", "Say hi.", "Tell me a joke.", "Count to three.", "Café?", "Why?", "Hi!"]
    sft = []
    for i, q in enumerate(qs):
        if i % 2:
            sft.append({"messages": sys_turn + [{"role": "user", "content": q},
                                                {"role": "assistant", "content": f"Answer {i}."}]})
        else:
            sft.append({"prompt": q, "response": f"Answer {i}, of course."})
    prefs = [{"prompt": q, "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "Yes, sure."}],
              "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "No."}],
              "score_chosen": 8.0, "score_rejected": 2.0} for q in qs]
    prompts = [{"prompt": q} if i % 2 else {"messages": sys_turn + [{"role": "user", "content": q}]}
               for i, q in enumerate(qs)]
    return {"sft": write_jsonl(d / "sft.jsonl", sft), "prefs": write_jsonl(d / "prefs.jsonl", prefs),
            "prompts": write_jsonl(d / "prompts.jsonl", prompts)}


COMMON = ["--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2", "--max_prompt_len", "96",
          "--no-progress"]


@pytest.fixture(scope="module", params=PIPELINE_LAYOUTS)
def pipeline(request, tmp_path_factory):
    layout = request.param
    d = tmp_path_factory.mktemp(layout.replace(".", "_"))
    base = make_checkpoint(layout, d / "base")
    data = chat_data(d, layout)
    train.main(["sft", "--model", str(base), "--data", str(data["sft"]), "--out", str(d / "sft"), "--lr", "1e-3",
                *COMMON])
    sft = d / "sft" / "final"
    train.main(["dpo", "--model", str(sft), "--data", str(data["prefs"]), "--out", str(d / "dpo"), *COMMON])
    train.main(["rm", "--model", str(sft), "--data", str(data["prefs"]), "--eval_data", str(data["prefs"]),
                "--out", str(d / "rm"), *COMMON])
    train.main(["ppo", "--algo", "rto", "--policy", str(sft), "--dpo", str(d / "dpo" / "final"), "--rm",
                str(d / "rm" / "final"), "--prompts", str(data["prompts"]), "--out", str(d / "rto"),
                "--rollout_batch_size", "4", "--max_response_len", "8", *COMMON])
    return layout, d


def test_every_stage_exports_a_complete_hf_checkpoint(pipeline, capsys):
    layout, d = pipeline
    exp = expected_of(layout)
    src_template = Tokenizer.from_dir(CHAT / layout).chat_template
    for stage in ("sft", "dpo", "rm", "rto"):
        final = d / stage / "final"
        for name in EXPORT_FILES:
            assert (final / name).is_file(), final / name
        tok = Tokenizer.from_dir(final)
        assert tok.chat_template == src_template  # the checkpoint's own template, carried over intact
        assert (final / "chat_template.jinja").is_file() == (layout == "qwen2.5")
        cfg = json.loads((final / "config.json").read_text())
        gen = json.loads((final / "generation_config.json").read_text())
        stops = sorted(gen["eos_token_id"]) if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
        gen_eos = exp["generation_eos_token_id"]
        assert set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) <= set(stops)  # nothing transformers stops on is lost
        assert stops == tok.stop_ids and cfg["eos_token_id"] in (stops, stops[0])
        assert cfg["pad_token_id"] == gen["pad_token_id"] == tok.pad_id and tok.pad_id not in stops
        assert cfg["bos_token_id"] == exp["bos_token_id"]
        kind = "SequenceClassification" if stage == "rm" else "CausalLM"
        family = "Mistral" if layout == "mistral" else "Llama"
        assert cfg["architectures"] == [f"{family}For{kind}"]
        # fixture-backed: the exported tokenizer files still give transformers' ids for every conversation
        for conv in exp["conversations"]:
            if "error" not in conv:
                assert tok.encode_prompt(conv["messages"], 10_000) == conv["prompt_ids"]
    # Qwen declares pad <|endoftext|>, a stop id, and has no other pad candidate: a new <|pad|> is added, and
    # its embedding has rows to spare, so it fits without growing (test_new_pad_grows_the_embedding grows it)
    cfg = json.loads((d / "sft" / "final" / "config.json").read_text())
    if layout == "qwen2.5":
        assert cfg["vocab_size"] == exp["vocab_size"] + 16 and cfg["rto_added_tokens"] == ["<|pad|>"]
    else:
        assert cfg["vocab_size"] == exp["vocab_size"] and "rto_added_tokens" not in cfg
    rows = [json.loads(l) for l in (d / "rto" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["first_logp_dev"] == 0.0 for r in rows)
    capsys.readouterr()
    train.main(["sample", "--model", str(d / "rto" / "final"), "--prompt", "Hi!", "--max_new_tokens", "6"])
    assert "chat template" in capsys.readouterr().out


def test_new_pad_grows_the_embedding(tmp_path):
    """Qwen's layout with no embedding rows to spare: the new pad token grows the embedding by one row (the mean of
    the others), the export says so, and the next stage loads it without adding anything again."""
    exp = expected_of("qwen2.5")
    base = make_checkpoint("qwen2.5", tmp_path / "base", spare_rows=0)
    data = chat_data(tmp_path, "qwen2.5")
    train.main(["sft", "--model", str(base), "--data", str(data["sft"]), "--out", str(tmp_path / "sft"), *COMMON])
    cfg = json.loads((tmp_path / "sft" / "final" / "config.json").read_text())
    assert cfg["vocab_size"] == exp["vocab_size"] + 1 and cfg["rto_added_tokens"] == ["<|pad|>"]
    tok = Tokenizer.from_dir(tmp_path / "sft" / "final")
    assert tok.pad_id == exp["vocab_size"] and tok.added_tokens == [] and tok.vocab_size == cfg["vocab_size"]
    train.main(["rm", "--model", str(tmp_path / "sft" / "final"), "--data", str(data["prefs"]),
                "--out", str(tmp_path / "rm"), *COMMON])
    rm_cfg = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert rm_cfg["vocab_size"] == cfg["vocab_size"] and rm_cfg["rto_added_tokens"] == ["<|pad|>"]  # kept, not re-added


def test_sft_trains_on_the_end_of_turn_token(pipeline):
    """The response's last real position is the end-of-turn id (<|im_end|> for SmolLM2, whose pad was <|im_end|>
    too): it is inside response_mask, so SFT's loss teaches the policy to stop, and padding is another id."""
    layout, d = pipeline
    tok = Tokenizer.from_dir(d / "sft" / "final")
    msgs = [{"role": "user", "content": "Hi!"}]
    prompts = [tok.encode_prompt(msgs, 96)] * 2
    responses = [tok.encode_response(msgs, "Hello.", 32), tok.encode_response(msgs, "Hello there, friend.", 32)]
    b = collate(prompts, responses, tok.pad_id)
    P, short = b["prompt_len"], len(responses[0])
    assert b["response_mask"][0].sum() == short and b["input_ids"][0, P + short - 1] == tok.eos_id
    assert (b["input_ids"][0, P + short:] == tok.pad_id).all() and tok.pad_id != tok.eos_id


def test_pad_equal_to_eos_policy_learns_to_stop(tmp_path):
    """SmolLM2's layout declares pad == eos == <|im_end|>. SFT on one short answer; greedy sampling then ends with
    <|im_end|> and stops: padding was never taken for the end, so the stop was learned."""
    base = make_checkpoint("smollm2", tmp_path / "base")
    rows = [{"prompt": "Say hi.", "response": "Hi!"}] * 8
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    train.main(["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "sft"), "--lr", "3e-2",
                "--max_steps", "40", "--batch_size", "8", "--micro_batch_size", "8", "--no-progress"])
    tok = Tokenizer.from_dir(tmp_path / "sft" / "final")
    model = hf.load(tmp_path / "sft" / "final").eval()
    from model import generate
    p = torch.tensor([tok.encode_prompt([{"role": "user", "content": "Say hi."}], 64)])
    toks, mask = generate(model, p, torch.ones_like(p), 12, stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=0)
    out = toks[0][mask[0]].tolist()
    assert out == tok.encode_response([{"role": "user", "content": "Say hi."}], "Hi!", 32)
    assert out[-1] == tok.eos_id == tok.tk.token_to_id("<|im_end|>") and toks.shape[1] == len(out)


def test_template_refusal_names_the_data_line(tmp_path):
    base = make_checkpoint("gemma2", tmp_path / "base")
    data = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Hi", "response": "Hello"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValueError, match=r"sft.jsonl:2: the chat template of .* refused this conversation: "
                                         r"System role not supported"):
        train.main(["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "sft"), *COMMON])
