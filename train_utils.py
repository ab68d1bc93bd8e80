"""
Plumbing every stage shares, and nothing of the method: distributed setup, rank-0 logging, precision,
atomic checkpoints and exact resume (RNG states, data position), EMA, and a data loader that can be stopped
and restarted mid-epoch. The method lives in the stage scripts; this file only keeps them short.
"""
import argparse
import atexit
import contextlib
import copy
import glob
import json
import logging
import os
import random
import shutil
import sys
import time
import warnings
import zipfile
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler

import checkpoints
import models


#################################################################################
#                              Distributed Helpers                              #
#################################################################################

def setup_distributed():
    """
    Initialise torch.distributed when launched by torchrun (WORLD_SIZE set), else run as one process.
    NCCL on GPU, gloo on CPU. Returns a namespace (rank, world_size, local_rank, device, is_main).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # TF32 matmuls/convs: ~free speed on Ampere+ (DiT's train.py turns these on too).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return SimpleNamespace(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def cleanup_distributed():
    """End the process group (if any) so torchrun exits cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier():
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src=0):
    """Send a picklable object from rank `src` to every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor):
    """Average a tensor over all ranks (returns a new tensor; identity in a single process)."""
    tensor = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


#################################################################################
#                          Logging and Experiment Folders                       #
#################################################################################

def _rank():
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def create_logger(logging_dir=None, name="eqvae"):
    """Rank 0 logs to stdout and `logging_dir/log.txt`; other ranks stay silent (as DiT's train.py)."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if _rank() == 0:
        # DiT's blue timestamp on a terminal; plain text in log.txt and in pipes.
        colour = "[\033[34m%(asctime)s\033[0m] %(message)s" if sys.stdout.isatty() else "[%(asctime)s] %(message)s"
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(colour, datefmt="%Y-%m-%d %H:%M:%S"))
        logger.addHandler(console)
        if logging_dir is not None:
            os.makedirs(logging_dir, exist_ok=True)
            file = logging.FileHandler(os.path.join(logging_dir, "log.txt"))
            file.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
            logger.addHandler(file)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.ERROR)
    return logger


class MetricsLog:
    """Append-only JSON-lines log of scalars (rank 0 only), so curves can be plotted later."""

    def __init__(self, path):
        self.path = path if _rank() == 0 else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, step, **scalars):
        if not self.path:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in scalars.items():
            row[k] = v.item() if torch.is_tensor(v) else v
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk: the row is lost, the checkpoints are not (a resume drops a partial line)
            raise OSError(e.errno, f"could not append to {self.path}: {e.strerror or e}. Free some space and "
                          f"--resume auto (the newest checkpoint is intact)") from None

    def truncate_after(self, step):
        """On resume, drop rows written after the checkpoint's step so the curve has no duplicates, and a partial
        line (a run killed mid-write, a full disk) with a warning rather than failing every later resume."""
        if not self.path or not os.path.exists(self.path):
            return
        rows, bad = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    if line.strip() and json.loads(line).get("step", 0) <= step:
                        rows.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    bad += 1
        if bad:
            warnings.warn(f"{self.path}: dropped {bad} line(s) that are not complete JSON (a run killed while "
                          f"writing, or a full disk)")
        checkpoints.atomic_write(self.path, lambda tmp: open(tmp, "w").writelines(rows))


def apply_preset(args, parser, presets, argv=None):
    """
    Fill in a preset's defaults (e.g. --preset tiny) for every option the user did not type, so
    `--preset tiny --batch-size 8` means "tiny, but batch 8" (and typing a default value explicitly keeps it).
    argv: the arguments parsed into `args` (default sys.argv[1:]).
    """
    if getattr(args, "preset", None) is None:
        return args
    if args.preset not in presets:
        raise SystemExit(f"Unknown preset {args.preset!r}; choose from {sorted(presets)}")
    # Parse again with every default suppressed: what remains is exactly what was typed.
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    typed = vars(probe.parse_known_args(sys.argv[1:] if argv is None else argv)[0])
    for key, value in presets[args.preset].items():
        if not hasattr(args, key):
            raise KeyError(f"preset {args.preset!r} sets unknown option {key!r}")
        if key not in typed:
            setattr(args, key, value)
    return args


def positive_int(text):
    """argparse type: an integer >= 1 (a step interval of 0 would divide by zero, a negative count mean nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def precision_name(text):
    """argparse type: fp32 / bf16 / fp16, also as accelerate's and REPA's --mixed-precision no / bf16 / fp16."""
    return {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(text.lower(), text)


def describe_presets(presets):
    """--preset's help: what each preset sets."""
    root = os.path.dirname(checkpoints.ASSETS)  # the shipped bases are shown as assets/..., not absolute paths
    show = lambda v: os.path.relpath(v, root) if isinstance(v, str) and v.startswith(root + os.sep) else v
    return "; ".join(f"{name}: " + ", ".join(f"--{k.replace('_', '-')} {show(v)}" for k, v in p.items())
                     for name, p in presets.items()) + " (options you type still win)"


