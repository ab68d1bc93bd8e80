"""
Stage 3: sample images from a trained or official class-conditional model, across GPUs, to a PNG grid and the
ADM-format .npz that the FID evaluators read (arr_0: uint8 (N, H, W, 3), exactly N images; arr_1: their labels),
named by --out; --save-png DIR also writes them as a folder of PNGs.

    torchrun --nproc_per_node=8 sample.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae sd-vae-ft-ema/ \
        --num-samples 50000 --cfg-scale 1.5
    python sample.py --preset tiny --ckpt results/001-DiT-T-2/checkpoints/0000200.pt

Each batch of images is a function of (seed, batch index) alone and is written as its own shard, so the result does
not depend on the number of processes and an interrupted run picks up the shards it already wrote.
Model families plug in as one function each (see SAMPLERS): DiT (ancestral DDPM or DDIM), SiT and SiT + REPA
(ODE or SDE; the family is read off the checkpoint) and MaskGIT (confidence-based parallel decoding). Options left
unset take each family's published evaluation settings.

    python sample.py --model SiT-XL/2 --ckpt SiT-XL-2-256.pt --vae sd-vae-ft-ema/               # dopri5 ODE, cfg 1.5
    python sample.py --model SiT-XL/2 --ckpt repa-4M.pt --vae sd-vae-ft-ema/ --cfg-scale 1.0    # REPA: SDE, 250 steps
    python sample.py --model maskgit-256 --ckpt MaskGIT_ImageNet_256.pth --vae pretrained_maskgit/VQGAN/
"""
import argparse
import hashlib
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoints
import data
import models
import train_utils as tu


#################################################################################
#                       Model Families: one function each                       #
#################################################################################

PRESETS = {
    # The model (and its autoencoder) come from the checkpoint.
    "tiny": dict(image_size=64, num_classes=10, num_samples=32, per_proc_batch_size=16),
}


def read_checkpoint(path, which):
    """
    (state dict, what the training run recorded) from an official file (a plain state dict; Maskgit-pytorch's
    {"model_state_dict"}), DiT's train.py checkpoint or this project's: `which` weights ("ema" or "model") and
    recorded = {"model", "vae", "vae_norm", "vqgan", "config", "args"} as far as the checkpoint holds them.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ckpt {path}: no such file")
    ckpt = checkpoints.torch_load(path)  # weights_only; DiT train.py's pickled args become an inert stub
    if not isinstance(ckpt, dict):
        raise ValueError(f"--ckpt {path} holds a {type(ckpt).__name__}, not a state dict or a checkpoint")
    if isinstance(ckpt.get("model_state_dict"), dict):  # Maskgit-pytorch's release
        return ckpt["model_state_dict"], {}
    if not isinstance(ckpt.get("model"), dict) and not isinstance(ckpt.get("ema"), dict):
        return ckpt, {}  # official release: the state dict itself
    if not isinstance(ckpt.get(which), dict):
        raise KeyError(f"{path} has no {which!r} weights (keys: {sorted(ckpt)}; an ema/ export holds only --weights ema)")
    recorded = {k: ckpt[k] for k in ("vae", "vae_norm", "vqgan", "config") if ckpt.get(k) is not None}
    recorded["step"] = ckpt.get("step")
    if isinstance(ckpt.get("args"), dict):
        recorded["args"] = ckpt["args"]
        recorded["model"] = ckpt["args"].get("model")
    return ckpt[which], recorded


def set_defaults(args, **defaults):
    """Fill the sampling options the user left unset with a family's published settings."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def setup_dit(args, vae, device, state_dict, recorded):
    """
    DiT: build the model, load the checkpoint, and return generate(labels (n,), generator) -> images (n, 3, H, W)
    in [-1, 1]: DiT's ancestral sampler over respaced steps with classifier-free guidance (or DDIM), then the VAE.
    """
    if "x_embedder.proj.weight" not in state_dict:
        raise ValueError(f"{args.ckpt} is not a DiT checkpoint (first keys: {sorted(state_dict)[:5]})")
    set_defaults(args, sampler="ddpm", num_sampling_steps=250, cfg_scale=1.5, guidance_low=0.0,
                 guidance_high=1.0)  # DiT's FID-50K protocol: guidance at every step
    if args.sampler not in ("ddpm", "ddim"):
        raise ValueError(f"--sampler for DiT: ddpm or ddim, got {args.sampler!r}")
    C, h, _ = vae.latent_shape(args.image_size)
    model = models.build(models.DiT_models, args.model, input_size=h, num_classes=args.num_classes,
                         in_channels=checkpoints.dit_config_from_state_dict(state_dict)["in_channels"])
    checkpoints.load_dit_weights(model, state_dict)  # a checkpoint of another config is an error saying which
    if model.in_channels != C:
        raise ValueError(f"{args.model} checkpoint takes {model.in_channels}-channel latents but the autoencoder "
                         f"gives {C} channels: pass the autoencoder the model was trained with (--vae)")
    model = model.to(device).eval()  # important: no label dropout
    diffusion = models.create_diffusion(str(args.num_sampling_steps))
    use_cfg = args.cfg_scale > 1.0

    @torch.no_grad()
    def generate(labels, generator):
        n = len(labels)
        z = torch.randn(n, C, h, h, generator=generator, device=device)
        if use_cfg:
            # Batch the conditional and the null-label ("unconditional") halves: one forward for both.
            z = torch.cat([z, z], 0)
            y = torch.cat([labels, torch.full_like(labels, args.num_classes)], 0)
            fn, kwargs = model.forward_with_cfg, dict(y=y, cfg_scale=args.cfg_scale,
                                                      cfg_all_channels=args.cfg_all_channels,
                                                      guidance_interval=(args.guidance_low, args.guidance_high))
        else:
            fn, kwargs = model.forward, dict(y=labels)
        loop = diffusion.ddim_sample_loop if args.sampler == "ddim" else diffusion.p_sample_loop
        with tu.autocast(args.precision, device):
            out = loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, device=device, generator=generator)
        if use_cfg:
            out, _ = out.chunk(2, dim=0)  # drop the null-label half
        return vae.decode(vae.unscale_latents(out.float()))  # latents are unscaled before decoding

    return generate


