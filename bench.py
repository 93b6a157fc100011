"""Throughput of model.py against the Hugging Face Llama on the same config and the same weights.

    python bench.py                         # bench12m preset (~12M params), fp32, CPU
    python bench.py --preset tiny --device cuda --dtype bfloat16
    python bench.py --decode_batches 1,16 --no_reference   # eager against compiled decode (--compile_decode)
    python3 bench.py gpu --results OUT --work runs/bench_gpu  # every GPU measurement, section by section (docs/gpu.md)
    python bench.py gpu --tiny --device cpu --results R --work W   # the same command proven on CPU
    python bench.py data --pairs 60000                       # reading and encoding preference data at scale

Prints, side by side: training-step tokens/s (forward + backward + AdamW) and generation tokens/s
(batch 16, 64-token prompts, 128 new tokens, greedy, no early stop). The reference column needs
`transformers`; without it the column says "reference not installed". Rollout generation dominates
RLHF wall time, which is why generation has its own number.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
    from model import PRESETS

    problems = ([] if a.preset in PRESETS else [f"--preset {a.preset!r}: choose from {', '.join(PRESETS)}"]) + \
        ([] if isinstance(getattr(torch, a.dtype, None), torch.dtype) else [f"--dtype {a.dtype!r}: not a torch dtype"]) + \
        ([] if all(x.strip().isdigit() and int(x) > 0 for x in filter(None, a.decode_batches.split(","))) else
         [f"--decode_batches {a.decode_batches!r}: expected positive integers, e.g. 1,16"]) + \
        ([] if a.device in ("cpu", "cuda") and (a.device == "cpu" or torch.cuda.is_available()) else
         [f"--device {a.device!r}: cpu, or cuda where there is one"])
    if problems:
        raise SystemExit("bench.py: " + "; ".join(problems))
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


def cudagraph_skip_reasons(model, batch: int, max_len: int, mark_static: bool = True) -> list[str]:
    """Compile one decode step as model.compiled_decode does, with inductor's compiler wrapped to ask of the graph the
    questions it asks before recording CUDA graphs (inputs mutated in place that are not static; ops CUDA graphs
    cannot hold), and return its reasons to skip them: [] when a GPU would replay the step as CUDA graphs. Runs on CPU
    too (where inductor would first skip them for being on CPU). mark_static=False: the same cache unmarked."""
    from contextlib import nullcontext
    from unittest import mock

    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.cudagraph_utils import check_for_mutation_ignore_cuda_graph_managed_tensor
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    from model import KVCache, decode_step

    reasons, graphs = [], []

    def inner(graph, inputs, **kw):
        compiled = compile_fx_inner(graph, inputs, **kw)
        graphs.append(graph)
        why = check_for_mutation_ignore_cuda_graph_managed_tensor(
            graph, compiled.mutated_inputs, compiled.mutated_input_idxs, kw.get("static_input_idxs") or [])
        node = get_first_incompatible_cudagraph_node(graph)
        reasons.extend([why] if why else [])
        reasons.extend([f"incompatible op {node.target}"] if node is not None else [])
        return compiled

    device = next(model.parameters()).device
    unmarked = mock.patch.object(torch._dynamo, "mark_static_address", lambda t: None)
    with nullcontext() if mark_static else unmarked:
        cache = KVCache(model.args, batch, max_len, device, static=True, dtype=next(model.parameters()).dtype)
    torch._dynamo.reset()
    step = torch.compile(decode_step(model, cache), backend=lambda gm, ex: compile_fx(gm, ex, inner_compile=inner),
                         fullgraph=True, dynamic=False)
    # no cache may answer for inductor: the graph must pass through the questions above
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
            enable_autograd_cache=False), torch.no_grad():
        step(torch.zeros(batch, 1, dtype=torch.long, device=device), torch.ones(batch, 1, dtype=torch.long,
                                                                               device=device))
    torch._dynamo.reset()  # nothing of this inspection stays in dynamo's caches
    if len(graphs) != 1:
        raise RuntimeError(f"the decode step compiled to {len(graphs)} graphs, expected exactly one")
    return reasons


# ==========================================================================================================
# `python bench.py data`: preference data at UltraFeedback's size (60k pairs), from the file to the first DPO step

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
         "but not what all were we when your can said there use an each which she do how their if will up other about "
         "out many then them these so some her would make like him into time has look two more write go see number "
         "no way could people my than first water been call who oil its now find long down day did get come made may "
         "part").split()


def data_main(argv):
    p = argparse.ArgumentParser(prog="bench.py data", description="reading, encoding and the first DPO step of a "
                                "preference file of --pairs rows (UltraFeedback-shaped: chat messages)")
    p.add_argument("--pairs", type=int, default=60000)
    p.add_argument("--work", default="runs/bench_data", help="scratch folder for the file, a tiny checkpoint, the run")
    p.add_argument("--tokenizer", default=str(Path(__file__).with_name("tests") / "fixtures" / "chat" / "smollm2"),
                   help="a checkpoint's tokenizer files (default: the SmolLM2 chat layout of the tests, whose vocabulary "
                        "is cut to 420 tokens: about twice the tokens per word of the real one)")
    a = p.parse_args(argv)
    fixture = Path(a.tokenizer)
    if a.pairs < 64 or not (fixture / "tokenizer.json").is_file():
        raise SystemExit(f"bench.py data: need --pairs >= 64 and --tokenizer DIR with a tokenizer.json ({fixture})")
    from data import encode_examples, read_preferences
    from hf import Tokenizer

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prefs, ckpt = synthetic_preferences(work / "prefs.jsonl", a.pairs), tiny_chat_checkpoint(fixture, work / "ckpt")
    t0 = time.perf_counter()
    rows = read_preferences(prefs)
    t_read = time.perf_counter() - t0
    tok = Tokenizer.from_dir(ckpt)
    t0 = time.perf_counter()
    encode_examples(rows, tok, 256, 256, lambda r: [r.chosen, r.rejected])
    t_encode = time.perf_counter() - t0
    run = work / "dpo"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).with_name("train.py")), "dpo", "--data", str(prefs), "--model",
           str(ckpt), "--out", str(run), "--max_steps", "1", "--batch_size", "8", "--micro_batch_size", "8",
           "--no-progress"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    t_dpo = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"bench.py data: the DPO run failed:\n{done.stderr[-2000:]}")
    mb = prefs.stat().st_size / 1e6
    print(f"{a.pairs} pairs ({mb:.0f} MB), tokenizer {fixture} ({tok.vocab_size} tokens), {torch.get_num_threads()} "
          f"threads")
    print(f"read    {t_read:6.1f} s  {a.pairs / t_read:8.0f} pairs/s")
    print(f"encode  {t_encode:6.1f} s  {a.pairs / t_encode:8.0f} pairs/s  (prompt, chosen, rejected; 256 + 256 tokens)")
    print(f"train.py dpo --max_steps 1, from its start to its end: {t_dpo:.1f} s")
    return {"pairs": a.pairs, "read_s": t_read, "encode_s": t_encode, "dpo_first_step_s": t_dpo}


def synthetic_preferences(path: Path, n: int) -> Path:
    """n UltraFeedback-shaped rows (a prompt string, chosen and rejected as message lists) of random words: prompts of
    20-120 words, answers of 30-200."""
    rng = np.random.default_rng(0)

    def text(lo, hi):
        return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=int(rng.integers(lo, hi + 1))))

    with open(path, "w") as f:
        for _ in range(n):
            q = text(20, 120)
            f.write(json.dumps({"prompt": q, "score_chosen": 8.0, "score_rejected": 3.0, **{
                side: [{"role": "user", "content": q}, {"role": "assistant", "content": text(30, 200)}]
                for side in ("chosen", "rejected")}}) + "\n")
    return path


def tiny_chat_checkpoint(fixture: Path, out: Path) -> Path:
    """A 1-layer random model around a real chat layout's tokenizer files."""
    from hf import Tokenizer

    tok = Tokenizer.from_dir(fixture)
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, hidden_dim=64,
                            rope_theta=10000.0, max_seq_len=1024))
    hf.save(model, out)
    for f in fixture.iterdir():
        if f.is_file() and f.name not in ("config.json", "expected.json"):
            shutil.copy(f, out / f.name)
    return out