def add_run_args(parser, presets, seed, log_every, ckpt_every, keep_last, data_help="an image folder, or 'synthetic'",
                 cuda_precision="bf16"):
    """The options every trainer shares, with the stage's defaults: data, run folder, resume, system."""
    g = parser.add_argument_group("data and run folder")
    g.add_argument("--preset", choices=sorted(presets), default=None, help=describe_presets(presets))
    g.add_argument("--data", "--data-path", "--data-dir", dest="data", type=str, default=None,
                   help=data_help + " (--data-path: DiT's and SiT's name; --data-dir: REPA's)")
    g.add_argument("--num-images", type=positive_int, default=None, help="use only the first N images")
    g.add_argument("--results-dir", type=str, default="results", help="where run folders are made")
    g.add_argument("--exp-name", type=str, default=None, help="the run folder's name under --results-dir")
    g.add_argument("--resume", type=str, default=None, help="'auto' (the newest checkpoint of the run folder) or a "
                   "checkpoint path")
    g = parser.add_argument_group("system")
    g.add_argument("--precision", "--mixed-precision", dest="precision", type=precision_name,
                   choices=["fp32", "bf16", "fp16"], default=None, help=f"autocast precision (default: "
                   f"{cuda_precision} on CUDA, fp32 on CPU); --mixed-precision no|fp16|bf16 (REPA's, accelerate's)")
    g.add_argument("--global-seed", type=int, default=seed, help="seed of the run (rank r uses seed * world + r)")
    g.add_argument("--num-workers", type=int, default=4, help="data loader processes per GPU (training, and building "
                   "a latent or token cache)")
    g.add_argument("--log-every", type=positive_int, default=log_every, help="steps between log lines / metrics rows")
    g.add_argument("--ckpt-every", type=positive_int, default=ckpt_every, help="steps between checkpoints")
    g.add_argument("--keep-last", type=int, default=keep_last, help="checkpoints kept, the newest (0 = all)")
    return parser


def add_latent_args(parser, what, table, model):
    """The options of a generative model on a frozen KL autoencoder's latents (DiT, SiT), with DiT's defaults
    (SiT and REPA kept them): `model` from the table of names, 400K steps of batch 256, AdamW lr 1e-4, EMA 0.9999."""
    g = parser.add_argument_group(f"{what} (the {what} paper's hyperparameters)")
    g.add_argument("--model", type=str, default=model, help=f"one of {', '.join(table)}")
    g.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    g.add_argument("--max-steps", type=positive_int, default=400_000, help="training steps (EQ-VAE reports 400K)")
    g.add_argument("--epochs", type=positive_int, default=None, help="train this many epochs instead of "
                   "--max-steps (DiT's train.py counts epochs: 1400)")
    g.add_argument("--global-batch-size", type=int, default=256, help="images per step over all GPUs")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the weights, updated every step")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (in place: checkpoints keep the "
                   "official keys); the first steps take the compile time")
    g = parser.add_argument_group("latents")
    g.add_argument("--vae", type=str, default=None, help=f"the autoencoder {what} trains on: a diffusers folder, an "
                   "LDM / diffusers file, a finetune_eqvae.py export, or a name in models.KLVAE_models for random "
                   "weights (pipeline checks)")
    g.add_argument("--image-size", type=int, default=256, help="image resolution (latents are image-size / f)")
    g.add_argument("--num-classes", type=int, default=1000, help="class labels (ImageNet: 1000)")
    g.add_argument("--cache-latents", type=str, default=None,
                   help="folder of a latent cache: built (or completed) first, then trained from")
    g.add_argument("--cache-batch-size", type=positive_int, default=64, help="images per autoencoder forward "
                   "while building the cache")
    g.add_argument("--cache-shard-size", type=positive_int, default=1000, help="images per cache file")
    add_latent_norm_args(g)
    return parser


def add_latent_norm_args(parser):
    """--scaling-factor / --shift-factor: override the latent normalisation an autoencoder file carries."""
    parser.add_argument("--scaling-factor", type=float, default=None, help="latents enter the generator as (z - "
                        "shift) * scale; default: what the autoencoder carries (SD-VAE 0.18215, SDXL 0.13025, "
                        "SD3 1.5305, FLUX 0.3611; evaluate.py latent-stats measures one)")
    parser.add_argument("--shift-factor", type=float, default=None, help="default: the autoencoder's (SD3 0.0609, "
                        "FLUX 0.1159, else 0)")
    return parser


def run_folder(results_dir, name, exp_name, resume, args=None, keys=()):
    """
    The run folder, DiT's way: results_dir/NNN-name, a new index for every fresh run, so runs never collide;
    --exp-name X: exactly results_dir/X. --resume auto continues the newest NNN-name run that has checkpoints and
    was made with the same values of the options in `keys` (its args.json); --resume PATH, the run that holds it.
    """
    if exp_name:
        return os.path.join(results_dir, exp_name)
    runs = sorted(glob.glob(os.path.join(glob.escape(results_dir), f"[0-9][0-9][0-9]-{glob.escape(name)}")))
    if resume and resume != "auto" and os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(resume)))):
        folder = os.path.dirname(os.path.dirname(os.path.abspath(resume)))  # .../NNN-name/checkpoints/step.pt
        if os.path.isdir(os.path.join(folder, "checkpoints")):
            return folder
    if resume == "auto":
        for run in reversed(runs):
            try:
                with open(os.path.join(run, "args.json")) as f:
                    saved = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if list_checkpoints(os.path.join(run, "checkpoints")) and all(
                    saved.get(k) == getattr(args, k, None) for k in keys):
                return run
    existing = [int(os.path.basename(p)[:3]) for p in glob.glob(os.path.join(glob.escape(results_dir), "[0-9]" * 3 + "-*"))]
    return os.path.join(results_dir, f"{max(existing, default=-1) + 1:03d}-{name}")


