"""The run directory: one run at a time (run.lock, held with flock), its records (train_config.json at the first
step, one metrics.jsonl line per step), the checks at start (--resume, --overwrite, --out against the inputs), and
the repair of an export a kill interrupted. A run that fails before its first step leaves the directory as it was.

    run_dir = start_run(cfg)        # checks, lock, printed config
    logger = Logger(run_dir, start_step, ["loss", "grad_norm"])
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path

from tqdm import tqdm

import hf
from checkpoint import latest_checkpoint, sha256
from checks import UserError, check_regular, checkpoint_digest, file_digest
from config import check_range, config_json
from parallel import D, barrier, print0


LOCK = "run.lock"
# this process's locks, the directories it created, and each run directory's config, written at its first step
RUN = {"locks": [], "created": [], "config": {}, "inputs": {}}


def take_lock(run_dir: Path):
    """One run per directory. run.lock is held with flock(2) for the whole run, and holds the pid, host and start
    time of the run using it (for the message a second run gets). flock makes taking it atomic: of any number of
    processes that find the same stale lock, exactly one wins, and a lock whose process died is free again (the
    kernel drops the flock with the process). A lock file naming a live process on this host is also respected
    (a run started by an older version of this code holds no flock); one whose process is gone, or that is empty
    or unreadable (a full disk while it was written), is reported and taken over."""
    lock = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": proc_start(os.getpid()), "argv": sys.argv}
    for _ in range(5):  # retried only when the file was replaced between our open and our flock
        check_regular(lock, "the run's lock")  # (a link would have a file of someone else's overwritten)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{run_dir} is in use by {describe_holder(lock)} ({lock}); wait for that run to end or "
                            f"pick another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (unlinked) it between our open and our flock: open the new one
            os.close(fd)
            continue
        try:
            other = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        except ValueError:
            other = None
        if isinstance(other, dict) and other.get("pid") is not None:
            if lock_is_live(other, me):
                os.close(fd)
                raise UserError(f"{run_dir} is in use by {describe_holder(lock)} ({lock}); wait for that run to end "
                                f"or pick another --out (if that process is gone, delete {lock})")
            print0(f"{lock}: left by pid {other['pid']}, which is no longer running; taking it over")
        elif os.fstat(fd).st_size:
            print0(f"{lock}: unreadable, and no process holds it (left by a full disk?); taking it over")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as e:  # a full disk: leave no empty lock behind for later runs to trip over
            os.unlink(lock)
            os.close(fd)
            raise OSError(e.errno, f"could not write {lock}: {e.strerror}") from None
        RUN["locks"].append((lock, fd))
        return
    raise UserError(f"{lock}: could not take the lock (it keeps being replaced)")


def describe_holder(lock: Path) -> str:
    try:
        other = json.loads(lock.read_text())
        return f"pid {int(other['pid'])} on {other['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def lock_is_live(other: dict, me: dict) -> bool:
    """A lock file's process is still running: same host, the pid alive, not this process (which never took this
    lock), and, where recorded, the same start time (in a container pids repeat from run to run)."""
    try:
        pid, host = int(other["pid"]), str(other["host"])
    except (KeyError, TypeError, ValueError):
        return False
    if host != me["host"]:
        return True  # another host's process: we cannot tell, so it is respected
    start = other.get("start")
    return pid_alive(pid) and pid != me["pid"] and (start is None or proc_start(pid) == start)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None where there is no such file."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> str | None:
    """The start time of a process (/proc/<pid>/stat field 22, clock ticks since boot): with the pid, it tells a
    process from a later one that reuses its pid. None where /proc is not there."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """pid is a running process. A zombie is not: it was killed, or has exited, and its parent has not reaped it
    yet (a run killed with its launcher can stay one for as long as the container's init leaves it); its locks
    are already free."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    fields = proc_stat(pid)
    return not (fields and fields[0] == "Z")


def clear_stale_lock(run_dir: Path):
    """Remove a run.lock that no live process holds (what a killed run leaves in its directory); a live one stays."""
    lock = run_dir / LOCK
    if not check_regular(lock, "the run's lock"):
        return
    fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live run (BlockingIOError)
        try:
            other = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        except ValueError:
            other = None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": proc_start(os.getpid())}
        if not (isinstance(other, dict) and lock_is_live(other, me)):
            lock.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def release_locks(ok: bool):
    """At exit: drop this process's locks (unlinked while still held, then closed, so a waiting process never takes
    a lock on a file that is gone), and the directories it created if they are still empty (a run that failed before
    its first step leaves nothing a later --resume could mistake for progress)."""
    for lock, fd in RUN["locks"]:
        lock.unlink(missing_ok=True)
        os.close(fd)
    for d in reversed(RUN["created"]):
        try:
            d.rmdir()  # only if empty
        except OSError:
            pass
    RUN.update(locks=[], created=[], config={}, inputs={})


CHECKPOINT_INPUTS = ("model", "policy", "init", "dpo", "rm", "critic", "tokenizer")  # fields naming input checkpoints


def take_dir(run_dir: Path):
    """Rank 0 creates run_dir (removed at exit if the run leaves it empty) and takes its lock (see take_lock)."""
    if D.main:
        missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        RUN["created"] += sorted(missing, key=lambda p: len(p.parts))
        take_lock(run_dir)
    barrier()


def start_run(cfg) -> Path:
    """Check everything that needs no data or weights, then take the run directory: ranges, --out against the input
    checkpoints, --resume against the checkpoint's config, the lock, an export a kill interrupted, a finished final/
    (kept unless --overwrite). train_config.json is written at the first step (Logger.log), so a run that fails
    while loading its data or weights changes nothing on disk."""
    run_dir = Path(cfg.out)
    check_range(cfg)
    for name in CHECKPOINT_INPUTS:
        src = getattr(cfg, name, "")
        if src and (Path(src).resolve() == run_dir.resolve() or run_dir.resolve() in Path(src).resolve().parents):
            raise UserError(f"--out {cfg.out} holds the input --{name} {src}: the run would write into (and at its end "
                            f"replace) its own input; pick another --out")
    for name in ("final", "final.tmp", "final.old"):  # exports are swapped by renames: never through a link
        if (run_dir / name).is_symlink():
            raise UserError(f"{run_dir / name} is a symbolic link, where this run's export belongs: a run writes only "
                            f"what it made; move it away")
    for name in (LOCK, "train_config.json", "metrics.jsonl", "eval.json", "train_config.json" + NEXT,
                 "metrics.jsonl" + NEXT):  # the files it writes: regular ones, or none yet (before any work)
        check_regular(run_dir / name, "a file of this run")
    old = latest_checkpoint(run_dir)
    if cfg.resume:
        if old is None:
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} (nothing to resume; "
                            f"drop --resume to start this run)")
        check_resume_config(cfg, old)
    elif old is not None:  # a fresh run would later --resume into, or overwrite, another run's state
        raise UserError(f"{old} holds a resumable checkpoint: pass --resume to continue that run, "
                        f"or remove {run_dir / 'checkpoints'} (or pick another --out) to start over")
    take_dir(run_dir)
    if D.main:
        recover_final(run_dir)  # only under the lock: another run may be mid-export
    barrier()
    if not cfg.resume and (run_dir / "final").exists() and not cfg.overwrite:
        raise UserError(f"{run_dir / 'final'} holds a finished run: pass --overwrite to replace it when this run "
                        f"ends, or pick another --out")
    if D.main:
        RUN["config"][run_dir] = config_json(cfg)
        RUN["inputs"][run_dir] = inputs_record(cfg)  # the inputs as this run reads them, for its export's INPUTS
    print0(f"== {type(cfg).__name__} ({D.world} process{'es' if D.world > 1 else ''}, {D.device})\n"
           + config_json(cfg))
    barrier()
    return run_dir


