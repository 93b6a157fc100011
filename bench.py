"""Throughput of model.py against the Hugging Face Llama on the same config and the same weights.

    python bench.py                         # bench12m preset (~12M params), fp32, CPU
    python bench.py --preset tiny --device cuda --dtype bfloat16
    python bench.py --decode_batches 1,16 --no_reference   # eager against compiled decode (--compile_decode)
    python bench.py gpu --out runs/bench_gpu                # every GPU measurement, one JSON + one markdown table
    python bench.py gpu --tiny --device cpu                 # the same command proven on CPU in under a minute

Prints, side by side: training-step tokens/s (forward + backward + AdamW) and generation tokens/s
(batch 16, 64-token prompts, 128 new tokens, greedy, no early stop). The reference column needs
`transformers`; without it the column says "reference not installed". Rollout generation dominates
RLHF wall time, which is why generation has its own number.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import hf
from model import Llama, ModelArgs, generate


def timed(fn, repeats: int, device) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def hf_model(model: Llama):
    """The reference implementation with our weights, or None when transformers is missing."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    cfg = {k: v for k, v in hf.config_from_args(model.args).items() if k != "architectures"}
    ref = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    sd = hf.state_dict(model)
    if model.args.tie_embeddings:  # HF's state dict names the shared tensor twice
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    ref.load_state_dict(sd)
    return ref.to(next(model.parameters()).device, next(model.parameters()).dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench12m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--train_seq", type=int, default=256)
    p.add_argument("--gen_batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s in --dtype (H100/H200 bf16 dense: ~989): prints training MFU")
    p.add_argument("--no_reference", action="store_true", help="skip the HF column (large presets)")
    p.add_argument("--decode_batches", default="",
                   help="e.g. 1,16: also time decoding eager against --compile_decode (static cache + torch.compile) "
                        "at these batch sizes, the compilation reported apart")
    a = p.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    ours = Llama(ModelArgs.preset(a.preset)).to(device, dtype)
    ours.grad_checkpointing = a.activation_checkpointing
    ref = None if a.no_reference else hf_model(ours)
    V = ours.args.vocab_size
    print(f"preset {a.preset}: {ours.num_params() / 1e6:.1f}M params, {a.dtype} on {a.device}, "
          f"{torch.get_num_threads()} threads")

    x = torch.randint(0, V, (a.train_batch, a.train_seq + 1), device=device)

    def train_step(model, call):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            logits = call(model, x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    prompts = torch.randint(0, V, (a.gen_batch, a.prompt_len), device=device)
    pmask = torch.ones_like(prompts)

    def our_gen():
        toks, _ = generate(ours, prompts, pmask, a.new_tokens, stop_ids=[], pad_id=0, temperature=0)
        assert toks.shape[1] == a.new_tokens
        return toks

    def ref_gen():
        return ref.generate(prompts, attention_mask=pmask, max_new_tokens=a.new_tokens,
                            min_new_tokens=a.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    train_tokens = a.train_batch * a.train_seq
    gen_tokens = a.gen_batch * a.new_tokens
    rows = [("train tokens/s", train_step(ours, lambda m, i: m(i)), train_tokens,
             ref and train_step(ref, lambda m, i: m(i).logits)),
            ("generate tokens/s", our_gen, gen_tokens, ref and ref_gen)]
    print(f"{'':22s}{'rto model.py':>16s}{'HF transformers':>18s}{'ratio':>8s}")
    for name, fn, n, ref_fn in rows:
        if name.startswith("generate"):
            ours.eval()
            ours_tps = n / timed(torch.no_grad()(fn), a.repeats, device)
        else:
            ours.train()
            ours_tps = n / timed(fn, a.repeats, device)
        if name.startswith("train") and a.peak_tflops:
            # model FLOPs utilisation: 6 x params x tokens (forward + backward) over the device's peak
            print(f"train MFU {6 * ours.num_params() * ours_tps / (a.peak_tflops * 1e12):.1%} "
                  f"(6 x {ours.num_params() / 1e6:.1f}M params x {ours_tps:.0f} tokens/s / {a.peak_tflops} TFLOP/s)")
        if ref_fn is None:
            print(f"{name:22s}{ours_tps:16.0f}{'reference not installed' if not a.no_reference else 'skipped':>26s}")
            continue
        ref.train(not name.startswith("generate"))
        ref_tps = n / timed(torch.no_grad()(ref_fn) if name.startswith("generate") else ref_fn, a.repeats, device)
        print(f"{name:22s}{ours_tps:16.0f}{ref_tps:18.0f}{ours_tps / ref_tps:8.2f}")
    if ref is not None:  # same weights, same greedy tokens: the comparison is apples to apples
        ours.eval(), ref.eval()
        same = torch.equal(our_gen()[:, :16], ref_gen()[:, a.prompt_len:a.prompt_len + 16])
        print(f"greedy tokens identical to the reference (first 16): {same}")
    if a.decode_batches:
        ours.eval()
        print(f"decode new tokens/s ({a.prompt_len}-token prompts, {a.new_tokens} new, greedy, no early stop):")
        print(f"{'batch':>8s}{'eager':>12s}{'compiled':>12s}{'ratio':>8s}{'compile s':>11s}")
        for batch in map(int, a.decode_batches.split(",")):
            eager, _ = decode_speed(ours, batch, a.prompt_len, a.new_tokens, a.repeats, device, False)
            compiled, warm = decode_speed(ours, batch, a.prompt_len, a.new_tokens, a.repeats, device, True)
            print(f"{batch:8d}{eager:12.0f}{compiled:12.0f}{compiled / eager:8.2f}{warm:11.1f}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


@torch.no_grad()
def decode_speed(model, batch: int, prompt_len: int, new_tokens: int, repeats: int, device, compile_decode: bool):
    """New tokens/s of generate at this batch size, and the seconds of its first call (the compilation, when
    compile_decode), which the median of timed() leaves out."""
    prompts = torch.randint(0, model.args.vocab_size, (batch, prompt_len), device=device)
    pmask = torch.ones_like(prompts)

    def run():
        return generate(model, prompts, pmask, new_tokens, stop_ids=[], pad_id=0, temperature=0,
                        compile_decode=compile_decode)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    return batch * new_tokens / timed(run, repeats, device), first


# ==========================================================================================================
# `python bench.py gpu`: every measurement a GPU can tell, in one prepared command (README, "GPU"). Each section
# writes its results as soon as it has them, so a run cut short by a time limit still leaves what it measured.

GPU_PRESETS = {  # what each section runs: the 1B preset on a GPU, a tiny one to prove the command on CPU
    "full": dict(preset="llama3.2-1b", train_batch=4, train_seq=1024, decode_batches=(1, 16, 64), prompt_len=128,
                 new_tokens=256, ppo_steps=20, ppo_rollout=16, ppo_micro=4, ppo_len=128, repeats=3),
    "tiny": dict(preset="tiny", train_batch=2, train_seq=32, decode_batches=(1, 4), prompt_len=8, new_tokens=8,
                 ppo_steps=2, ppo_rollout=4, ppo_micro=2, ppo_len=8, repeats=1),
}
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 peaks, for MFU when none is given


def gpu_main(argv):
    p = argparse.ArgumentParser(description="every GPU measurement in one command (tiny: prove it on CPU)")
    p.add_argument("--tiny", action="store_true", help="the tiny preset, a few steps: the CPU proof of the command")
    p.add_argument("--out", default="runs/bench_gpu", help="folder for results.json, results.md and the runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="peak bf16 TFLOP/s (default: the datasheet's)")
    p.add_argument("--no_reference", action="store_true", help="skip the transformers columns")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: train,decode,ppo,torchrun")
    a = p.parse_args(argv)
    s = GPU_PRESETS["tiny" if a.tiny else "full"]
    out, device = Path(a.out), torch.device(a.device)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = a.peak_tflops or next((v for k, v in DATASHEET_TFLOPS.items() if k in name), 0.0)
    res = {"device": name, "torch": torch.__version__, "preset": s["preset"], "dtype": str(dtype), "peak_tflops": peak,
           "peak_source": "given" if a.peak_tflops else ("datasheet" if peak else "none")}
    skip = set(filter(None, a.skip.split(",")))
    sections = [("train", bench_train), ("decode", bench_decode), ("ppo", bench_ppo), ("torchrun", bench_torchrun)]
    for key, fn in sections:
        if key in skip:
            continue
        t0 = time.perf_counter()
        try:
            res[key] = fn(s, device, dtype, peak, out, a.no_reference)
        except Exception as e:  # one failing section must not hide the others' numbers
            res[key] = {"error": f"{e.__class__.__name__}: {str(e)[:500]}"}
        res[key]["seconds"] = round(time.perf_counter() - t0, 1)
        write_results(out, res)
        print(f"== {key}: {json.dumps(res[key])[:400]}", flush=True)
    return res


def write_results(out: Path, res: dict):
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# bench.py gpu on {res['device']} (torch {res['torch']}, {res['preset']}, {res['dtype']})", ""]
    for key in ("train", "decode", "ppo", "torchrun"):
        if key in res:
            lines += [f"## {key}", "", "```", json.dumps(res[key], indent=1), "```", ""]
    (out / "results.md").write_text("\n".join(lines))


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bench_train(s, device, dtype, peak, out, no_reference):
    """Training tokens/s (forward + backward + AdamW) and MFU of model.py, and of transformers' Llama on the same
    weights, with and without activation checkpointing."""
    torch.manual_seed(0)
    ours = Llama(ModelArgs.preset(s["preset"])).to(device, dtype)
    ref = None if no_reference else hf_model(ours)
    x = torch.randint(0, ours.args.vocab_size, (s["train_batch"], s["train_seq"] + 1), device=device)
    rows = {}
    for ckpt in (False, True):
        for label, model, call in (("ours", ours, lambda m, i: m(i)), ("transformers", ref, lambda m, i: m(i).logits)):
            if model is None:
                continue
            if label == "ours":
                model.grad_checkpointing = ckpt
            elif ckpt:
                model.gradient_checkpointing_enable()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            model.train()

            def step():
                logits = call(model, x[:, :-1])
                torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tps = s["train_batch"] * s["train_seq"] / timed(step, s["repeats"], device)
            rows[f"{label}{' +ckpt' if ckpt else ''}"] = {
                "tokens_per_s": round(tps), "mfu": round(6 * ours.num_params() * tps / (peak * 1e12), 4) if peak else None,
                "peak_gib": peak_memory(device)}
            del opt
    return {"rows": rows, "params": ours.num_params(), "tokens_per_step": s["train_batch"] * s["train_seq"]}


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the bandwidth a decode step is bounded by."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    secs = timed(lambda: x.clone(), 5, device)
    return 2 * n / secs


def bench_decode(s, device, dtype, peak, out, no_reference):
    """New tokens/s at each batch: ours eager and compiled, transformers' eager generate and its static cache +
    torch.compile, each against the bandwidth limit: (bytes of weights + KV cache read per step) / copy bandwidth."""
    torch.manual_seed(0)
    ours = Llama(ModelArgs.preset(s["preset"])).to(device, dtype).eval()
    ref = None if no_reference else hf_model(ours)
    bw = copy_bandwidth(device)
    a, width = ours.args, torch.finfo(dtype).bits // 8
    P, N = s["prompt_len"], s["new_tokens"]
    rows = {}
    for batch in s["decode_batches"]:
        kv = batch * a.n_layers * 2 * a.n_kv_heads * a.head_dim * (P + N / 2) * width  # the average step's cache
        limit = batch / ((ours.num_params() * width + kv) / bw)
        row = {"bandwidth_limit_tokens_per_s": round(limit)}
        for label, compiled in (("ours_eager", False), ("ours_compiled", True)):
            tps, first = decode_speed(ours, batch, P, N, s["repeats"], device, compiled)
            row[label] = {"tokens_per_s": round(tps), "of_limit": round(tps / limit, 3), "first_call_s": round(first, 1)}
        if ref is not None:
            prompts = torch.randint(0, a.vocab_size, (batch, P), device=device)
            kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
            for label, static in (("transformers_eager", False), ("transformers_static_compile", True)):
                if static:
                    ref.generation_config.cache_implementation = "static"
                    ref.forward = torch.compile(ref.forward, mode="reduce-overhead" if device.type == "cuda" else None)
                t0 = time.perf_counter()
                with torch.no_grad():
                    ref.generate(prompts, **kw)
                first = time.perf_counter() - t0
                tps = batch * N / timed(lambda: torch.no_grad()(ref.generate)(prompts, **kw), s["repeats"], device)
                row[label] = {"tokens_per_s": round(tps), "of_limit": round(tps / limit, 3), "first_call_s": round(first, 1)}
            ref = hf_model(ours)  # a fresh, uncompiled reference for the next batch size
        rows[str(batch)] = row
    return {"rows": rows, "copy_bandwidth_gb_s": round(bw / 1e9, 1), "prompt_len": P, "new_tokens": N}


def random_checkpoints(s, out: Path, dtype) -> dict:
    """A policy and a reward model of the preset's shape (random weights, the checkpoint dtype), a small trained
    tokenizer (ids inside the model's vocabulary), and prompts: what a PPO run needs."""
    import hf
    from task import WordTask, train_tokenizer

    task = WordTask(seed=0)
    tok = train_tokenizer(task.corpus(), vocab_size=300)
    paths = {"policy": out / "ckpt_policy", "rm": out / "ckpt_rm"}
    torch.manual_seed(0)
    for key, head in (("policy", "lm"), ("rm", "score")):
        if not (paths[key] / "config.json").exists():
            model = Llama(ModelArgs.preset(s["preset"], head=head, tie_embeddings=False if head == "score" else
                                           ModelArgs.preset(s["preset"]).tie_embeddings)).to(dtype)
            if head == "score":
                model.args.score_mean, model.args.score_std = 0.0, 1.0
            hf.save(model, paths[key], extra_files=tok.hf_files())
            del model
    prompts = out / "prompts.jsonl"
    rng = __import__("numpy").random.default_rng(0)
    prompts.write_text("".join(json.dumps({"prompt": task.sample_prompt(rng)}) + "\n" for _ in range(256)))
    return {**paths, "prompts": prompts}


def bench_ppo(s, device, dtype, peak, out, no_reference):
    """A short `train.py ppo --algo rto` (--bf16 on a GPU) on random checkpoints of the preset's shape: the time split,
    tokens/s, the peak memory against the memory plan's figure, and first_logp_dev in bf16 compute."""
    import cli
    import train
    from memory import checkpoint_plan

    paths = random_checkpoints(s, out, dtype)
    run = out / "ppo_run"
    argv = ["ppo", "--algo", "rto", "--policy", str(paths["policy"]), "--dpo", str(paths["policy"]),
            "--rm", str(paths["rm"]), "--prompts", str(paths["prompts"]), "--out", str(run), "--overwrite",
            "--max_steps", str(s["ppo_steps"]), "--rollout_batch_size", str(s["ppo_rollout"]),
            "--batch_size", str(s["ppo_rollout"]), "--micro_batch_size", str(s["ppo_micro"]),
            "--max_prompt_len", str(s["ppo_len"]), "--max_response_len", str(s["ppo_len"]), "--no-progress",
            "--device", device.type, "--allow_ref_mismatch"] + (["--bf16", "--activation_checkpointing"] if device.type == "cuda" else [])
    import shutil
    shutil.rmtree(run, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg, _ = cli.parse_command(argv, train.commands(), "", default="all")
    plan = checkpoint_plan(train.ppo_slots(cfg), cfg, 1)
    train.main(argv)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows  # the first step pays for warm-up
    mean = lambda k: round(sum(r[k] for r in later) / len(later), 4)  # noqa: E731
    return {"steps": len(rows), "time_gen_s": mean("time_gen_s"), "time_score_s": mean("time_score_s"),
            "time_update_s": mean("time_update_s"), "tokens_per_s": mean("tokens_per_s"),
            "first_logp_dev_max": max(r["first_logp_dev"] for r in rows), "peak_gib": peak_memory(device),
            "planned_gib": round(plan["total"] / 2**30, 2)}


def bench_torchrun(s, device, dtype, peak, out, no_reference):
    """`torchrun --nproc_per_node=1 train.py all` at tiny size: every stage under a process group (nccl on a GPU,
    gloo on CPU; the CPU tests cover gloo with 2 processes)."""
    import subprocess
    import sys

    run = out / "torchrun_all"
    import shutil
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", str(Path(__file__).with_name("train.py")),
           "all", "--out", str(run), "--device", device.type, "--n_sft", "64", "--n_pref", "64", "--n_prompts", "64",
           "--n_eval", "8", "--set", "sft.epochs=1", "--set", "dpo.epochs=1", "--set", "rm.epochs=1",
           "--set", "ppo.max_steps=1", "--algos", "rto", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return {"backend": "nccl" if device.type == "cuda" else "gloo", "returncode": p.returncode,
            "stages_finished": sorted(d.name for d in run.iterdir() if (d / "final" / "config.json").exists())
            if run.exists() else [], "stderr_tail": p.stderr[-600:] if p.returncode else ""}


if __name__ == "__main__":
    if sys.argv[1:2] == ["gpu"]:
        gpu_main(sys.argv[2:])
    else:
        main()