def _caught(fn, *args):
    """fn(*args) and the messages of the warnings it raised, to go into the run's log.txt (not only stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [str(w.message) for w in caught]


_NEW_RUN_FOLDERS = []  # run folders this process created
_LOCKS = {}  # run folder -> its open lock file: this process's locks (a lock lives as long as its file is open)


def _lock_run_folder(exp_dir):
    """Hold exp_dir/.lock for the life of this process: two runs writing one folder would interleave their logs and
    checkpoints. A held lock names its holder; a lock whose process died is free (the OS released it). Runs one
    after the other in one process (tests, notebooks) share the lock."""
    import fcntl
    import socket
    if os.path.abspath(exp_dir) in _LOCKS:
        return
    f = open(os.path.join(exp_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FileExistsError(f"{exp_dir} is in use by {holder}: wait for that run to end (or stop it), or choose "
                              f"another --exp-name / --results-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _LOCKS[os.path.abspath(exp_dir)] = f
    atexit.register(f.close)


def setup_experiment(results_dir, name, resume, dist, precision, args=None, keys=()):
    """
    Every trainer's preamble: the run folder (run_folder: results_dir/NNN-name, or --exp-name), locked for this
    run; the checkpoint to resume from (--resume auto|PATH); rank 0's logger (stdout + log.txt), the metrics log and
    args.json. Starting afresh in a folder that already holds checkpoints is refused, so a run is never overwritten;
    leftovers of a save that was killed are removed; resuming an older checkpoint than the newest moves the newer
    ones (an abandoned branch) to checkpoints/abandoned-<time>/, so the resumed run's pruning never deletes its own.
    Returns a namespace: dir, ckpt_dir, resume (a path or None), logger, metrics.
    """
    exp_dir = run_folder(results_dir, name, getattr(args, "exp_name", None), resume, args, keys) if args else \
        os.path.join(results_dir, name)
    exp_dir = broadcast_object(exp_dir)  # rank 0's choice (the indices it saw), on every rank
    _LAST_SAVED.clear()  # the NaN message speaks of this run's checkpoints only
    ckpt_dir, ema_dir = os.path.join(exp_dir, "checkpoints"), os.path.join(exp_dir, "ema")
    fresh = not os.path.isdir(exp_dir)
    resume_path, early = _caught(resolve_resume, resume, ckpt_dir)  # warnings for log.txt, once it exists
    saved_args = os.path.join(exp_dir, "args.json")
    if resume_path is not None and args is not None and os.path.isfile(saved_args):
        with open(saved_args) as f:  # before any weights load or any file changes (resume_training checks again)
            check_resume_args(json.load(f), args, keys)
    if resume_path is None and list_checkpoints(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue that run, or "
                              f"choose another --exp-name / --results-dir (nothing was overwritten).")
    away = None
    if _rank() == 0:
        try:
            os.makedirs(exp_dir)  # atomic: of two runs starting at once, one creates the folder, one finds it
            _NEW_RUN_FOLDERS.append(exp_dir)  # removed again if this run fails before its first checkpoint
        except FileExistsError:
            pass
        os.makedirs(ckpt_dir, exist_ok=True)
        _lock_run_folder(exp_dir)
        for folder in (exp_dir, ckpt_dir, ema_dir):
            early += _caught(checkpoints.remove_leftovers, folder)[1]  # writes killed midway (targets intact)
        if resume_path is not None:
            step = _step_of(resume_path)
            newer = [p for d in (ckpt_dir, ema_dir) for p in list_checkpoints(d) if step is not None and
                     _step_of(p) > step]
            if newer:  # checkpoints and EMA exports (what sample.py and curves.py read) of the abandoned steps
                away = os.path.join(ckpt_dir, f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
                for p in newer:
                    sub = os.path.join(away, "ema") if os.path.dirname(p) == ema_dir else away
                    os.makedirs(sub, exist_ok=True)
                    os.replace(p, os.path.join(sub, os.path.basename(p)))
        if args is not None:
            checkpoints.atomic_write(os.path.join(exp_dir, "args.json"),
                                     lambda tmp: open(tmp, "w").write(json.dumps(vars(args), indent=2, default=str)))
    barrier()
    logger = create_logger(exp_dir)
    logger.info(f"Experiment directory: {exp_dir} (world_size={dist.world_size}, {dist.device}, {precision})")
    for message in early:
        logger.warning(f"Warning: {message}")
    if away is not None:
        logger.info(f"Checkpoints and EMA exports newer than {resume_path} (an abandoned branch) are kept in {away}; "
                    f"the metrics rows after its step are dropped from metrics.jsonl")
    exp = SimpleNamespace(dir=exp_dir, ckpt_dir=ckpt_dir, resume=resume_path, logger=logger, fresh=fresh,
                          metrics=MetricsLog(os.path.join(exp_dir, "metrics.jsonl")))
    return exp


def check_resolution(resolution, autoencoder, patch=1, flag="--image-size"):
    """The image side must be a multiple of the autoencoder's downsampling (and the latent side of a patch size),
    or the latents would not tile the image: an error naming the nearest valid sides."""
    step = autoencoder.downsampling * patch
    if resolution < step or resolution % step:
        lo, hi = max(step, resolution // step * step), (resolution // step + 1) * step
        raise ValueError(f"{flag} {resolution} is not a multiple of {step} (the autoencoder's downsampling "
                         f"{autoencoder.downsampling}{f' x patch {patch}' if patch > 1 else ''}): use {lo} or {hi}")


def keep_best(folder, step, value, k, save):
    """
    Keep the k checkpoints of lowest `value` (a validation loss) in `folder`, as Lightning's ModelCheckpoint(
    monitor=..., save_top_k=k) does: save(step) writes folder/<step>.pt when this step is among the k best so far,
    and the one it displaces is removed; folder/best.json records {step: value}. Collective when save is.
    Returns whether this step was kept.
    """
    index = os.path.join(folder, "best.json")
    best = {}
    if os.path.exists(index):
        with open(index) as f:
            best = {int(s): v for s, v in json.load(f).items()}
    best[int(step)] = float(value)
    keep = sorted(best, key=lambda s: (best[s], s))[:k]
    if step not in keep:
        return False
    save(step)
    if _rank() == 0:
        for s in set(best) - set(keep):
            if os.path.exists(os.path.join(folder, f"{s:07d}.pt")):
                os.remove(os.path.join(folder, f"{s:07d}.pt"))
        checkpoints.atomic_write(index, lambda tmp: open(tmp, "w").write(json.dumps({s: best[s] for s in keep})))
    barrier()
    return True


def per_rank_batch(global_batch_size, world_size):
    """The batch of one process; the global batch must split evenly (DiT's assertion, as an error that says why)."""
    if global_batch_size < 1 or global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {global_batch_size} is not divisible by the world size {world_size}: "
                         f"use a positive multiple of {world_size} (the paper's fine-tune: 10 per GPU x 8 GPUs = 80)")
    return global_batch_size // world_size