# ==========================================================================================================
# `python bench.py gpu --results DIR --work SCRATCH`: every measurement a GPU can tell, in one prepared command for a
# short window on a lent machine (docs/gpu.md). Each section runs in a process of its own with its own time limit,
# in the order of what its numbers are worth; after each one, DIR/results.json and DIR/results.md hold everything
# measured so far, and nothing else is written to DIR (checkpoints, runs and logs go to SCRATCH).

GPU_PRESETS = {  # what each section runs: the 1B preset on a GPU, a tiny one to prove the command on CPU
    "full": dict(preset="llama3.2-1b", train_batch=4, train_seq=1024, decode_batches=(16, 1), prompt_len=128,
                 new_tokens=256, ppo_steps=4, ppo_rollout=16, ppo_micro=4, ppo_len=128, repeats=3, matmul=8192,
                 probe_layers=2),
    "tiny": dict(preset="tiny", train_batch=2, train_seq=32, decode_batches=(4, 1), prompt_len=8, new_tokens=8,
                 ppo_steps=2, ppo_rollout=4, ppo_micro=2, ppo_len=8, repeats=1, matmul=256, probe_layers=2),
}
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 peaks, for MFU when none is given
# (section, estimated seconds on an H100 with the full preset, process start-up included; the limit it gets). The
# order is the order of value: what a window too short for everything should still bring home. Sum of the first
# five: ~395 s, within a 7-minute window with room for the machine's start; transformers' rows only if time remains.
SECTIONS = [("preflight", 45, 120), ("train", 50, 150), ("ppo", 110, 240), ("torchrun", 80, 200),
            ("decode", 110, 300), ("transformers", 120, 240)]