def setup_sit(args, vae, device, state_dict, recorded):
    """
    SiT or SiT + REPA (a checkpoint with projectors): integrate the learned velocity from noise to data, with the
    probability-flow ODE or the SDE, under each family's own clock (SiT: t = 1 is data; REPA: t = 0 is data).
    """
    if "x_embedder.proj.weight" not in state_dict:
        raise ValueError(f"{args.ckpt} is not a SiT / REPA checkpoint (first keys: {sorted(state_dict)[:5]})")
    targs = recorded.get("args", {})
    model = checkpoints.sit_from_state_dict(state_dict, encoder_depth=targs.get("encoder_depth")).to(device).eval()
    family = "repa" if model.z_dims else "sit"
    d = models.SAMPLER_DEFAULTS[family]
    set_defaults(args, mode=d["mode"], cfg_scale=d["cfg_scale"], guidance_low=d["guidance_low"],
                 guidance_high=d["guidance_high"])
    set_defaults(args, sampler=d["sampler"] if args.mode == "ode" else "euler-maruyama",
                 num_sampling_steps=d["ode_steps" if args.mode == "ode" else "sde_steps"])
    C, h, _ = vae.latent_shape(args.image_size)
    if (model.in_channels, model.x_embedder.num_patches) != (C, (h // model.patch_size) ** 2):
        raise ValueError(f"the {family.upper()} checkpoint takes {model.in_channels}-channel latents of another size "
                         f"than the autoencoder gives at {args.image_size} px ({C} x {h} x {h}): pass the autoencoder "
                         f"and --image-size the model was trained with")
    sampler = None if args.mode == "sde" else args.sampler
    cfg_channels = None if args.cfg_all_channels else "default"

    @torch.no_grad()
    def generate(labels, generator):
        z = torch.randn(len(labels), C, h, h, generator=generator, device=device)
        with tu.autocast(args.precision, device):
            x = models.sample_transport(
                model, z, labels, family=family, mode=args.mode, sampler=sampler, steps=args.num_sampling_steps,
                cfg_scale=args.cfg_scale, cfg_channels=cfg_channels, guidance_low=args.guidance_low,
                guidance_high=args.guidance_high, path_type=targs.get("path_type", "Linear"),
                prediction=targs.get("prediction", "velocity"), generator=generator)
        return vae.decode(vae.unscale_latents(x.float()))  # latents are unscaled before decoding

    return generate


def setup_maskgit(args, vae, device, state_dict, recorded):
    """
    MaskGIT: start from all [MASK] tokens and reveal the most confident ones over a few steps (MaskGIT Sec. 3.2),
    then decode the token grid with the VQ-GAN. --cfg-scale s is the guidance (1 + w) c - w u at its final weight,
    i.e. Maskgit-pytorch's w = s - 1 (w = 3 by default, ramped up over the steps).
    """
    if "tok_emb.weight" not in state_dict:
        raise ValueError(f"{args.ckpt} is not a MaskGIT checkpoint (first keys: {sorted(state_dict)[:5]})")
    config = recorded.get("config") or checkpoints.maskgit_config_from_state_dict(state_dict, args.num_classes)
    model = checkpoints.load_maskgit_weights(models.MaskTransformer(**config), state_dict, args.ckpt)
    model = model.to(device).eval()
    variant_defaults = {"pytorch": (8, 4.0), "jax": (12, 1.0)}  # (steps, cfg scale) of Maskgit-pytorch / MaskGIT
    set_defaults(args, sampler="pytorch")
    if args.sampler not in variant_defaults:
        raise ValueError(f"--sampler for MaskGIT: pytorch or jax, got {args.sampler!r}")
    set_defaults(args, num_sampling_steps=variant_defaults[args.sampler][0],
                 cfg_scale=variant_defaults[args.sampler][1])
    if not isinstance(vae, models.VQGAN):
        raise ValueError("MaskGIT decodes VQ-GAN tokens: --vae must be the VQ-GAN the model was trained on")
    grid = vae.latent_shape(args.image_size)[1]
    if (grid, vae.quantize.n_embed) != (model.input_size, model.codebook_size):
        raise ValueError(f"the MaskGIT checkpoint expects {model.input_size} x {model.input_size} tokens of "
                         f"{model.codebook_size} codes; the VQ-GAN gives {grid} x {grid} of {vae.quantize.n_embed}")

    @torch.no_grad()
    def generate(labels, generator):
        with tu.autocast(args.precision, device):
            tokens = models.maskgit_sample(model, labels, variant=args.sampler, steps=args.num_sampling_steps,
                                           cfg_w=args.cfg_scale - 1.0, generator=generator)
        return vae.decode_indices(tokens)  # (n, 3, H, W) in [-1, 1]

    return generate


# Model families by name prefix: (setup function, the table of valid names in models.py). A setup function takes
# (args, autoencoder, device), fills the sampling options left unset, and returns generate(labels, generator) ->
# images in [-1, 1].
SAMPLERS = {"DiT-": (setup_dit, "DiT_models"), "SiT-": (setup_sit, "SiT_models"),
            "maskgit": (setup_maskgit, "MaskGIT_models")}


def family_of(name):
    """The setup function for a model name; unknown names list every valid one."""
    valid = [n for _, table in SAMPLERS.values() for n in getattr(models, table, {})]
    for prefix, (setup, table) in SAMPLERS.items():
        if name.lower().startswith(prefix.lower()) and name in getattr(models, table, {}):
            return setup
    raise ValueError(f"unknown --model {name!r}; valid: {', '.join(valid)}")


#################################################################################
#                                  Sampling Loop                                #
#################################################################################

def batch_labels(args, start, n, generator, device):
    """Labels of images start .. start + n - 1: cycled from --class-labels, or uniform over the classes."""
    if args.class_labels:
        given = [int(c) for c in args.class_labels.split(",")]
        return torch.tensor([given[i % len(given)] for i in range(start, start + n)], device=device)
    return torch.randint(0, args.num_classes, (n,), generator=generator, device=device)


def batch_count(args, b):
    """Number of images in batch b (the last one may be short)."""
    return min(args.per_proc_batch_size, args.num_samples - b * args.per_proc_batch_size)


def shard_done(out_dir, b, n, recipe):
    """Whether batch b's shard exists and was drawn by this very recipe (checkpoint, autoencoder, every sampling
    option); one of another size or recipe is an error (a shard is reused only when it is the one this run draws)."""
    path = os.path.join(out_dir, f"{b:06d}.npz")
    if not os.path.exists(path):
        return False
    try:
        with np.load(path) as f:
            found, made_by = len(f["arr_1"]), json.loads(str(f["recipe"])) if "recipe" in f.files else None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable sample shard ({type(e).__name__}: {e}); delete it") from None
    if made_by != recipe:
        diff = [k for k in sorted(set(recipe) | set(made_by or {})) if (made_by or {}).get(k) != recipe.get(k)]
        raise ValueError(f"{path} was drawn with other settings ({', '.join(diff)} differ): use another "
                         f"--sample-dir or delete the folder")
    if found != n:
        raise ValueError(f"{path} holds {found} images, this run expects {n}: it was written with another "
                         f"--per-proc-batch-size or --num-samples; use another --sample-dir or delete the folder")
    return True


def autoencoder_path(args, recorded):
    """--vae; else the autoencoder the training run recorded (its path, a MaskGIT run's VQ-GAN); else the random
    tiny one a pipeline-check run saved in its folder."""
    if args.vae:
        return args.vae
    for key in ("vae", "vqgan"):
        if recorded.get(key):
            if not os.path.exists(recorded[key]):
                raise FileNotFoundError(f"{args.ckpt} was trained on the autoencoder {recorded[key]}, which is not "
                                        f"there any more: pass it with --vae")
            return recorded[key]
    exp_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))
    found = sorted(f for f in os.listdir(exp_dir) if f.startswith(("vae-", "vqgan-"))) if os.path.isdir(exp_dir) else []
    if not found:
        raise ValueError(f"{args.ckpt} does not record its autoencoder (official checkpoints never do): pass the one "
                         f"the model was trained with, --vae PATH")
    return os.path.join(exp_dir, found[0])