def resume_training(exp, args, keys, loader=None, required=("model", "opt", "args", "step"), config=None,
                    what="model", lr=None, same=None, **objects):
    """
    Continue the run at exp.resume in place, then seed the training loop. The checkpoint must have been made with
    the same values of the options in `keys` (and the same model `config`, when given); every object passed (model,
    EMA, optimisers, scaler; None is skipped) and the data position are restored and the metrics log is cut back to
    the checkpoint's step. Then every rank gets its own seed (global_seed * world_size + rank, DiT's convention) and,
    when resuming, the RNG states the checkpoint saved for it, so the loop continues exactly.
    lr: the learning rate from now on (None keeps the checkpoint's), or a function of the checkpoint giving it.
    same: {field: value} the checkpoint must hold as well when it records the field (e.g. vae_norm).
    Returns (step, checkpoint), or (0, None) for a fresh start.
    """
    ckpt, step = None, 0
    if exp.resume is not None:
        ckpt = load_checkpoint(exp.resume, required)
        if config is not None and ckpt.get("config") != config:
            saved = ckpt.get("config") or {}
            diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}"
                    for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
            raise ValueError(f"Cannot resume from {exp.resume}: it was made for another {what}:\n  "
                             + "\n  ".join(diff))
        check_resume_args(ckpt["args"], args, keys)
        for k, v in (same or {}).items():
            if k in ckpt and ckpt[k] != v:
                raise ValueError(f"Cannot resume from {exp.resume}: its {k} is {ckpt[k]}, this run's is {v} (the "
                                 f"model was trained on other inputs); use the same autoencoder and factors, or "
                                 f"start a new run")
        step = restore_training_state(ckpt, loader, **objects)
        _record_saved(exp.resume, step, ckpt.get("model") or {})  # what the NaN message calls the last checkpoint
        for message in _caught(exp.metrics.truncate_after, step)[1]:
            exp.logger.warning(f"Warning: {message}")
        exp.logger.info(f"Resumed from {exp.resume} at step {step}")
        lr = lr(ckpt) if callable(lr) else lr
        if lr is not None:  # an optimiser's state dict carries its learning rate: the one asked for now wins
            for name, opt in objects.items():
                if isinstance(opt, torch.optim.Optimizer):
                    old = {g["lr"] for g in opt.param_groups}
                    if old != {lr}:
                        exp.logger.info(f"Learning rate of {name}: {', '.join(f'{v:.4g}' for v in sorted(old))} in "
                                        f"the checkpoint, {lr:.4g} from now on (the value of this run's options)")
                    for g in opt.param_groups:
                        g["lr"] = lr
    seed_everything(args.global_seed, _rank(), dist.get_world_size() if is_distributed() else 1)
    if ckpt is not None:
        restore_rng_states(ckpt.get("rng"), exp.logger)
    return step, ckpt


def distributed(model, device):
    """model inside DistributedDataParallel when there are several processes (as is otherwise)."""
    if not is_distributed():
        return model
    return DDP(model, device_ids=[device.index] if torch.device(device).type == "cuda" else None)


def no_sync(*modules, sync):
    """Gradient accumulation under DDP: all-reduce only when `sync` (the last micro-batch); the other micro-batches
    run every DDP module given (None and plain modules are skipped) in its no_sync()."""
    stack = contextlib.ExitStack()
    if not sync:
        for m in modules:
            if isinstance(m, DDP):
                stack.enter_context(m.no_sync())
    return stack


def load_frozen_autoencoder(spec, kind, exp, device, seed=0, scaling_factor=None, shift_factor=None):
    """
    The frozen autoencoder of a stage-2 run (eval mode, no gradients, on device): a checkpoint path (anything
    checkpoints.load_autoencoder reads), or the name of a config in models.KLVAE_models / VQGAN_models, built
    with random weights from `seed` (tests and pipeline checks only) and saved into the run folder, where sample.py
    finds it. kind: "kl" (DiT, SiT: continuous latents) or "vq" (MaskGIT: tokens). scaling_factor / shift_factor
    (--scaling-factor / --shift-factor) replace the latent normalisation the autoencoder carries.
    Returns (autoencoder, its path).
    """
    table = models.KLVAE_models if kind == "kl" else models.VQGAN_models
    norm = {k: v for k, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)) if v is not None}
    if spec in table and not os.path.exists(spec):
        with torch.random.fork_rng():  # the same random weights on every rank, without touching the run's seed
            torch.manual_seed(seed)
            ae = table[spec](**norm)
        path = os.path.join(exp.dir, f"{'vae' if kind == 'kl' else 'vqgan'}-{spec}-random.ckpt")
        if _rank() == 0 and not os.path.exists(path):
            (checkpoints.save_ldm if kind == "kl" else checkpoints.save_taming)(ae, path)
        exp.logger.info(f"Autoencoder: {spec!r} with RANDOM weights (a pipeline check, not a real autoencoder), "
                        f"saved to {path}")
    else:
        ae, path = checkpoints.load_autoencoder(spec, log=exp.logger.info, **norm), os.path.abspath(spec)
        exp.logger.info(f"Autoencoder: loaded {spec}")
    is_vq = isinstance(ae, models.VQGAN)
    if is_vq != (kind == "vq"):
        need = "a VQ-GAN's discrete tokens (MaskGIT)" if kind == "vq" else "a KL autoencoder's continuous latents"
        raise ValueError(f"{spec} holds a {type(ae).__name__}; this stage trains on {need}")
    requires_grad(ae, False)
    return ae.eval().to(device), path


