"""Throughput of model.py against the Hugging Face Llama on the same config and the same weights.

    python bench.py                         # bench12m preset (~12M params), fp32, CPU
    python bench.py --preset tiny --device cuda --dtype bfloat16
    python bench.py --decode_batches 1,16 --no_reference   # eager against compiled decode (--compile_decode)

Prints, side by side: training-step tokens/s (forward + backward + AdamW) and generation tokens/s
(batch 16, 64-token prompts, 128 new tokens, greedy, no early stop). The reference column needs
`transformers`; without it the column says "reference not installed". Rollout generation dominates
RLHF wall time, which is why generation has its own number.
"""
import argparse
import time

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


if __name__ == "__main__":
    main()