@torch.no_grad()
def main(args):
    """Samples args.num_samples images split across ranks; writes shards, then one .npz and a PNG grid."""
    dist = tu.setup_distributed()
    device = dist.device
    args.precision = tu.resolve_precision(args.precision, device)
    logger = tu.create_logger(None)
    if args.class_labels and any(not 0 <= int(c) < args.num_classes for c in args.class_labels.split(",")):
        raise ValueError(f"--class-labels must lie in [0, {args.num_classes})")

    # The model: its weights, and the family and autoencoder its training run recorded (official files record none).
    state_dict, recorded = read_checkpoint(args.ckpt, args.weights)
    if args.model is None:
        if not recorded.get("model"):
            raise ValueError(f"{args.ckpt} does not record which model it holds (official checkpoints do not): pass "
                             f"--model, e.g. --model DiT-XL/2")
        args.model = recorded["model"]
    elif recorded.get("model") and recorded["model"] != args.model:
        raise ValueError(f"--model {args.model}, but {args.ckpt} was trained as {recorded['model']}: leave --model out "
                         f"(the checkpoint says it), or pass the checkpoint you meant")
    setup = family_of(args.model)  # unknown names fail before the autoencoder is loaded

    # Autoencoder: the one the model was trained on, normalising latents as in training unless told otherwise.
    vae_path = autoencoder_path(args, recorded)
    overrides = {k: v for k, v in (("scaling_factor", args.scaling_factor), ("shift_factor", args.shift_factor))
                 if v is not None}
    trained = recorded.get("vae_norm")  # the normalisation the model was trained with (KL autoencoders)
    factors = {k: trained[k] for k in ("scaling_factor", "shift_factor")} if trained else {}
    vae = checkpoints.load_autoencoder(vae_path, log=logger.info, **dict(factors, **overrides)).to(device)
    if trained:
        vae.config.update(latents_mean=trained["latents_mean"], latents_std=trained["latents_std"])
        if overrides and vae.latent_norm() != trained:  # an option not given keeps the trained value
            logger.info(f"Latent normalisation {vae.latent_norm()} (--scaling-factor / --shift-factor), not the "
                        f"{trained} the model was trained with")
        else:
            logger.info(f"Latent normalisation as the model was trained: {trained}")
    logger.info(f"Autoencoder: {vae_path}")
    tu.check_resolution(args.image_size, vae)
    generate = setup(args, vae, device, state_dict, recorded)
    del state_dict

    # Output folder: one shard per batch, named by batch index; a shard is reused only by a run of the same recipe.
    recipe = {"ckpt": os.path.abspath(args.ckpt), "ckpt_bytes": os.path.getsize(args.ckpt),
              "ckpt_mtime_ns": os.stat(args.ckpt).st_mtime_ns, "vae": os.path.abspath(vae_path),
              "vae_sha256": data.vae_fingerprint(vae), "latent_norm": getattr(vae, "latent_norm", dict)(),
              **{k: getattr(args, k) for k in ("model", "weights", "image_size", "num_classes", "class_labels",
                                               "cfg_scale", "cfg_all_channels", "sampler", "mode",
                                               "num_sampling_steps", "guidance_low", "guidance_high", "global_seed",
                                               "precision", "per_proc_batch_size")}}
    ckpt_name = os.path.splitext(os.path.basename(args.ckpt))[0]
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    name = (f"{args.model.replace('/', '-')}-{ckpt_name}-{args.weights}-size-{args.image_size}-cfg-{args.cfg_scale}-"
            f"{args.sampler}{args.num_sampling_steps}-seed-{args.global_seed}-{digest}")
    out_dir = os.path.join(args.sample_dir, name)
    if dist.is_main:
        os.makedirs(out_dir, exist_ok=True)
    tu.barrier()
    n_batches = math.ceil(args.num_samples / args.per_proc_batch_size)
    mine = [b for b in range(n_batches) if b % dist.world_size == dist.rank]
    todo = [b for b in mine if not shard_done(out_dir, b, batch_count(args, b), recipe)]
    logger.info(f"Sampling {args.num_samples} images into {out_dir}: {n_batches} batches, {len(mine) - len(todo)} of "
                f"rank 0's {len(mine)} already done")
    for b in (tqdm(todo) if dist.is_main else todo):
        start, n = b * args.per_proc_batch_size, batch_count(args, b)
        # Every random number of this batch comes from a generator seeded by (seed, batch index).
        generator = torch.Generator(device).manual_seed(args.global_seed * 1_000_003 + b)
        labels = batch_labels(args, start, n, generator, device)
        images = generate(labels, generator)                                  # (n, 3, H, W) in [-1, 1]
        arr = data.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()          # (n, H, W, 3) uint8 (ADM layout)
        data.save_npz(os.path.join(out_dir, f"{b:06d}.npz"), arr, arr_1=labels.cpu().numpy(),
                      recipe=np.array(json.dumps(recipe)))  # atomic; the recipe says which run may reuse it
    if args.save_png:
        # The same images as a folder (000000.png, ...), the input pytorch-fid, clean-fid and torch-fidelity take;
        # each rank writes its own batches, from the shards, so a rerun also fills in ones sampled before.
        os.makedirs(args.save_png, exist_ok=True)
        for b in mine:
            for i, im in enumerate(np.load(os.path.join(out_dir, f"{b:06d}.npz"))["arr_0"]):
                Image.fromarray(im).save(os.path.join(args.save_png, f"{b * args.per_proc_batch_size + i:06d}.png"))
    tu.barrier()

    # Gather the shards into one .npz with exactly num_samples images, and a grid of the first ones:
    if dist.is_main:
        missing = [b for b in range(n_batches) if not shard_done(out_dir, b, batch_count(args, b), recipe)]
        if missing:  # every rank wrote its batches: a folder rank 0 cannot see them in is not shared by all nodes
            raise FileNotFoundError(f"{out_dir}: {len(missing)} of {n_batches} sample batches that other ranks wrote "
                                    f"are not visible to rank 0 (first: {missing[:3]}); with several nodes, "
                                    f"--sample-dir must be a folder every node shares")
        shards = [np.load(os.path.join(out_dir, f"{b:06d}.npz")) for b in range(n_batches)]
        images = np.concatenate([s["arr_0"] for s in shards])[: args.num_samples]
        labels = np.concatenate([s["arr_1"] for s in shards])[: args.num_samples]
        assert images.shape == (args.num_samples, args.image_size, args.image_size, 3), images.shape
        npz_path = args.out or f"{out_dir}.npz"
        os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
        data.save_npz(npz_path, images, arr_1=labels)
        grid = torch.from_numpy(images[: args.grid_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        grid_path = os.path.splitext(npz_path)[0] + ".png"
        data.save_image_grid(grid, grid_path, nrow=int(math.ceil(math.sqrt(len(grid)))))
        logger.info(f"Done: {npz_path} [arr_0 {images.shape} uint8, arr_1 labels] and the grid {grid_path}"
                    + (f"; PNGs in {args.save_png}/" if args.save_png else ""))
    tu.barrier()
    return out_dir


def get_args(argv=None):
    """Command-line options; the defaults are DiT's FID-50K protocol (sample_ddp.py): 250 ancestral steps, cfg 1.5,
    50,000 samples; unset sampling options take each family's published settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=str, choices=sorted(PRESETS), default=None, help=tu.describe_presets(PRESETS))
    parser.add_argument("--model", type=str, default=None, help="DiT-XL/2, SiT-XL/2, maskgit-256, ... (default: "
                        "what the checkpoint records; official checkpoints need it)")
    parser.add_argument("--ckpt", type=str, required=True, help="official weights or a train_dit.py checkpoint")
    parser.add_argument("--weights", type=str, choices=["ema", "model"], default="ema",
                        help="which weights of a training checkpoint (official files hold one set)")
    parser.add_argument("--vae", type=str, default=None,
                        help="autoencoder the model was trained on (default: the one the checkpoint records); a "
                             "path, a Hugging Face ID, or DiT's ema / mse (stabilityai/sd-vae-ft-ema / -mse)")
    tu.add_latent_norm_args(parser)
    parser.add_argument("--image-size", type=int, default=256, help="the resolution the model was trained at")
    parser.add_argument("--num-classes", type=int, default=1000, help="class labels of the model (ImageNet: 1000)")
    parser.add_argument("--num-samples", "--num-fid-samples", dest="num_samples", type=tu.positive_int,
                        default=50_000, help="images to draw (FID: 50K; --num-fid-samples: DiT's sample_ddp.py name)")
    parser.add_argument("--per-proc-batch-size", type=tu.positive_int, default=32, help="images per GPU and batch")
    parser.add_argument("--class-labels", type=str, default=None, help="e.g. 207,360,387 (cycled); default uniform")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="1.0 disables classifier-free guidance (default: DiT 1.5, SiT 1.5, REPA 1.8, MaskGIT 4)")
    parser.add_argument("--cfg-all-channels", action="store_true",
                        help="DiT/SiT: guide all latent channels (their official code guides the first three)")
    parser.add_argument("--sampler", type=str, default=None,
                        help="DiT: ddpm (default) | ddim; SiT ODE: dopri5 (default) | heun | euler (REPA: euler); "
                             "MaskGIT: pytorch (default) | jax")
    parser.add_argument("--mode", type=str, choices=["ode", "sde"], default=None,
                        help="SiT/REPA: probability-flow ODE (SiT's default) or SDE (REPA's default)")
    parser.add_argument("--num-sampling-steps", type=int, default=None,
                        help="default: DiT 250, SiT SDE 250, REPA SDE 250, MaskGIT 8 (jax 12)")
    parser.add_argument("--guidance-low", type=float, default=None,
                        help="guide only for t >= this (t in [0, 1], 0 = data; DiT: t = timestep / 1000)")
    parser.add_argument("--guidance-high", type=float, default=None,
                        help="guide only for t <= this (REPA's guidance interval: 0.7; default 1: every step)")
    parser.add_argument("--global-seed", type=int, default=0, help="batch b is drawn from seed * 1000003 + b")
    parser.add_argument("--precision", type=str, choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast for the model (the reference samples in fp32/TF32)")
    parser.add_argument("--sample-dir", type=str, default="samples", help="shards go to SAMPLE_DIR/<run name>/")
    parser.add_argument("--out", type=str, default=None, help="the .npz to write (default: SAMPLE_DIR/<run name>.npz)")
    parser.add_argument("--save-png", type=str, default=None, metavar="DIR",
                        help="also write the images as DIR/000000.png, ... (pytorch-fid, clean-fid, torch-fidelity)")
    parser.add_argument("--grid-size", type=int, default=64, help="images in the PNG grid")
    return tu.apply_preset(parser.parse_args(argv), parser, PRESETS, argv)


if __name__ == "__main__":
    tu.run_main(main, get_args())