#################################################################################
#                             Seeds and Precision                               #
#################################################################################

def seed_everything(seed, rank=0, world_size=1):
    """Per-rank seed = seed * world_size + rank (DiT's convention); seeds python, numpy and torch."""
    s = seed * world_size + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


def resolve_precision(precision, device, cuda_default="bf16"):
    """None -> cuda_default on CUDA (bf16 for the generators: fast, no loss scaling), fp32 on CPU."""
    if precision is None:
        return cuda_default if torch.device(device).type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def autocast(precision, device):
    """Mixed-precision context for the forward pass; weights and optimiser state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_scaler(precision, device):
    """Loss scaling is only needed for fp16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=(precision == "fp16"))


class NonFiniteLossError(RuntimeError):
    """Raised when a loss goes NaN/inf: training stops before a broken state can be saved."""


# Non-finite losses are watched on the device: reading a flag back every step would make the host wait for the GPU
# once per step. check_finite records, raise_if_nonfinite reads; TrainingMeter.log (every log step),
# save_training_checkpoint (before anything is written) and TrainingMeter.close (the end of the loop) call it, so a
# broken state is never saved or exported, and the error names the first bad step and the parts bad there.
_NEVER = 2 ** 62  # "never non-finite" in the first-bad-step records
_WATCH = {}       # loss part -> first step at which it was non-finite, a 0-dim int64 tensor on the loss's device
_WATCH_HOST = {}  # the same for parts passed as host numbers


def check_finite(step, **losses):
    """Record, without waiting for the device, whether any loss part is NaN/inf at optimiser step `step`; the
    first such step of each part is kept. raise_if_nonfinite() reads the records (one sync)."""
    for name, v in losses.items():
        if torch.is_tensor(v):
            first = torch.where(torch.isfinite(v.detach()).all(), _NEVER, step)  # kernels only, no host read
            _WATCH[name] = torch.minimum(_WATCH[name], first) if name in _WATCH else first
        elif not np.isfinite(v).all():  # a host number is tested on the host, for free
            _WATCH_HOST[name] = min(_WATCH_HOST.get(name, _NEVER), step)


def reset_finite_checks():
    """Forget the records: a new run (TrainingMeter) in the same process starts clean."""
    _WATCH.clear()
    _WATCH_HOST.clear()


def raise_if_nonfinite():
    """Raise NonFiniteLossError if check_finite saw a NaN/inf in this run, naming the first such step, the parts
    non-finite there and what became of the last checkpoint. One host-device sync; collective: every rank calls it
    at the same steps (log steps, saves), and all stop together, or the others would hang at the next collective."""
    names = sorted(set(_WATCH) | set(_WATCH_HOST))
    if not names:
        return
    device = next(iter(_WATCH.values())).device if _WATCH else torch.device("cpu")
    local = torch.stack([torch.minimum(_WATCH[n], torch.tensor(_WATCH_HOST.get(n, _NEVER), device=device))
                         if n in _WATCH else torch.tensor(_WATCH_HOST[n], device=device) for n in names])
    first = local.clone()
    if is_distributed():
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    both = torch.cat([first, local]).tolist()  # the one sync
    first, local = dict(zip(names, both[:len(names)])), dict(zip(names, both[len(names):]))
    step = min(first.values())
    if step >= _NEVER:
        return
    reset_finite_checks()
    mine = [n for n in names if local[n] == step]
    where = f"{', '.join(mine)} on rank {_rank()}" if mine else \
        f"{', '.join(n for n in names if first[n] == step)} on another rank (this is rank {_rank()})"
    last = "no checkpoint was saved by this run"
    if _LAST_SAVED:
        last = (f"the last checkpoint, {_LAST_SAVED['path']} (step {_LAST_SAVED['step']}), is untouched; its "
                f"largest weight is {_LAST_SAVED['max_abs']:.3g}")
        if not _LAST_SAVED["max_abs"] < 1e4:  # diverged before the NaN: resuming it would fail again
            last += " (diverged already: resume from an older checkpoint)"
    raise NonFiniteLossError(f"Non-finite loss at step {step}: {where}. Training stopped; nothing after step "
                             f"{step - 1} was saved ({last}). Try a lower learning rate or --precision fp32 / bf16.")


# What a user can cause (a missing or wrong file, a bad option value, a run folder in use, a NaN loss): the entry
# points report these as one line, not a traceback. Anything else is a bug, and keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError, NonFiniteLossError)