TINY_SECONDS = 30  # the estimate of every section of --tiny on CPU


def gpu_args(argv):
    p = argparse.ArgumentParser(prog="bench.py gpu", description="every GPU measurement in one command, section by "
                                "section (--tiny --device cpu: the same command proven on CPU)")
    p.add_argument("--results", default="", help="the folder that holds only results.json and results.md")
    p.add_argument("--work", default="", help="scratch folder for checkpoints, runs and logs (never in --results)")
    p.add_argument("--tiny", action="store_true", help="the tiny preset, a few steps: the CPU proof of the command")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--budget_s", type=float, default=420.0, help="wall seconds for the whole command: a section whose "
                   "estimate does not fit what is left is skipped, and each gets at most what is left")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="peak bf16 TFLOP/s (default: the datasheet's)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(s for s, _, _ in SECTIONS)}")
    p.add_argument("--section", default="", help=argparse.SUPPRESS)  # internal: run one section in this process
    a = p.parse_args(argv)
    names = [s for s, _, _ in SECTIONS]
    bad = [s for s in filter(None, a.skip.split(",")) if s not in names]
    problems = ([f"--skip {','.join(bad)}: no such section (sections: {', '.join(names)})"] if bad else []) + \
        ([] if a.results else ["give --results DIR (only results.json and results.md go there)"]) + \
        ([] if a.work else ["give --work DIR (scratch: checkpoints, runs and logs)"]) + \
        (["--budget_s must be > 0"] if a.budget_s <= 0 else []) + \
        (["--device cuda: no CUDA device here"] if a.device == "cuda" and not torch.cuda.is_available() else [])
    if a.results and a.work and Path(a.results).resolve() == Path(a.work).resolve():
        problems.append("--results and --work must be two folders: nothing but the results goes to --results")
    if a.results and not a.section and Path(a.results).is_dir() and any(Path(a.results).iterdir()):
        problems.append(f"--results {a.results} is not empty: give an empty or new folder")
    if problems:
        raise SystemExit("bench.py gpu: " + "; ".join(problems))
    return a