def recover_final(run_dir: Path):
    """A kill during an export (hf.replace_dir: final -> final.old, final.tmp -> final) leaves final.tmp, or
    final.old with no final/. final.tmp is only renamed once complete, so with final.old beside it the swap is
    finished; a lone final.tmp is an export cut short and is removed. Each repair is reported."""
    final, old, tmp = (run_dir / n for n in ("final", "final.old", "final.tmp"))
    if not final.exists() and old.exists():
        if tmp.exists():  # killed between the two renames: final.tmp is the complete new export
            os.replace(tmp, final)
            print0(f"{final}: the export a kill interrupted between its two renames was complete: moved into place")
        else:
            os.replace(old, final)
            print0(f"{final}: restored from final.old (an export a kill interrupted)")
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        print0(f"{tmp}: removed (an export that a kill cut short; {final.name}/ is the last complete one)")
    if old.exists() and final.exists():
        shutil.rmtree(old, ignore_errors=True)
        print0(f"{old}: removed (the previous export, already replaced)")


def write_json(path: Path, obj):
    if D.main:
        write_file(path, json.dumps(obj, indent=2) + "\n")


def write_file(path: Path, text: str):
    """A file of the run directory written whole: a new file beside it (never an existing one, never through a link),
    renamed over it; whatever is at path must be a regular file (checks.check_regular)."""
    check_regular(path, "a file of this run")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# Records: config, metrics