def user_error_message(e):
    """One line for a user error: the message itself (KeyError would quote it), with its type when it says little."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return msg if len(msg) > 20 else f"{type(e).__name__}: {msg}"


def run_main(main, args):
    """A stage script's entry point: main(args), with user errors (USER_ERRORS) ended by one line on stderr and
    exit status 1 (EQVAE_TRACEBACK=1 shows the traceback), and the process group closed whatever happens."""
    _NEW_RUN_FOLDERS.clear()  # only this run's folders (runs one after another in one process)
    try:
        return main(args)
    except USER_ERRORS as e:
        for folder in _NEW_RUN_FOLDERS:  # a failed run leaves no empty run folder behind
            if not list_checkpoints(os.path.join(folder, "checkpoints")):
                shutil.rmtree(folder, ignore_errors=True)
        if os.environ.get("EQVAE_TRACEBACK"):
            raise
        raise SystemExit(f"error: {user_error_message(e)}") from None
    finally:
        cleanup_distributed()


#################################################################################
#                                 Checkpoints                                   #
#################################################################################

def save_checkpoint(state, path):
    """
    Write atomically on rank 0 (checkpoints.atomic_write): a temporary file, fsync, rename. A run killed mid-write
    leaves the previous checkpoint intact; a full disk is an error saying so, naming the file.
    """
    if _rank() == 0:
        checkpoints.atomic_write(path, lambda tmp: torch.save(state, tmp))


def _step_of(path):
    """The step of a checkpoint named <step>.pt, else None."""
    stem = os.path.basename(path)[:-3] if path.endswith(".pt") else ""
    return int(stem) if stem.isdigit() else None


def list_checkpoints(ckpt_dir):
    """Checkpoints named <step>.pt, oldest first."""
    paths = [p for p in glob.glob(os.path.join(glob.escape(ckpt_dir), "*.pt")) if _step_of(p) is not None]
    return sorted(paths, key=_step_of)


def prune_checkpoints(ckpt_dir, keep):
    """Keep the newest `keep` step checkpoints (rank 0); keep <= 0 keeps all."""
    if _rank() != 0:
        return
    checkpoints.remove_leftovers(ckpt_dir)  # the run folder is locked: no other writer's temporary files
    for p in list_checkpoints(ckpt_dir)[:-keep] if keep is not None and keep > 0 else []:
        os.remove(p)


def _readable(path):
    """Whether a checkpoint file is a whole torch zip archive (a truncated one has no central directory)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def resolve_resume(resume, ckpt_dir):
    """'auto' -> the newest readable checkpoint in ckpt_dir (a corrupt newer one is skipped with a warning naming
    both), or None for a fresh start; a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        for i in range(len(found) - 1, -1, -1):
            if _readable(found[i]):
                if i < len(found) - 1:
                    warnings.warn(f"--resume auto: {', '.join(found[i + 1:])} cannot be read (truncated or corrupt); "
                                  f"resuming from the older {found[i]}")
                return found[i]
        if found:
            raise ValueError(f"--resume auto: no checkpoint in {ckpt_dir} can be read ({', '.join(found)})")
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file (use --resume auto to pick the newest "
                                f"in {ckpt_dir}, or omit --resume to start fresh)")
    return resume


def load_checkpoint(path, required=("model",)):
    """Load a checkpoint dict on CPU, with a clear error if it is unreadable or not one of ours."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        # weights_only: our checkpoints hold tensors and plain values only (RNG states included), so nothing in a
        # checkpoint file can run code when it is read.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, a file of another program ...
        raise ValueError(f"Could not read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"is the file complete?") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KeyError(f"{path} is not a training checkpoint of this stage: expected keys {list(required)}, found {have}")
    return ckpt


_LAST_SAVED = {}  # the newest checkpoint this run wrote or resumed: path, step, largest weight (for the NaN message)


def _record_saved(path, step, model):
    maxima = [v.detach().abs().max().float() for v in model.values()
              if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    _LAST_SAVED.update(path=path, step=step, max_abs=float(torch.stack([m.to(maxima[0].device) for m in maxima]).max())
                       if maxima else 0.0)  # one sync


def save_training_checkpoint(ckpt_dir, step, keep=0, logger=None, **state):
    """
    <ckpt_dir>/<step>.pt with `state` (state dicts, args, ...) plus the step and every rank's RNG states, written
    atomically by rank 0; only the newest `keep` are kept (0: all). Collective: every rank must call it.
    """
    raise_if_nonfinite()  # never write a state that a NaN/inf loss has reached
    state = dict(state, step=step, rng=rng_states())
    path = os.path.join(ckpt_dir, f"{step:07d}.pt")
    try:
        save_checkpoint(state, path)
    except OSError as e:  # a full disk while writing a new step file: what a resume can continue from
        older = [p for p in list_checkpoints(ckpt_dir) if p != path]
        if not older:
            raise
        raise OSError(e.errno, f"{e.strerror or e} The run's newest checkpoint, {older[-1]}, is intact: "
                      f"--resume auto continues from it.") from None
    _record_saved(path, step, state.get("model") or {})
    prune_checkpoints(ckpt_dir, keep)
    barrier()  # no rank runs ahead (and maybe dies) before the checkpoint is on disk
    if logger is not None:
        logger.info(f"Saved checkpoint to {path}")
    return path


def save_generator(exp, step, args, model, ema, opt, scaler, loader, **extra):
    """
    A stage-2 trainer's checkpoint (DiT's train.py layout plus what exact resume needs): model, EMA, optimiser,
    scaler, data position, args and `extra`, of which --keep-last are kept (a DiT-XL/2 one is ~10.8 GB); and beside
    it ema/<step>.pt, the EMA weights with what sampling needs (args, extra: ~2.7 GB for XL/2), kept for every
    checkpoint: what sample.py and convergence curves read, and what DiT's own find_model opens. Collective.
    """
    path = save_training_checkpoint(exp.ckpt_dir, step, args.keep_last, exp.logger,
                                    model=unwrap(model).state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                    scaler=scaler.state_dict(), loader=loader.state_dict(), args=vars(args), **extra)
    save_checkpoint(dict(ema=ema.state_dict(), args=vars(args), step=step, **extra),
                    os.path.join(exp.dir, "ema", f"{step:07d}.pt"))
    return path


def log_done(exp, what, step):
    """The last line of a generator run: what trained, where its checkpoints are, and how to sample from them."""
    if _rank() == 0:
        exp.logger.info(f"Done: {what} trained for {step:,} steps; checkpoints in {exp.ckpt_dir} (sample.py --ckpt "
                        f"{list_checkpoints(exp.ckpt_dir)[-1]} draws from it)")


def restore_training_state(ckpt, loader=None, **objects):
    """
    Resume in place: objects[name].load_state_dict(ckpt[name]) for every model, optimiser, scaler, EMA passed
    (None is skipped), then the data position. Returns the step. RNG states are restored separately
    (restore_rng_states), after any seeding the script does, so the resumed streams are the saved ones.
    """
    for name, obj in objects.items():
        if obj is not None:
            if ckpt.get(name) is None:
                raise KeyError(f"the checkpoint has no {name!r} state to resume from (keys: {sorted(ckpt)})")
            obj.load_state_dict(ckpt[name])
    if loader is not None:
        loader.load_state_dict(ckpt["loader"])
    return int(ckpt["step"])


def check_resume_args(saved_args, args, keys):
    """Refuse to resume a checkpoint made for another model/config; name the mismatching options."""
    saved = saved_args if isinstance(saved_args, dict) else vars(saved_args)

    def differ(k, a, b):  # a JSON dict of constructor arguments (--config '{...}'): the fields that differ
        try:
            a, b = json.loads(a), json.loads(b)
            return f"{k}: " + ", ".join(f"{f}: checkpoint {a.get(f)!r} vs now {b.get(f)!r}"
                                        for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f))
        except (TypeError, ValueError, AttributeError):
            return f"{k}: checkpoint {a!r} vs now {b!r}"
    diff = [differ(k, saved[k], getattr(args, k)) for k in keys if k in saved and saved[k] != getattr(args, k)]
    if diff:
        raise ValueError("Cannot resume: the checkpoint was made with different settings:\n  " + "\n  ".join(diff))


#################################################################################
#                       RNG States (exact resume across ranks)                  #
#################################################################################

def _local_rng_state():
    """This process's RNG states as tensors and plain Python values, so checkpoints open with
    torch.load(weights_only=True), as DiT's and REPA's own loading code does (numpy's state is an ndarray)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_states():
    """Every rank's RNG states as a list indexed by rank. Collective: call on all ranks."""
    local = _local_rng_state()
    if not is_distributed():
        return [local]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def restore_rng_states(states, logger=None):
    """Restore this rank's RNG states; with a different world size, re-seeding is all we can do (warn)."""
    world = dist.get_world_size() if is_distributed() else 1
    if states is None or len(states) != world:
        if logger:
            logger.warning(f"RNG states were saved for {None if states is None else len(states)} ranks, running "
                           f"{world}: the resumed run continues with fresh seeds (statistically equivalent).")
        return
    s = states[_rank()]
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


#################################################################################
#                               Models and EMA                                  #
#################################################################################

@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """ema = decay * ema + (1 - decay) * model for every parameter (DiT's update_ema), matched by name."""
    ema_params = dict(unwrap(ema_model).named_parameters())
    pairs = [(ema_params[name], param) for name, param in unwrap(model).named_parameters()]
    ema, params = [e for e, _ in pairs], [p.detach() for _, p in pairs]
    # DiT's loop runs mul_ and add_ per parameter: 2 x 292 kernel launches per DiT-XL/2 step. The foreach ops do
    # the same two operations on the whole list (a few multi-tensor kernels on CUDA, the same loop on CPU), so the
    # values are those of the loop, bit for bit.
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, params, alpha=1 - decay)


