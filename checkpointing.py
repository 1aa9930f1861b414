"""Checkpoints, resuming and run folders: what train_dqn.py and train_agent.py share so that a run loses nothing.

- A run folder (OUTPUT_DIR/RUN_NAME) holds one run: log.jsonl, checkpoint.pt and a lock file. `claim` takes it
  for this process with fcntl.flock, which the kernel drops when the process ends, however it ends: a killed
  run never leaves a lock that blocks the next one. It refuses a folder that already holds a run unless the
  run is resumed (--resume) or started again (--overwrite).
- `save` writes a checkpoint through a temporary file named after the process, then renames it over the old
  one: a crash mid-save leaves the last checkpoint whole, and two writers never share a temporary file.
- `load` reads a checkpoint with weights_only=True and turns each way a file can be wrong (missing, a folder,
  empty, truncated, not a torch file, the other trainer's) into a ValueError of one line that names it.
- `resume_state` is a checkpoint to continue from: this trainer's, with resume state, of the same config.
- `check_checkpoint_flags`: --checkpoint only with --eval-only, and no flag given that contradicts its config.
- `rng_state` / `set_rng_state`: the global torch (and CUDA), numpy and Python RNGs in types that
  torch.load(weights_only=True) reads back.
- `open_log`: a new log, or on resume the old one cut back to what it held at the checkpoint, so that the
  resumed run writes the lines after it again and the log ends as the uninterrupted run's would.
- `all_finite`, `exploded`: the NaN guard's checks (nothing non-finite is saved; a loss 1000 times its first
  is logged as a warning).
- `usage_exit` prints a RunError as a bad flag is printed and exits 2; `run_command_line` is both trainers'
  `main`: parse, train, and the exit code.
"""
import fcntl
import os
import random
import sys

import numpy as np
import torch

LOG, CHECKPOINT, LOCK = "log.jsonl", "checkpoint.pt", "lock"
ZIP_MAGIC = b"PK\x03\x04"        # torch.save writes a zip archive
EXPLOSION = 1000.0               # a loss this many times its first value (on a floor of 1) is logged as a warning


class RunError(Exception):
    """A run that cannot start as asked: its folder is taken or cannot be written, or its checkpoint does not
    fit. The message says why and what to pass instead."""


def usage_exit(error):
    """Print a RunError as the command line's errors are printed (a short usage line, then one line) and exit 2."""
    prog = os.path.basename(sys.argv[0])
    print(f"usage: {prog} [options] (see --help)\n{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


def run_command_line(parse_args, train, argv=None):
    """A trainer's command line: parse, train, exit 0 if the run finished (or evaluated), 1 if it diverged, 2 on
    a usage error (a bad flag or value, or a run folder or checkpoint that does not fit: a RunError)."""
    args = parse_args(argv)
    try:
        summary = train(args)
    except RunError as error:
        usage_exit(error)
    return 0 if summary["status"] in ("finished", "evaluated") else 1


def claim(run_dir, resume=False, overwrite=False):
    """Take the run folder for this process; returns the open lock file (a context manager: the lock lasts
    while it is open, and the kernel drops it if the process dies). Raises RunError if another process holds
    the folder, if it cannot be written, if it already holds a run and neither resume nor overwrite is set,
    or if resume finds no checkpoint. With overwrite the old log and checkpoint are deleted."""
    if resume and overwrite:
        raise RunError("--resume continues the run in its folder and --overwrite starts it again: pass one of them")
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, LOCK), "a+")
    except OSError as error:
        raise RunError(f"cannot write the run folder {run_dir}: {error.strerror or error}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise RunError(f"{run_dir} is in use by another run (process {owner}): wait for it to end, or pick "
                       "another --run-name") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:
        prepare_folder(run_dir, resume, overwrite)
    except RunError:
        lock.close()
        raise
    return lock


def prepare_folder(run_dir, resume, overwrite):
    """Check what the (locked) folder holds against resume/overwrite; delete an old run for overwrite and the
    temporary files of saves that were cut off (no other process can be writing them: we hold the lock)."""
    held = [name for name in (LOG, CHECKPOINT) if os.path.exists(os.path.join(run_dir, name))]
    if resume and not held:
        raise RunError(f"nothing to resume: {run_dir} holds no run; start it without --resume")
    if resume and CHECKPOINT not in held:
        raise RunError(f"nothing to resume: {run_dir} holds no {CHECKPOINT} (the run stopped before its first); "
                       "start it again with --overwrite")
    if held and not (resume or overwrite):
        raise RunError(f"{run_dir} already holds a run ({', '.join(held)}): pass --resume to continue it or "
                       "--overwrite to start it again")
    for name in os.listdir(run_dir):
        if name.endswith(".tmp") or (overwrite and name in held):
            os.remove(os.path.join(run_dir, name))


