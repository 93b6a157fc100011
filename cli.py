"""The command line: `train.py COMMAND --field value ...`, each command's flags built from its config dataclass, the
same under `python` and `torchrun`, and a user's mistake reported in one line instead of a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from checks import UserError, check_ranks_agree
from config import is_bool
from model import choose_attention, release_compiled
from parallel import D, close_dist, init_dist, print0
from rundir import release_locks

TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}


def add_fields(p: argparse.ArgumentParser, cls):
    """One flag per field of cls: --flag/--no-flag for a bool, repeatable for a list, typed otherwise."""
    for f in dataclasses.fields(cls):
        f_help = f.metadata.get("help", "").replace("%", "%%")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if is_bool(f):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=f_help)
        elif f.type in ("list", list):
            p.add_argument(f"--{f.name}", action="append", default=None, help=f_help)
        else:
            p.add_argument(f"--{f.name}", type=TYPES.get(f.type, type(default)), default=default, help=f_help)


def parse_command(argv: list[str], commands: dict, description: str, default: str):
    """argv -> (the command's config, its function). commands: name -> (config class, function). A first argument
    that is a flag runs `default` with it (`python train.py --seed 1`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    for name, (cls, _) in commands.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        add_fields(sub.add_parser(name, help=doc[0] if doc and not doc[0].startswith(cls.__name__) else None,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter), cls)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [default, *argv]
    ns = parser.parse_args(argv)
    cls, fn = commands[ns.command or default]
    return cls(**{k: v for k, v in vars(ns).items() if k != "command" and v is not None}), fn


def parse_sets(items: list[str], classes: dict, fixed: tuple = ()) -> dict[str, dict]:
    """--set STAGE.FIELD=VALUE items -> {stage: {field: value}}, each value parsed as the field's type, so every
    stage field reaches a command that runs several stages without being declared twice. fixed: fields the command
    sets itself (paths), which --set may not."""
    out = {k: {} for k in classes}
    for item in items:
        key, eq, value = item.partition("=")
        stage, _, name = key.partition(".")
        if not eq or stage not in classes:
            raise UserError(f"--set {item!r}: expected STAGE.FIELD=VALUE with STAGE one of {', '.join(classes)}")
        fields = {f.name: f for f in dataclasses.fields(classes[stage])}
        if name not in fields or name in fixed:
            raise UserError(f"--set {item!r}: {stage} has no field {name!r} that this command lets you set "
                            f"(see `train.py {stage} --help`)")
        kind = fields[name].type
        try:
            out[stage][name] = parse_bool(value, kind) if is_bool(fields[name]) else TYPES.get(kind, str)(value)
        except ValueError:
            raise UserError(f"--set {item!r}: {value!r} is not a valid {kind}") from None
    return out


def parse_bool(value: str, kind) -> bool | None:
    """true/false (1/0, yes/no); none for a "bool | None" field; anything else is a ValueError."""
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    if v in ("none", "null", "default") and kind == "bool | None":
        return None
    raise ValueError(value)


def main(commands: dict, argv: list[str], description: str, default: str = "all"):
    """Parse argv, set up this process (one, or one of torchrun's), run the command, and always release the run
    directory's lock and the process group, whether it ended well or not."""
    cfg, fn = parse_command(argv, commands, description, default)
    init_dist(cfg.device)
    ok = False
    try:
        check_ranks_agree(cfg)  # under torchrun: every rank runs rank 0's config, or none starts
        if D.device.type == "cuda":  # once per process: how masked grouped-query attention runs here (model.py)
            print0(choose_attention(D.device, torch.bfloat16 if getattr(cfg, "bf16", False) else torch.float32))
        torch.manual_seed(getattr(cfg, "seed", 0))
        result = fn(cfg)
        ok = True
        return result
    except Exception:
        if D.world > 1:  # name the rank: torchrun prints every worker's output interleaved
            print(f"[rank {D.rank}] failed:", file=sys.stderr, flush=True)
        raise
    finally:
        release_compiled()  # (a stage that failed has not released its compiled decode steps)
        release_locks(ok)
        close_dist(ok)


# A mistake in the command line, the data or a checkpoint is reported in one line, not a traceback; these are the
# errors this project raises with a message that says what and where (--debug or RTO_DEBUG=1: the traceback).
USER_ERRORS = (ValueError, KeyError, OSError)


def run(main_fn):
    """Call main_fn() as the program: a user's error as `error: ...` and exit status 2; under torchrun a failing
    rank's traceback (not a user error's) goes to the job's error summary; gloo's shutdown is skipped (below)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    debug = "--debug" in sys.argv or os.environ.get("RTO_DEBUG", "") not in ("", "0")
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")

    @record
    def guarded():
        try:
            main_fn()
        except USER_ERRORS as e:
            if debug:
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            where = f"[rank {D.rank}] " if D.world > 1 else ""
            print(f"{where}error: {msg}\n(run with --debug or RTO_DEBUG=1 for the traceback)", file=sys.stderr,
                  flush=True)
            sys.exit(2)

    guarded()
    if D.world > 1:
        # gloo occasionally aborts the process during interpreter shutdown after a clean destroy (seen on
        # torch 2.13 CPU, about 1 run in 5), which torchrun reports as a failed job: leave without the shutdown
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)