def adam_kwargs(device):
    """Extra Adam/AdamW options: fused=True on CUDA (one kernel for the whole update instead of a few per parameter;
    GradScaler unscales and skips inside it). On CPU nothing changes: the default implementation, so CPU results
    (and the tests that compare them) stay those of the plain optimiser."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def requires_grad(model, flag=True):
    for p in model.parameters():
        p.requires_grad = flag


def unwrap(model):
    """The plain module inside DDP and/or torch.compile wrappers (for state dicts and attribute access)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def timed(fn, device):
    """(seconds, output) of one call of fn, waiting for the GPU's queued work before and after (benchmarks)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def count_params(model):
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                       Training Meter: losses, speed, tqdm                     #
#################################################################################

class TrainingMeter:
    """
    Running means of a trainer's loss parts between log steps, kept on the device (no host-device sync per step),
    averaged over all processes at each log step and written as one metrics.jsonl row with the training speed
    (steps_per_sec, img_per_sec); a tqdm bar on rank 0 shows the progress and the latest values.

    meter = TrainingMeter(["loss", "mse"], exp, max_steps, start_step, images_per_step=args.global_batch_size)
    meter.update(loss=loss, mse=mse)            # every optimiser step (tensors stay on the device)
    if step % args.log_every == 0: meter.log(step, lr=lr)   # extra host values go into the row as they are
    """

    def __init__(self, names, exp, max_steps, step, images_per_step, device):
        self.names, self.exp, self.images_per_step = list(names), exp, images_per_step
        self.sums = torch.zeros(len(self.names), device=device)
        self.host = np.zeros(len(self.names), dtype=np.float32)
        self.count, self.start = 0, time.time()
        reset_finite_checks()  # a new run: the non-finite records of an earlier one in this process are not ours
        from tqdm import tqdm
        self.bar = tqdm(total=max_steps, initial=step, disable=_rank() != 0, dynamic_ncols=True)

    def update(self, **values):
        """One step's values: 0-dim tensors, summed where they live and never read back here, or host numbers."""
        for i, n in enumerate(self.names):
            v = values[n]
            if torch.is_tensor(v):
                self.sums[i] += v.detach().float().reshape(())
            else:
                self.host[i] += float(v)  # a host number never makes a (blocking) copy to the device
        self.count += 1
        self.bar.update(1)

    def log(self, step, **extra):
        """Average since the last log step over steps and processes, write the row, show it; returns the row.
        First stops the run if a loss went non-finite since the last check (raise_if_nonfinite)."""
        raise_if_nonfinite()
        sums = self.sums + torch.as_tensor(self.host, device=self.sums.device)
        avg = all_reduce_mean(sums / max(self.count, 1)).tolist()  # the one host-device sync per log step
        elapsed = max(time.time() - self.start, 1e-9)
        row = {n: round(v, 6) for n, v in zip(self.names, avg)}
        row.update(steps_per_sec=round(self.count / elapsed, 4),
                   img_per_sec=round(self.count * self.images_per_step / elapsed, 2), **extra)
        self.exp.metrics.write(step, **row)
        self.bar.set_postfix({n: f"{row[n]:.4g}" for n in self.names[:3]}, refresh=False)
        self.exp.logger.info(f"(step={step:07d}) " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                               for k, v in row.items()))
        self.sums.zero_()
        self.host[:] = 0
        self.count, self.start = 0, time.time()
        return row

    def close(self):
        """The end of the loop: the bar closes, and a non-finite loss since the last check still stops the run
        (before any export)."""
        self.bar.close()
        raise_if_nonfinite()