def gpu_main(argv):
    """Run every section in a process of its own, in SECTIONS' order, within --budget_s; write the results after
    each one."""
    a = gpu_args(argv)
    if a.section:
        return run_section(a)
    results, work = Path(a.results), Path(a.work)
    results.mkdir(parents=True, exist_ok=True)
    (work / "sections").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res = {"command": "python bench.py gpu " + " ".join(argv), "budget_s": a.budget_s, "sections": {}}
    skip = set(filter(None, a.skip.split(",")))
    for name, estimate, limit in SECTIONS:
        left = a.budget_s - (time.perf_counter() - t_start)
        estimate = TINY_SECONDS if a.tiny else estimate
        if name in skip or estimate > left:
            res["sections"][name] = {"skipped": "--skip" if name in skip else
                                     f"estimated {estimate} s, {left:.0f} s of the budget left"}
        else:
            res["sections"][name] = run_section_process(name, argv, work, min(limit, left))
        write_results(results, res)
        print(f"== {name}: {json.dumps(res['sections'][name])[:300]}", flush=True)
    return res


def run_section_process(name: str, argv: list[str], work: Path, limit: float) -> dict:
    """`bench.py gpu --section NAME` in a process of its own, killed at `limit` seconds; its numbers come back in
    work/sections/NAME.json, its output in work/sections/NAME.log."""
    out, log = work / "sections" / f"{name}.json", work / "sections" / f"{name}.log"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "gpu", *argv, "--section", name],
                               stdout=f, stderr=subprocess.STDOUT, timeout=limit)
            code = p.returncode
        except subprocess.TimeoutExpired:
            code = None
    row = json.loads(out.read_text()) if out.is_file() else {}
    if code != 0:
        tail = log.read_text(errors="replace")[-800:]
        row["error"] = f"killed at its limit of {limit:.0f} s" if code is None else f"exit {code}: {tail}"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def write_results(folder: Path, res: dict):
    """results.json (everything) and results.md (a readable page of it), each replaced whole."""
    lines = [f"# {res['command']}", ""]
    for name, sec in res["sections"].items():
        lines += [f"## {name}", ""] + [f"- {k}: {v}" for k, v in flatten(sec).items()] + [""]
    for fname, text in (("results.json", json.dumps(res, indent=1) + "\n"), ("results.md", "\n".join(lines))):
        tmp = folder / f".{fname}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / fname)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_section(a) -> dict:
    """One section, in this process: its numbers to <work>/sections/<name>.json."""
    s = GPU_PRESETS["tiny" if a.tiny else "full"]
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = a.peak_tflops or next((v for k, v in DATASHEET_TFLOPS.items() if k in name), 0.0)
    ctx = dict(s=s, device=device, dtype=dtype, peak=peak, work=Path(a.work), device_name=name)
    fn = {"preflight": bench_preflight, "train": bench_train, "ppo": bench_ppo, "torchrun": bench_torchrun,
          "decode": bench_decode, "transformers": bench_transformers}[a.section]
    row = fn(**ctx)
    (Path(a.work) / "sections" / f"{a.section}.json").write_text(json.dumps(row))
    return row