def save(state, path):
    """torch.save through a temporary file of this process, then an atomic rename over `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path, trainer):
    """The checkpoint at `path` written by `trainer` ("train_dqn.py" or "train_agent.py"), loaded on the CPU
    with weights_only=True. Any way the file is wrong is a ValueError of one line that names it."""
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a checkpoint file (a run's checkpoint is RUN_DIR/{CHECKPOINT})")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise ValueError(f"cannot read the checkpoint {path}: {error.strerror or error}") from None
    if not magic:
        raise ValueError(f"{path} is empty, not a checkpoint")
    if magic != ZIP_MAGIC:
        raise ValueError(f"{path} is not a checkpoint: it was not written by torch.save")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as error:
        raise ValueError(f"cannot read the checkpoint {path}: {error.strerror or error}") from None
    except Exception as error:   # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:120]
        raise ValueError(f"{path} is truncated or damaged, not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict):
        raise ValueError(f"{path} is not a checkpoint of train_dqn.py or train_agent.py")
    writer = state.get("trainer") or ("train_dqn.py" if "network" in state else "train_agent.py")
    if writer != trainer:
        raise ValueError(f"{path} is a {writer} checkpoint; {trainer} cannot read it")
    return state


def changed_flags(saved, current, ignore=()):
    """'--flag saved-value (now current-value)' for each config field (two asdict() dicts) that differs."""
    return [f"--{name.replace('_', '-')} {saved[name]} (now {current[name]})" for name in current
            if name in saved and name not in ignore and saved[name] != current[name]]


def resume_state(path, trainer, config, ignore):
    """The checkpoint to continue from, or a RunError: it must be readable, `trainer`'s, hold the resume state
    and have been saved by a run of the same config (the dict `config`; fields in `ignore` may differ)."""
    try:
        state = load(path, trainer)
    except ValueError as error:
        raise RunError(f"cannot resume: {error}") from None
    if "resume" not in state:
        raise RunError(f"cannot resume: {path} holds no resume state (it was written before --resume existed); "
                       "start the run again with --overwrite")
    changed = changed_flags(state["args"], config, ignore)
    if changed:
        raise RunError(f"cannot resume: {path} was saved by a run with other settings: {', '.join(changed)}; rerun "
                       "its command with --resume, or pass --overwrite to start again")
    return state


def check_checkpoint_flags(args, given, trainer, eval_flags):
    """--checkpoint is read only by --eval-only, which evaluates the checkpoint with its own config: the
    checkpoint must be readable and `trainer`'s, and no flag given (`given`: field names) other than
    `eval_flags` may contradict its config. Raises ValueError, which the trainers' parsers print as usage errors."""
    if args.checkpoint and not args.eval_only:
        raise ValueError("--checkpoint is read only with --eval-only; to continue a run from its checkpoint, rerun "
                         "the run's command with --resume")
    if not args.eval_only:
        return
    if not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH")
    if args.resume or args.overwrite:
        raise ValueError("--eval-only writes no run, so --resume and --overwrite do not apply")
    saved = load(args.checkpoint, trainer)["args"]
    conflicts = [name for name in sorted(given) if name not in eval_flags and name in saved
                 and saved[name] != getattr(args, name)]
    if conflicts:
        flags = lambda values: ", ".join(f"--{n.replace('_', '-')} {values(n)}" for n in conflicts)
        verb = "contradicts" if len(conflicts) == 1 else "contradict"
        raise ValueError(f"{flags(lambda n: getattr(args, n))} {verb} the checkpoint, trained with "
                         f"{flags(saved.get)}: --eval-only evaluates it with its own config, so drop them")


def rng_state():
    """The global RNGs: torch's (and CUDA's, once initialised), numpy's legacy one and Python's."""
    numpy = np.random.get_state(legacy=False)
    key = torch.from_numpy(numpy["state"]["key"].astype(np.int64))    # numpy arrays are not weights_only types
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {**numpy, "state": {"key": key, "pos": numpy["state"]["pos"]}},
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state({**numpy, "state": {"key": numpy["state"]["key"].numpy().astype(np.uint32),
                                            "pos": numpy["state"]["pos"]}})
    random.setstate(state["python"])


def open_log(path, resume_bytes=None):
    """A new log at `path`, or (resume_bytes: its size at the checkpoint) the run's log cut back to that size
    and open for appending: the lines written after the checkpoint are written again by the resumed run."""
    if resume_bytes is None:
        return open(path, "w")
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size < resume_bytes:
        raise RunError(f"cannot resume: {path} is missing or shorter than when its checkpoint was saved "
                       f"({max(size, 0)} < {resume_bytes} bytes); start the run again with --overwrite")
    os.truncate(path, resume_bytes)
    return open(path, "a")


def log_size(log):
    """Bytes written to an open log so far (flushed): what a checkpoint records for open_log."""
    log.flush()
    return os.fstat(log.fileno()).st_size


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def exploded(loss, first):
    """Whether a loss has grown by three orders of magnitude over the run's first (on a floor of 1, so that a
    run starting near zero does not warn at an ordinary loss)."""
    return abs(loss) > EXPLOSION * max(1.0, abs(first))