#################################################################################
#                         Resumable Distributed Data Loader                     #
#################################################################################

class _EpochSampler(Sampler):
    """
    DistributedSampler semantics (shuffle with seed + epoch, pad to a multiple of the world size, rank r takes
    every world-th index) that can start mid-epoch. It yields (epoch, index) pairs so the dataset wrapper can seed
    per-sample randomness from them.
    """

    def __init__(self, n, rank, world_size, seed, shuffle, drop_last_rank_batch, batch_size):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.batch_size = batch_size
        self.epoch, self.start = 0, 0
        per_rank = -(-n // world_size)  # ceil: pad like DistributedSampler(drop_last=False)
        self.per_rank = per_rank
        self.num_batches = per_rank // batch_size if drop_last_rank_batch else -(-per_rank // batch_size)

    def indices(self, epoch):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank gets the same count
        return order[self.rank::self.world]

    def __iter__(self):
        mine = self.indices(self.epoch)[self.start * self.batch_size:self.num_batches * self.batch_size]
        return iter([(self.epoch, i) for i in mine])

    def __len__(self):
        return (self.num_batches - self.start) * self.batch_size


class _SeededItems(Dataset):
    """
    Seeds the python/numpy/torch CPU RNGs from (seed, epoch, index) before fetching an item, so random crops and
    flips are a function of the sample alone: identical whether the epoch ran straight through or was resumed
    mid-way, and whatever the number of loader workers.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = (self.seed * 1_000_003 + epoch * 7_919_977 + index) % (2**31)
        # In the main process (num_workers=0) the training loop's own RNG streams must not be disturbed. Only the
        # CPU generator is seeded: torch.manual_seed would reseed every CUDA generator too (and the restore below
        # covers the CPU one), resetting the training loop's CUDA stream at every batch. Items draw on the CPU.
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(s)
        np.random.seed(s)
        torch.default_generator.manual_seed(s)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


class ResumableLoader:
    """
    An endless iterator over per-rank batches that records where it is (epoch, batch) for exact resume.

    loader = ResumableLoader(dataset, batch_size=per_rank_batch, seed=args.global_seed)
    batch = next(loader)                        # epochs roll over by themselves (set_epoch each time)
    ckpt["loader"] = loader.state_dict()        # -> {"epoch": e, "batch": b}
    loader.load_state_dict(ckpt["loader"])     # continues with the batch that was next
    """

    def __init__(self, dataset, batch_size, seed=0, num_workers=0, shuffle=True, drop_last=True, rank=None,
                 world_size=None, pin_memory=False):
        if len(dataset) == 0:
            raise ValueError("The dataset is empty: no images to train on.")
        self.rank = _rank() if rank is None else rank
        self.world = (dist.get_world_size() if is_distributed() else 1) if world_size is None else world_size
        self.sampler = _EpochSampler(len(dataset), self.rank, self.world, seed, shuffle, drop_last, batch_size)
        if self.sampler.num_batches == 0:
            raise ValueError(f"The dataset has {len(dataset)} images: too few for {self.world} rank(s) x batch "
                             f"{batch_size} with drop_last (need at least {self.world * batch_size}).")
        self.dataset = _SeededItems(dataset, seed)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.epoch, self.batch = 0, 0
        self._loader, self._it = None, None

    def __len__(self):
        """Batches per epoch on this rank."""
        return self.sampler.num_batches

    def _start_epoch(self):
        # The sampler runs in this process (workers only receive its (epoch, index) keys), so the epoch and start
        # set here reach the next iter() of the same DataLoader.
        self.sampler.epoch, self.sampler.start = self.epoch, self.batch
        if self._loader is None:
            # One DataLoader for the whole run with persistent workers: they (and the files, decoders and caches
            # they opened) live across epochs instead of being forked anew each epoch. Re-iterating it mid-epoch
            # (load_state_dict) drops the batches in flight. A private generator: otherwise DataLoader draws its
            # worker base seed from the global torch RNG, shifting the training loop's random stream (the items
            # themselves are seeded per sample by _SeededItems).
            self._loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                                      num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=True,
                                      generator=torch.Generator().manual_seed(self.sampler.seed),
                                      persistent_workers=self.num_workers > 0)
        self._it = iter(self._loader)

    def __iter__(self):
        return self

    def __next__(self):
        if self.batch >= self.sampler.num_batches:
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._start_epoch()
        out = next(self._it)
        self.batch += 1
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        self.epoch, self.batch, self._it = int(state["epoch"]), int(state["batch"]), None