# While a fresh run replaces a finished one (--overwrite), its records are written beside the finished run's under
# this suffix, and take their place only when its export has replaced final/: a run that fails half-way leaves the
# finished run's final/, metrics.jsonl and train_config.json as they were.
NEXT = ".next"


def record_path(run_dir: Path, name: str, resumed: bool) -> Path:
    """Where a run writes metrics.jsonl / train_config.json: beside a finished final/ that it will replace, under
    NEXT (a resumed run keeps the place its log already has)."""
    nxt = run_dir / (name + NEXT)
    return nxt if (run_dir / "final").is_dir() and (not resumed or nxt.exists()) else run_dir / name


class Logger:
    """One fixed-format line per step (rank 0), every metric also appended to <out>/metrics.jsonl."""

    def __init__(self, run_dir: Path, resume_step: int, keys: list[str]):
        self.run_dir, self.keys, self.resume_step = run_dir, keys, resume_step
        self.path = record_path(run_dir, "metrics.jsonl", resume_step > 0)
        if D.main and resume_step > 0 and check_regular(self.path, "the run's metrics"):  # rewrite what the killed
            # run logged after its checkpoint
            rows = []
            for n, line in enumerate(self.path.read_text().splitlines(), start=1):
                try:
                    row = json.loads(line) if line.strip() else None
                    if row is not None and not isinstance(row.get("step"), int):
                        raise ValueError("no integer 'step'")
                except (ValueError, AttributeError) as e:
                    raise UserError(f"{self.path}:{n}: not a metrics row ({e}); the log of the run to resume is "
                                    f"damaged: move it away to resume without it") from None
                if row is not None and row["step"] <= resume_step:
                    rows.append(row)
            write_file(self.path, "".join(json.dumps(r) + "\n" for r in rows))  # a crash loses nothing

    def log(self, step: int, metrics: dict):
        if not D.main:
            return
        pending = RUN["config"].pop(self.run_dir, None)
        if pending is not None:  # the run has made a step: now its directory holds a run (see start_run)
            if self.resume_step == 0:
                self.path.unlink(missing_ok=True)  # an earlier run that failed before its export: start over
            write_file(record_path(self.run_dir, "train_config.json", self.resume_step > 0), pending)
        # valid JSON whatever happens: a non-finite metric (explained variance of a constant) is written as null
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        check_regular(self.path, "the run's metrics")  # (a named pipe would hang the run, a link write elsewhere)
        with os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a") as f:
            f.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        line = f"step {step:5d}" + "".join(f" | {k} {metrics[k]:.4g}" for k in self.keys if k in metrics)
        tqdm.write(line)

def promote_records(run_dir: Path):
    """After the export has replaced final/: an --overwrite's records take the finished run's place (rank 0)."""
    if D.main:
        for name in ("metrics.jsonl", "train_config.json"):
            if check_regular(run_dir / (name + NEXT), "a record of this run"):
                check_regular(run_dir / name, "a record of this run")
                os.replace(run_dir / (name + NEXT), run_dir / name)
    barrier()