def peak_memory(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the bandwidth a decode step is bounded by."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    secs = timed(lambda: x.clone(), 5, device)
    return 2 * n / secs


def matmul_tflops(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, 5, device) / 1e12


def sdpa_backends(device, dtype, B: int, heads: int, kv_heads: int, q_len: int, k_len: int, head_dim: int,
                  masked: bool) -> list[str]:
    """The SDPA kernels that accept this grouped-query call (with a padding mask or causal), in torch's order of
    preference: the first is the one SDPA runs."""
    if device.type != "cuda":
        return ["cpu"]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(B, heads, q_len, head_dim, device=device, dtype=dtype)
    kv = torch.zeros(B, kv_heads, k_len, head_dim, device=device, dtype=dtype)
    mask = torch.ones(B, 1, q_len, k_len, device=device, dtype=torch.bool) if masked else None
    ok = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, is_causal=not masked and
                                                                 q_len == k_len, enable_gqa=True)
            ok.append(backend.name)
        except RuntimeError:
            pass
    return ok


def host_syncs(fn, device) -> int | None:
    """How many times fn() makes the host wait for the GPU (torch's sync debug mode, which warns at each)."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_preflight(s, device, dtype, peak, work, device_name):
    """Versions, the device, its measured copy bandwidth and bf16 matmul rate, the SDPA kernels of the training and
    decode shapes, what inductor says about CUDA graphs for one compiled decode step, and the host syncs of one
    generate, eager and compiled, on a model of the preset's layer shape with probe_layers layers."""
    import platform

    import model as model_module

    a = ModelArgs.preset(s["preset"])
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    row = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda, "python":
           platform.python_version(), "transformers": tf_version, "preset": s["preset"], "peak_tflops": peak,
           "copy_bandwidth_gb_s": round(copy_bandwidth(device) / 1e9, 1),
           "matmul_tflops": round(matmul_tflops(device, dtype, s["matmul"]), 3),
           "attention": model_module.choose_attention(device)}
    T = s["train_seq"]
    for label, q_len, k_len, B in (("train", T, T, s["train_batch"]),
                                   ("decode", 1, s["prompt_len"] + s["new_tokens"], 16)):
        for masked in (False, True):
            row[f"sdpa_{label}{'_masked' if masked else ''}"] = sdpa_backends(
                device, dtype, B, a.n_heads, a.n_kv_heads, q_len, k_len, a.head_dim, masked)
    torch.manual_seed(0)
    probe = Llama(ModelArgs.preset(s["preset"], n_layers=s["probe_layers"])).to(device, dtype).eval()
    row["cudagraph_skip_reasons"] = cudagraph_skip_reasons(probe, 4, s["prompt_len"] + s["new_tokens"])
    prompts = torch.randint(0, probe.args.vocab_size, (4, s["prompt_len"]), device=device)
    from torch._dynamo.utils import counters

    for compiled in (False, True):
        run = lambda: generate(probe, prompts, torch.ones_like(prompts), s["new_tokens"], stop_ids=[1], pad_id=0,
                               temperature=0, compile_decode=compiled)  # noqa: E731
        run()  # (the compilation, and a first pass, outside the count)
        row[f"host_syncs_generate_{'compiled' if compiled else 'eager'}"] = host_syncs(run, device)
    row["inductor_cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    return row


def train_flops_per_token(args: ModelArgs, seq: int) -> float:
    """Training FLOPs per token: 6 per parameter that multiplies (the input embedding is a lookup, a tied output head
    still multiplies) and the attention scores and their use, 12 * layers * heads * head_dim * seq (PaLM's
    appendix B; no discount for the causal mask)."""
    matmul_params = args.num_params() - args.vocab_size * args.dim * (0 if args.tie_embeddings else 1)
    return 6 * matmul_params + 12 * args.n_layers * args.n_heads * args.head_dim * seq


def train_rate(model, call, x, repeats: int, device) -> float:
    """Training tokens/s of model: forward, a cross-entropy backward, an AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        logits = call(model, x[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return x[:, :-1].numel() / timed(step, repeats, device)


def bench_train(s, device, dtype, peak, work, device_name):
    """Training tokens/s and MFU of model.py, with and without activation checkpointing, attention FLOPs counted."""
    torch.manual_seed(0)
    ours = Llama(ModelArgs.preset(s["preset"])).to(device, dtype)
    x = torch.randint(0, ours.args.vocab_size, (s["train_batch"], s["train_seq"] + 1), device=device)
    flops = train_flops_per_token(ours.args, s["train_seq"])
    rows = {}
    for ckpt in (False, True):
        ours.grad_checkpointing = ckpt
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tps = train_rate(ours, lambda m, i: m(i), x, s["repeats"], device)
        rows["ours +ckpt" if ckpt else "ours"] = {"tokens_per_s": round(tps), "peak_gib": peak_memory(device),
                                                  "mfu": round(flops * tps / (peak * 1e12), 4) if peak else None}
    return {"rows": rows, "params": ours.num_params(), "flops_per_token": flops,
            "tokens_per_step": s["train_batch"] * s["train_seq"]}


def bench_decode(s, device, dtype, peak, work, device_name):
    """New tokens/s of model.py eager and compiled (CUDA graphs on a GPU), at batch 16 then 1, each against the
    bandwidth limit: (bytes of weights + the average step's KV cache) / measured copy bandwidth."""
    torch.manual_seed(0)
    ours = Llama(ModelArgs.preset(s["preset"])).to(device, dtype).eval()
    bw = copy_bandwidth(device)
    a, width = ours.args, torch.finfo(dtype).bits // 8
    P, N = s["prompt_len"], s["new_tokens"]
    rows = {}
    for batch in s["decode_batches"]:
        kv = batch * a.n_layers * 2 * a.n_kv_heads * a.head_dim * (P + N / 2) * width
        limit = batch / ((ours.num_params() * width + kv) / bw)
        row = {"bandwidth_limit_tokens_per_s": round(limit)}
        for label, compiled in (("eager", False), ("compiled", True)):
            tps, first = decode_speed(ours, batch, P, N, s["repeats"], device, compiled)
            row[label] = {"tokens_per_s": round(tps), "of_limit": round(tps / limit, 3), "first_call_s": round(first, 1)}
        rows[str(batch)] = row
    return {"rows": rows, "copy_bandwidth_gb_s": round(bw / 1e9, 1), "prompt_len": P, "new_tokens": N}


def bench_transformers(s, device, dtype, peak, work, device_name):
    """transformers' Llama on the same weights: training tokens/s (MFU) and eager generate at the decode batches,
    the references the goals are read against; needs transformers installed."""
    torch.manual_seed(0)
    ours = Llama(ModelArgs.preset(s["preset"])).to(device, dtype)
    ref = hf_model(ours)
    if ref is None:
        return {"skipped": "transformers is not installed"}
    del ours
    x = torch.randint(0, ref.config.vocab_size, (s["train_batch"], s["train_seq"] + 1), device=device)
    tps = train_rate(ref, lambda m, i: m(i).logits, x, s["repeats"], device)
    flops = train_flops_per_token(ModelArgs.preset(s["preset"]), s["train_seq"])
    row = {"train_tokens_per_s": round(tps), "train_mfu": round(flops * tps / (peak * 1e12), 4) if peak else None}
    ref.eval()
    for batch in s["decode_batches"]:
        prompts = torch.randint(0, ref.config.vocab_size, (batch, s["prompt_len"]), device=device)
        kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=s["new_tokens"],
                  min_new_tokens=s["new_tokens"], do_sample=False, eos_token_id=None, pad_token_id=0)
        tps = batch * s["new_tokens"] / timed(lambda: torch.no_grad()(ref.generate)(prompts, **kw), s["repeats"],
                                               device)
        row[f"generate_eager_batch_{batch}_tokens_per_s"] = round(tps)
    return row


def random_checkpoints(s, out: Path, dtype) -> dict:
    """A policy and a reward model of the preset's shape (random weights, the checkpoint dtype), a small trained
    tokenizer (ids inside the model's vocabulary), and prompts: what a PPO run needs."""
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
    rng = np.random.default_rng(0)
    prompts.write_text("".join(json.dumps({"prompt": task.sample_prompt(rng)}) + "\n" for _ in range(256)))
    return {**paths, "prompts": prompts}


def bench_ppo(s, device, dtype, peak, work, device_name):
    """A short `train.py ppo --algo rto` (--bf16 on a GPU: FSDP2's mixed precision, the decode copy) on random
    checkpoints of the preset's shape: the time split, tokens/s, the peak memory against the memory plan's figure,
    and first_logp_dev (0 when the first minibatch is exactly on-policy)."""
    import cli
    import train
    from memory import checkpoint_plan

    paths = random_checkpoints(s, work, dtype)
    run = work / "ppo_run"
    argv = ["ppo", "--algo", "rto", "--policy", str(paths["policy"]), "--dpo", str(paths["policy"]),
            "--allow_ref_mismatch", "--rm", str(paths["rm"]), "--prompts", str(paths["prompts"]), "--out", str(run),
            "--overwrite", "--max_steps", str(s["ppo_steps"]), "--rollout_batch_size", str(s["ppo_rollout"]),
            "--batch_size", str(s["ppo_rollout"]), "--micro_batch_size", str(s["ppo_micro"]),
            "--max_prompt_len", str(s["ppo_len"]), "--max_response_len", str(s["ppo_len"]), "--no-progress",
            "--device", device.type] + (["--bf16", "--activation_checkpointing"] if device.type == "cuda" else [])
    shutil.rmtree(run, ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg, _ = cli.parse_command(argv, train.commands(), "", default="all")
    plan = checkpoint_plan(train.ppo_slots(cfg), cfg, 1)
    train.main(argv)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows  # the first step pays for warm-up

    def mean(k):
        return round(sum(r[k] for r in later) / len(later), 4)
    return {"steps": len(rows), "time_gen_s": mean("time_gen_s"), "time_score_s": mean("time_score_s"),
            "time_update_s": mean("time_update_s"), "tokens_per_s": mean("tokens_per_s"),
            "first_logp_dev_max": max(r["first_logp_dev"] for r in rows), "peak_gib": peak_memory(device),
            "planned_gib": round(plan["total"] / 2**30, 2)}


def bench_torchrun(s, device, dtype, peak, work, device_name):
    """`torchrun --nproc_per_node=1 train.py all --bf16` at tiny size: every stage under a process group (nccl on a
    GPU, gloo on CPU) with FSDP2's mixed precision on (the CPU tests run gloo with 2 processes)."""
    run = work / "torchrun_all"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", str(Path(__file__).with_name("train.py")),
           "all", "--out", str(run), "--device", device.type, "--n_sft", "64", "--n_pref", "64", "--n_prompts", "64",
           "--n_eval", "8", "--set", "sft.epochs=1", "--set", "dpo.epochs=1", "--set", "rm.epochs=1",
           "--set", "ppo.max_steps=1", "--algos", "rto", "--no-progress"] + (["--bf16"] if device.type == "cuda" else [])
    with open(work / "torchrun_all.log", "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    return {"backend": "nccl" if device.type == "cuda" else "gloo", "bf16": device.type == "cuda",
            "returncode": p.returncode, "stages_finished": sorted(d.name for d in run.iterdir()
                                                                  if (d / "final" / "config.json").exists())
            if run.exists() else [], "log_tail": (work / "torchrun_all.log").read_text()[-600:] if p.returncode else ""}


if __name__ == "__main__":
    if sys.argv[1:2] == ["gpu"]:
        gpu_main(sys.argv[2:])
    elif sys.argv[1:2] == ["data"]:
        data_main(sys.argv[2:])
    else:
        main()
