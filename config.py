"""Config fields and the command line: every field declared once, with its help and the values that make sense.

    @dataclass
    class MyConfig(SeedField):
        lr: float = option(1e-5, "peak learning rate", POS)     # --lr, shown by --help, checked by check_range

Each command's config is a dataclass of `option` fields (train.py, pipeline.py, explain.py); cli.py builds its
flags from the fields, `check_range` refuses a value outside its declared range, and `config_json` is what is
printed at start and saved with every checkpoint. Fields several commands share live in the small groups below.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from checks import UserError


def option(default, help: str, range: str | None = None, choices: tuple | None = None):
    """A config field with its one-line help (shown by --help, printed at start) and what values make sense:
    range "(0, inf)", "[0, 1]", ... (open or closed ends; floats must also be finite) or a tuple of choices,
    checked at start by check_range."""
    meta = {"help": help + (f" {range}" if range else ""), "range": range, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


POS, NONNEG, UNIT, COUNT = "(0, inf)", "[0, inf)", "[0, 1]", "[1, inf)"  # the ranges most fields use


@dataclass
class SeedField:
    seed: int = option(0, "seeds init, data order and sampling: the same seed gives the same run on CPU")


@dataclass
class DeviceField:
    device: str = option("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))


@dataclass
class Bf16Field:
    bf16: bool = option(False, "bf16 parameters/compute with fp32 master weights and fp32 gradient reduction (GPU)")


@dataclass
class RunDirFields:
    overwrite: bool = option(False, "a fresh run may replace a finished run's final/ in --out (at its end)")
    progress: bool = option(True, "show tqdm bars (never when the output is not a terminal's)")


@dataclass
class SamplingFields:
    temperature: float = option(1.0, "sampling temperature (0: greedy, `sample` only); PPO's log-probs use the "
                                     "same one", NONNEG)
    top_k: int = option(0, "sample from the k most likely tokens (0: all); PPO's log-probs stay those of the full "
                           "distribution (as in the reference code), so anything but 0 makes PPO slightly off-policy",
                        NONNEG)
    top_p: float = option(1.0, "nucleus sampling mass (1: all); the same caveat as top_k", "(0, 1]")
    compile_decode: bool = option(False, "decode with a static KV cache and a torch.compile'd step (CUDA graphs on a "
                                         "GPU), compiled once per rollout shape; off by default: on CPU it does not pay "
                                         "at these sizes (docs/results.md, Throughput), and no GPU has measured it yet")


@dataclass
class TaskFields:
    """A built-in task whose true reward is shown beside the learned ones (ppo: the gold reward every step;
    explain: the gold reward of every token)."""
    task: str = option("", "a built-in task: a name from task.TASKS (words | credit, with --task_seed) or the "
                           "task.json `train.py all` writes under <out>/data ('': none)")
    task_seed: int = option(0, "the seed of a --task given by name (the --seed its data was made with)")


@dataclass
class SetField:
    set: list = option([], "any field of a stage's own config: --set ppo.top_k=50 --set sft.lr=1e-3 (stages sft, "
                           "dpo, rm, ppo; repeat --set)")


def is_bool(f: dataclasses.Field) -> bool:
    """A yes/no field (--flag / --no-flag); "bool | None" is one whose None means "the default of something else"."""
    return f.type in ("bool", bool, "bool | None")


def check_range(cfg):
    """Every field with a declared range (metadata "range", e.g. "(0, 1]") or choices must satisfy it; floats must
    be finite. One error names the field, its value and what is allowed."""
    for f in dataclasses.fields(cfg):
        v, spec, choices = getattr(cfg, f.name), f.metadata.get("range"), f.metadata.get("choices")
        if choices is not None and v not in choices:
            raise UserError(f"--{f.name} {v!r}: choose one of {', '.join(map(str, choices))}")
        if spec is None or v is None:  # None: an optional override left unset
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"--{f.name} {v!r}: expected a number in {spec}")
        lo, hi = (s.strip() for s in spec[1:-1].split(","))
        ok = math.isfinite(v) or (v == math.inf and spec.endswith("inf]"))  # "inf]": infinity itself allowed
        ok = ok and (v > float(lo) if spec[0] == "(" else v >= float(lo))
        ok = ok and (hi == "inf" or (v < float(hi) if spec[-1] == ")" else v <= float(hi)))
        if not ok:
            raise UserError(f"--{f.name} {v}: must be in {spec}")


def config_json(cfg) -> str:
    return json.dumps({"stage": type(cfg).__name__, **dataclasses.asdict(cfg)}, indent=2) + "\n"