# ----------------------------------------------------------------------------------------------------------
# --resume

# Fields that --resume may change: they do not change what the run computes up to where it stopped (out: the run
# directory was moved or copied). max_steps lengthens or shortens the run, and the cosine schedule then follows the
# new length from the resumed step on.
RESUME_MAY_CHANGE = ("resume", "out", "max_steps", "save_every", "progress", "overwrite")


def changed_fields(saved: dict, cfg, ignore) -> list[str]:
    """The fields of cfg that differ from a saved config, but for `ignore`. A field the saved run did not have yet (a
    fork's new hyper-parameter) counts as equal at its default value."""
    defaults = json.loads(config_json(type(cfg)()))
    now = json.loads(config_json(cfg))
    saved = {**{k: defaults[k] for k in now if k not in saved and k in defaults}, **saved}
    return sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))


def check_resume_config(cfg, ckpt: Path):
    """Refuse --resume when a field that changes the run's meaning differs from the checkpoint's train_config.json."""
    try:
        check_regular(ckpt / "train_config.json", "the checkpoint's config")
        saved = json.loads((ckpt / "train_config.json").read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{ckpt / 'train_config.json'}: {e.__class__.__name__}: {e}; the checkpoint to resume is "
                        f"damaged") from None
    changed = changed_fields(saved, cfg, RESUME_MAY_CHANGE)
    now = json.loads(config_json(cfg))
    if changed:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise UserError(f"--resume: {ckpt} was written with other settings ({diff}). These change what the run "
                        f"computes: resume with the checkpoint's values, or start over in another --out. "
                        f"--resume may change only {', '.join(RESUME_MAY_CHANGE)}")


# ----------------------------------------------------------------------------------------------------------
# What made a final/: its inputs' digests, recorded with it and checked before `all --reuse` keeps it

INPUTS = "inputs.json"  # in every export: sha256 of the data files and the checkpoints the stage started from
DATA_FIELDS = ("data", "eval_data", "prompts")  # config fields naming data files
def recorded_inputs(run_dir: Path) -> str:
    """INPUTS of the run in run_dir, as start_run found them (rank 0; other ranks write no export)."""
    return RUN["inputs"].get(run_dir, "")


def inputs_record(cfg) -> str:
    """inputs.json of a stage: the digest of every data file and checkpoint its config names."""
    data = {f: file_digest(Path(getattr(cfg, f))) for f in DATA_FIELDS if getattr(cfg, f, "")}
    ckpts = {f: checkpoint_digest(Path(getattr(cfg, f))) for f in CHECKPOINT_INPUTS if getattr(cfg, f, "")}
    return json.dumps({"data": data, "checkpoints": ckpts}, indent=2, sort_keys=True) + "\n"


def why_not_kept(final: Path, cfg) -> str | None:
    """Why a finished final/ is not what this stage would make now (None: it is): its record is missing, its inputs
    changed since (a data file, the checkpoint it started from), or its weights are not the ones it wrote."""
    for name in (INPUTS, hf.CHECKSUMS):
        if not check_regular(final / name, "an export's record"):
            return f"it has no {name}"
    if (final / INPUTS).read_text() != inputs_record(cfg):
        saved, now = json.loads((final / INPUTS).read_text()), json.loads(inputs_record(cfg))
        changed = [f"--{k} {'file' if kind == 'data' else 'checkpoint'}" for kind in ("data", "checkpoints")
                   for k in sorted({*saved.get(kind, {}), *now[kind]}) if saved.get(kind, {}).get(k) != now[kind].get(k)]
        return f"its inputs changed since it was made ({', '.join(changed) or 'its record'})"
    listed = json.loads((final / hf.CHECKSUMS).read_text())
    present = sorted(p.name for p in final.glob("*.safetensors"))
    if present != sorted(listed):
        return f"its weight files are {present or 'missing'}, it wrote {sorted(listed)}"
    bad = [name for name in sorted(listed) if sha256(final / name) != listed[name]]
    return f"its weights were changed since it wrote them ({', '.join(bad)})" if bad else None
