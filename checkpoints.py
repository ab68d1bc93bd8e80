"""
Every checkpoint format the pipeline reads or writes, in one file, read top to bottom:

  1. files: atomic writes, a safe torch.load for Lightning checkpoints, the weight lookup (local path / hub cache)
     and the checked state-dict loader whose errors name the keys;
  2. KL autoencoders: LDM <-> diffusers names, load_autoencoder (diffusers folders, LDM / diffusers / taming files,
     this project's checkpoints), save_diffusers, save_ldm;
  3. the taming VQ-GAN: shapes -> config, save_taming;
  4. pretrained networks: LPIPS, DiT / SiT / REPA, DINOv2, MaskGIT-pytorch;
  5. a command line:
       python checkpoints.py inspect PATH                       # format, architecture, parameters, scaling
       python checkpoints.py convert IN OUT --to diffusers|ldm|taming

models.py builds the networks; this file only maps their parameters to and from files.
"""
import argparse
import json
import os
import pickle
import re
import shutil
import sys
import warnings

import torch

import models


#################################################################################
#                Files: Atomic Writes, Safe Loading, Weight Lookup              #
#################################################################################

def _fsync_dir(folder):
    """Make a rename in `folder` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """
    write(tmp_path) to a temporary file beside `path`, fsync it, then rename it over `path`: a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one. A failed write (a full disk) removes the
    temporary file and raises an OSError that names `path` and says the previous file is intact.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] ... unexpected pos".
        full = isinstance(e, OSError) and e.errno == 28 or "unexpected pos" in str(e) or "No space" in str(e)
        why = "the disk is full" if full else f"{type(e).__name__}: {e}"
        prev = "the previous file is intact" if os.path.exists(path) else "nothing was written"
        raise OSError(getattr(e, "errno", None), f"could not write {path}: {why}; {prev}. Free some space "
                      f"(or write elsewhere) and run again.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)
    return path


def atomic_folder(folder, write):
    """write(tmp_folder) into a fresh sibling folder, then swap it in for `folder` (two renames): a kill leaves the
    old folder or the new one, never a mix of both (a diffusers export is config.json + weights)."""
    folder = os.path.abspath(folder)
    tmp, old = f"{folder}.tmp.{os.getpid()}", f"{folder}.old.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        for name in os.listdir(tmp):  # on disk before the swap, as atomic_write's fsync
            with open(os.path.join(tmp, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(folder):
            os.replace(folder, old)  # a kill from here to the next rename: remove_leftovers completes the swap
        os.replace(tmp, folder)
    except (OSError, RuntimeError) as e:
        if not os.path.exists(folder) and os.path.exists(old):
            os.replace(old, folder)
        raise OSError(getattr(e, "errno", None), f"could not write {folder}: {type(e).__name__}: {e}; "
                      f"{'the previous folder is intact' if os.path.exists(folder) else 'nothing was written'}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(os.path.dirname(folder))
    return folder


def remove_leftovers(folder):
    """
    Clean up after writes killed midway in `folder` (a run calls it on its locked run folder, so no live writer
    owns them): atomic_write's <name>.tmp.<pid> files are removed (their targets are intact); of atomic_folder's
    swap, <name>.tmp.<pid> is a complete new folder once <name>.old.<pid> exists (the kill came between the two
    renames), so the swap is completed; otherwise the old folder is put back. Returns the paths removed.
    """
    leftover = re.compile(r"(.+)\.(tmp|old)\.(\d+)$")
    removed = []
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in names:
        m = leftover.match(name)
        path = os.path.join(folder, name)
        if not m or not os.path.exists(path):
            continue
        target, kind, pid = os.path.join(folder, m.group(1)), m.group(2), m.group(3)
        if os.path.isdir(path) and not os.path.exists(target):
            old, new = f"{target}.old.{pid}", f"{target}.tmp.{pid}"
            if os.path.isdir(old) and os.path.isdir(new):
                os.replace(new, target)  # the new export was complete: finish the swap
                shutil.rmtree(old)
                removed.append(old)
            elif kind == "old":
                os.replace(old, target)  # put the previous export back
            else:
                shutil.rmtree(path)
                removed.append(path)
            continue
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    if removed:
        warnings.warn(f"removed what writes killed midway left behind: {', '.join(removed)}")
    return removed


class _PickleStub:
    """Inert stand-in for a class a checkpoint pickled next to its weights (Lightning callbacks, argparse args)."""
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _stub_named(full_name):
    """A _PickleStub subclass that the safe unpickler finds under `full_name` ("module.Class"): it keys allow-listed
    classes by f"{__module__}.{__qualname__}" (torch 2.5; __name__ in older ones), so a class carrying the refused
    name stands in for it. (The (class, "full.name") tuple form of safe_globals is newer than torch 2.5.)"""
    module, _, name = full_name.rpartition(".")
    return type(name, (_PickleStub,), {"__module__": module, "__qualname__": name})


def _full_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def torch_load(path):
    """torch.load with weights_only=True, tolerating the Python objects that LDM's Lightning checkpoints pickle:
    instead of unpickling arbitrary code (which would also need Lightning installed) each class the safe
    unpickler refuses is allow-listed as an inert stub, and the load retried."""
    stubs = []
    while True:
        try:
            # torch >= 2.5: the safe_globals context manager, and allow-listed classes may be rebuilt (NEWOBJ/BUILD),
            # which pickled Lightning callbacks need; requirements.txt asks for it.
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            if m is None or len(stubs) >= 64 or any(_full_name(s) == m.group(1) for s in stubs):
                raise ValueError(f"{path!r}: cannot read this checkpoint safely ({e})") from None
            stubs.append(_stub_named(m.group(1)))
        except (RuntimeError, EOFError) as e:  # truncated zip, not a torch file at all
            raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({e})") from None


def find_weights(filename, url, path=None, flag=None):
    """Local path of a weight file: `path` if given, else torch hub's cache, downloading there when online.
    flag: the command-line option that supplies the path, named in the error when the file is missing."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weight file {path!r} does not exist (expected {filename}, from {url})")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, cached, progress=False)
    except Exception as e:  # offline, proxy, HTTP error: say exactly what to fetch and where it goes
        how = f"pass its path with {flag}" if flag else "pass its path explicitly"
        raise FileNotFoundError(
            f"{filename} is not in torch hub's cache and could not be downloaded ({type(e).__name__}: {e}). "
            f"Download {url} and put it at {cached}, or {how}.") from None
    return cached


# The tiny base autoencoders this project trained itself (the commands that made them: assets/README.md): what the
# tiny presets fine-tune and train their generators on, so the CPU-sized runs show the method on a trained model.
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TINY_BASE = {"kl": os.path.join(ASSETS, "tiny-kl-f8.safetensors"), "vq": os.path.join(ASSETS, "tiny-vq-f8.safetensors")}

# DiT's sample.py / train.py names for the SD-VAE fine-tunes it trains on (--vae ema | mse).
HUB_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def resolve_hub(spec, flag="--vae"):
    """
    A local path for a Hugging Face model ID ("zelaki/eq-vae", or DiT's aliases ema / mse): its snapshot in the local
    Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub: models--org--name/snapshots/<rev>,
    the revision refs/main names), else a download by huggingface_hub when it is installed and a network answers
    (optional: never required). A spec that exists on disk, or has no org/name form, is returned as it is.
    """
    if os.path.exists(spec):
        return spec
    spec = HUB_ALIASES.get(spec, spec)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return spec
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    repo = os.path.join(cache, "models--" + spec.replace("/", "--"))
    ref = os.path.join(repo, "refs", "main")
    snapshots = os.path.join(repo, "snapshots")
    if os.path.isfile(ref):
        with open(ref) as f:
            rev = f.read().strip()
        if os.path.isdir(os.path.join(snapshots, rev)):
            return os.path.join(snapshots, rev)
    if os.path.isdir(snapshots) and os.listdir(snapshots):
        return os.path.join(snapshots, sorted(os.listdir(snapshots))[-1])
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(spec)
    except Exception as e:  # not installed, offline, no such repo
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if not isinstance(e, ImportError) else \
            "huggingface_hub is not installed"
        raise FileNotFoundError(f"{flag} {spec}: not in the Hugging Face cache ({repo}) and not downloadable here "
                                f"({why}). Download it where a network is (huggingface-cli download {spec}) and copy "
                                f"the cache folder there, or pass a local folder: {flag} /path/to/{spec.split('/')[1]}") \
            from None


class CheckpointMismatchError(KeyError, ValueError):
    """A state dict that does not fit the model built for it (a KeyError for the keys, a ValueError for shapes)."""
    def __str__(self):
        return str(self.args[0])  # KeyError would print the message in quotes


def load_state_dict_checked(model, sd, source, describe=None):
    """
    model.load_state_dict(sd, strict=True) with an error that names the first missing and unexpected keys and the
    first shape mismatch. describe: optional fn(state_dict) -> str naming the config a state dict was made for
    (e.g. "DiT-XL/2"), so a checkpoint of another config says which one it is.
    """
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        msg = []
        if describe is not None:
            try:
                msg.append(f"checkpoint is {describe(sd)}, model is {describe(own)}")
            except (KeyError, ValueError, IndexError):
                pass  # too far off to describe: the keys below say enough
        if missing or unexpected:
            msg.append(f"{len(missing)} missing keys (first 5: {missing[:5]}), "
                       f"{len(unexpected)} unexpected keys (first 5: {unexpected[:5]})")
        if wrong:
            k = wrong[0]
            msg.append(f"{len(wrong)} shape mismatches, first {k}: shape {tuple(sd[k].shape)} in the checkpoint "
                       f"vs {tuple(own[k].shape)} in the model")
        raise CheckpointMismatchError(f"{source}: state dict does not fit the {type(model).__name__} built for it: "
                                      + "; ".join(msg))
    model.load_state_dict(sd, strict=True)
    return model


def _export_state_dict(model):
    """The model's tensors, detached, contiguous, on the CPU (safetensors refuses shared or strided storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


#################################################################################
#            KL Autoencoders: LDM <-> diffusers Names, Load and Export          #
#################################################################################
# LDM names are models.py's names (FLUX's ae.safetensors and SD3's first_stage_model.* use them too). diffusers'
# AutoencoderKL stores the same tensors under other names (L = len(ch_mult) levels):
#   encoder.down.{i}.block.{j}          <-> encoder.down_blocks.{i}.resnets.{j}      (nin_shortcut <-> conv_shortcut)
#   encoder.down.{i}.attn.{j}           <-> encoder.down_blocks.{i}.attentions.{j}   (AttnDownEncoderBlock2D: kl-f16)
#   encoder.down.{i}.downsample.conv    <-> encoder.down_blocks.{i}.downsamplers.0.conv
#   decoder.up.{i}.block / .attn.{j}    <-> decoder.up_blocks.{L-1-i}.resnets / .attentions.{j} (counted coarse -> fine)
#   decoder.up.{i}.upsample.conv        <-> decoder.up_blocks.{L-1-i}.upsamplers.0.conv
#   *.mid.block_{1,2}                   <-> *.mid_block.resnets.{0,1}
#   *.mid.attn_1                        <-> *.mid_block.attentions.0
#   attention {norm,q,k,v,proj_out}     <-> {group_norm,to_q,to_k,to_v,to_out.0}
#                                           (1x1 conv [C, C, 1, 1] <-> Linear [C, C]; older files: query/key/value/proj_attn)
#   *.norm_out                          <-> *.conv_norm_out
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
_ATTN_OLD_DIFFUSERS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Weight files of a diffusers folder, in the order diffusers' from_pretrained looks for them (a sharded index first),
# full precision before the fp16 variant (which is read and cast to float32).
_DIFFUSERS_WEIGHTS = tuple(f"diffusion_pytorch_model{v}.{ext}" for v in ("", ".fp16")
                           for ext in ("safetensors.index.json", "safetensors", "bin.index.json", "bin")) + (
    "diffusion_pytorch_model.safetensors.index.fp16.json", "diffusion_pytorch_model.bin.index.fp16.json")
# diffusers AutoencoderKL config fields that change nothing the network computes (pipelines and tiling read them).
_DIFFUSERS_INERT = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "force_upcast",
                    "sample_size"}


def _attn_name(prefix, layer, param, to_diffusers):
    layer = _ATTN_OLD_DIFFUSERS.get(layer, layer)
    table = _ATTN_LDM_TO_DIFFUSERS if to_diffusers else _ATTN_DIFFUSERS_TO_LDM
    return f"{prefix}.{table[layer]}.{param}" if layer in table else None


def ldm_to_diffusers_name(name, num_levels):
    """LDM parameter name -> diffusers AutoencoderKL name (num_levels = len(ch_mult))."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample|attn)\.(.*)", name)
    if m:
        part, updown, i, kind, rest = m.groups()
        i = int(i) if part == "encoder" else num_levels - 1 - int(i)  # decoder levels are reversed
        if kind in ("downsample", "upsample"):
            return f"{part}.{updown}_blocks.{i}.{kind}rs.0.{rest}"
        j, rest = rest.split(".", 1)
        if kind == "block":
            return f"{part}.{updown}_blocks.{i}.resnets.{j}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
        return _attn_name(f"{part}.{updown}_blocks.{i}.attentions.{j}", *rest.rsplit(".", 1), True) or name
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", name)
    if m:
        part, sub, rest = m.groups()
        if sub == "attn_1":
            return _attn_name(f"{part}.mid_block.attentions.0", *rest.rsplit(".", 1), True) or name
        return f"{part}.mid_block.resnets.{int(sub[-1]) - 1}.{rest}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", name)


def diffusers_to_ldm_name(name, num_levels):
    """diffusers AutoencoderKL name (current or older attention names) -> LDM parameter name (unmapped: as is, so
    the loader reports it as an unexpected key)."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
                     r"\.(.*)", name)
    if m:
        part, updown, i, kind, j, rest = m.groups()
        i = int(i) if part == "encoder" else num_levels - 1 - int(i)
        if kind == "resnets":
            return f"{part}.{updown}.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        if kind == "attentions":
            return _attn_name(f"{part}.{updown}.{i}.attn.{j}", *rest.rsplit(".", 1), False) or name
        return f"{part}.{updown}.{i}.{updown}sample.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.[01]|attentions\.0)\.(.*)", name)
    if m:
        part, sub, rest = m.groups()
        if sub.startswith("resnets"):
            return f"{part}.mid.block_{int(sub[-1]) + 1}.{rest}"
        return _attn_name(f"{part}.mid.attn_1", *rest.rsplit(".", 1), False) or name
    return re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)


_LDM_ATTN_WEIGHT = re.compile(r"\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$")


def _diffusers_to_ldm_state_dict(sd):
    """Rename a diffusers state dict to LDM names; attention Linear [C, C] weights become 1x1 convs [C, C, 1, 1]."""
    num_levels = 1 + max(int(m.group(2)) for k in sd if (m := re.match(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        name = diffusers_to_ldm_name(k, num_levels)
        out[name] = v[:, :, None, None] if _LDM_ATTN_WEIGHT.search(name) and v.ndim == 2 else v
    return out


def _ldm_to_diffusers_state_dict(sd, num_levels):
    """Rename an LDM state dict to diffusers names; attention 1x1 conv weights become Linear [C, C]."""
    return {ldm_to_diffusers_name(k, num_levels): v[:, :, 0, 0] if _LDM_ATTN_WEIGHT.search(k) else v
            for k, v in sd.items()}


def _config_from_diffusers(cfg, source):
    """Our KLVAE config from a diffusers AutoencoderKL config.json; a field that would make KLVAE compute something
    else than diffusers (or that we do not know) is an error naming it."""
    L = len(cfg["block_out_channels"])
    kinds = {"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
             "up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")}
    known = _DIFFUSERS_INERT | set(kinds) | {"in_channels", "out_channels", "block_out_channels", "layers_per_block",
                                             "act_fn", "latent_channels", "norm_num_groups", "scaling_factor",
                                             "shift_factor", "latents_mean", "latents_std", "use_quant_conv",
                                             "use_post_quant_conv", "mid_block_add_attention"}
    problems = [f"unknown field {k}={v!r}" for k, v in cfg.items() if k not in known]
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        problems.append(f"_class_name={cfg['_class_name']!r} (KLVAE is diffusers' AutoencoderKL)")
    if cfg.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={cfg['act_fn']!r}")
    if cfg.get("mid_block_add_attention", True) is False:
        problems.append("mid_block_add_attention=False")
    if cfg.get("use_quant_conv", True) != cfg.get("use_post_quant_conv", True):
        problems.append(f"use_quant_conv={cfg.get('use_quant_conv')} with use_post_quant_conv="
                        f"{cfg.get('use_post_quant_conv')} (KLVAE has both or neither)")
    attn = {}
    for key, (plain, with_attn) in kinds.items():
        types = cfg.get(key, [plain] * L)
        if len(types) != L or any(t not in (plain, with_attn) for t in types):
            problems.append(f"{key}={types}")
            continue
        # up_block_types counts from the coarsest level: level i is entry L-1-i
        attn[key] = [t == with_attn for t in (types if key == "down_block_types" else types[::-1])]
    if not problems and attn["down_block_types"] != attn["up_block_types"]:
        problems.append("attention in encoder and decoder at different levels")
    if problems:
        raise ValueError(f"{source}: this diffusers autoencoder is not a layout KLVAE builds ({'; '.join(problems)}); "
                         f"KLVAE reads SD-VAE, SDXL-VAE, SD3 / FLUX VAEs and LDM kl-f* autoencoders")
    widths = list(cfg["block_out_channels"])
    if any(w % widths[0] for w in widths):
        raise ValueError(f"{source}: block_out_channels {widths} are not multiples of the first width")
    resolution = cfg.get("sample_size", 256)
    resolution = resolution[0] if isinstance(resolution, (list, tuple)) else resolution
    latent = cfg.get("latent_channels", 4)
    return dict(ch=widths[0], ch_mult=[w // widths[0] for w in widths], num_res_blocks=cfg.get("layers_per_block", 1),
                attn_resolutions=[resolution // 2 ** i for i, a in enumerate(attn["down_block_types"]) if a],
                z_channels=latent, embed_dim=latent, in_channels=cfg.get("in_channels", 3),
                out_ch=cfg.get("out_channels", 3), resolution=resolution, norm_num_groups=cfg.get("norm_num_groups", 32),
                use_quant_conv=cfg.get("use_quant_conv", True), scaling_factor=cfg.get("scaling_factor", 0.18215),
                shift_factor=cfg.get("shift_factor") or 0.0, latents_mean=cfg.get("latents_mean"),
                latents_std=cfg.get("latents_std"))


# The latent normalisation a weights-only file cannot tell (the weights of SD-VAE and SDXL-VAE, or of SD3's and
# FLUX's VAEs, have the same shapes): recognised from a whole pipeline checkpoint's other keys or the file's name.
_FAMILY_HINTS = [  # (family, keys of a whole checkpoint, words in the file name)
    ("sdxl-vae", ("conditioner.embedders.1.",), ("sdxl", "sd_xl")),
    ("sd3-vae", ("model.diffusion_model.joint_blocks.", "joint_blocks."), ("sd3",)),
    ("flux-vae", ("double_blocks.", "model.diffusion_model.double_blocks."), ("flux", "ae.safetensors")),
]


def _infer_kl_config(sd, source):
    """KLVAE architecture read off the tensor shapes of an LDM-named state dict (files without a config)."""
    def shape(key):
        if key not in sd:
            raise KeyError(f"{source}: cannot infer the autoencoder architecture, tensor {key!r} is missing "
                           f"(first keys: {sorted(sd)[:5]})")
        return tuple(sd[key].shape)
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    num_res_blocks = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    resolution = 256  # not stored in weights; only places attention levels (attn_resolutions) below
    use_quant_conv = "quant_conv.weight" in sd  # SD3 and FLUX have none
    z = shape("decoder.conv_in.weight")[1]
    config = dict(
        ch=ch, in_channels=in_channels, num_res_blocks=num_res_blocks, resolution=resolution,
        ch_mult=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels],
        attn_resolutions=[resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd],
        z_channels=z, embed_dim=shape("post_quant_conv.weight")[1] if use_quant_conv else z,
        out_ch=shape("decoder.conv_out.weight")[0], use_quant_conv=use_quant_conv)
    # LDM hard-codes GroupNorm(32); a file without a config cannot tell us anything else.
    widths = [ch] + [ch * m for m in config["ch_mult"]]
    if any(w % 32 for w in widths):
        raise ValueError(f"{source}: channel widths {widths} are not multiples of 32, so the GroupNorm group count "
                         f"cannot be inferred; load a checkpoint that carries its config (save_ldm / save_diffusers)")
    return config


def _family_norm(config, source, raw_keys):
    """The latent normalisation of a weights-only file's family, and how it was chosen: (norm dict, note)."""
    name = os.path.basename(str(source)).lower()
    sd_like = config["use_quant_conv"] and config["z_channels"] == 4   # SD-VAE, SDXL-VAE (LDM kl-f8)
    sd3_like = not config["use_quant_conv"] and config["z_channels"] == 16  # SD3, FLUX
    family = why = None
    for candidate, keys, words in _FAMILY_HINTS:
        if (candidate == "sdxl-vae" and sd_like) or (candidate != "sdxl-vae" and sd3_like):
            if any(k.startswith(keys) for k in raw_keys):
                family, why = candidate, "the checkpoint's other networks"
            elif any(w in name for w in words):
                family, why = candidate, f"the file name {os.path.basename(str(source))!r}"
            if family:
                break
    if family is None and sd_like:
        family, why = "sd-vae", "SD-VAE's default (pass --scaling-factor 0.13025 for SDXL-VAE)"
    if family is None and sd3_like:
        raise ValueError(f"{source}: a 16-channel VAE without quant convs is SD3's or FLUX's, whose weights look "
                         f"alike but whose latents are normalised differently, and neither its name nor its keys "
                         f"say which: pass --scaling-factor 1.5305 --shift-factor 0.0609 (SD3) or --scaling-factor "
                         f"0.3611 --shift-factor 0.1159 (FLUX)")
    if family is None:
        return {"scaling_factor": 1.0}, "scale 1.0: no latent scale is known for this architecture (measure one " \
                                        "with evaluate.py latent-stats)"
    with torch.device("meta"):
        return models.KLVAE_models[family]().latent_norm(), f"{family}'s latent normalisation, from {why}"


def _read_state_dict_file(path):
    """The tensors of one .safetensors / .bin / .ckpt / .pt / .pth file (plus the safetensors metadata)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    return torch_load(path), {}


def _read_diffusers_folder(path):
    """(state dict in float32, config.json) of a diffusers AutoencoderKL folder: one weights file, a sharded one
    (an index naming the shards) or the fp16 variant."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    found = [w for w in _DIFFUSERS_WEIGHTS if os.path.isfile(os.path.join(path, w))]
    if not found:
        raise FileNotFoundError(f"diffusers folder {path!r} has config.json but no weights (looked for "
                                f"{', '.join(_DIFFUSERS_WEIGHTS[:4])}, and the .fp16 variants)")
    first = os.path.join(path, found[0])
    if first.endswith(".json"):
        with open(first) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{first} names shards that are not in the folder: {missing[:3]}")
        sd = {k: v for s in shards for k, v in _read_state_dict_file(os.path.join(path, s))[0].items()}
    else:
        sd = _read_state_dict_file(first)[0]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, config


def _read_checkpoint(path, ema=False):
    """(state_dict, config or None, diffusers config or None, format name) from any supported file or folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no autoencoder checkpoint at {path!r}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "vae",
                                                                                                   "config.json")):
            path = os.path.join(path, "vae")  # a whole diffusers pipeline folder: use its vae/ subfolder
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path) and find_vqgan_checkpoint(path):
            sd, config, _, _ = _read_checkpoint(find_vqgan_checkpoint(path), ema)  # taming / MaskGIT-pytorch folder
            return sd, config, None, "taming VQ-GAN folder"
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path!r} is a folder without config.json: expected a diffusers AutoencoderKL "
                                    f"folder (config.json + diffusion_pytorch_model.safetensors) or a taming / "
                                    f"MaskGIT-pytorch VQ-GAN folder (last.ckpt or ckpts/last.ckpt)")
        sd, diffusers_config = _read_diffusers_folder(path)
        return sd, None, diffusers_config, "diffusers folder"
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"unknown checkpoint format {ext!r} for {path!r}: expected a diffusers folder or a "
                         f".safetensors, .ckpt, .pt, .pth or .bin file")
    ckpt, meta = _read_state_dict_file(path)
    if ext == ".safetensors":  # save_ldm stores its config in the metadata
        return ckpt, json.loads(meta["config"]) if "config" in meta else None, None, "safetensors file"
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} holds a {type(ckpt).__name__}, not a state dict or checkpoint dict")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(ckpt.get("state_dict"), dict):  # LDM / taming Lightning checkpoint, or our save_ldm
        return ckpt["state_dict"], config, None, "LDM / taming checkpoint"
    if isinstance(ckpt.get("model"), dict):  # this project's checkpoints: {"model", "config" or "args", ...}
        if ema and not isinstance(ckpt.get("ema"), dict):
            raise KeyError(f"{path!r} has no 'ema' weights (keys: {sorted(ckpt)})")
        return ckpt["ema" if ema else "model"], config, None, "eqvae training checkpoint"
    return ckpt, None, None, "plain state dict"


def _strip_prefixes(sd):
    """Drop wrappers' prefixes (DDP, torch.compile, SD's first_stage_model., vae.) and the LDM loss.* tensors."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    for prefix in ("first_stage_model.", "vae."):
        # A whole Stable Diffusion checkpoint also holds the UNet and text encoder: keep only the autoencoder.
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    # LDM training checkpoints carry the discriminator and LPIPS under loss.*: not part of the autoencoder.
    return {k: v for k, v in sd.items() if not k.startswith("loss.") and torch.is_tensor(v)}


def load_autoencoder(path, ema=False, scaling_factor=None, shift_factor=None, log=None):
    """
    A KLVAE (or taming VQGAN) in eval mode from a diffusers folder (one file, shards or the fp16 variant; a
    pipeline's vae/ subfolder), an LDM / SD3 / FLUX / diffusers / taming file, or this project's checkpoint
    ({"model", "config" or "args", ...}; ema=True takes its "ema" weights instead). scaling_factor / shift_factor
    override the latent normalisation the file carries (or, for weights-only files, the one of their family);
    log: a function told how a weights-only file's normalisation was chosen.
    """
    path = resolve_hub(path)
    sd, config, diffusers_config, _ = _read_checkpoint(path, ema)
    source, raw_keys = str(path), list(sd)
    sd = _strip_prefixes(sd)
    if "quantize.embedding.weight" in sd:  # taming VQ-GAN: own VQ checkpoints carry a config
        return load_vqgan_from_state_dict(sd, source, config=config).eval()
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        sd = _diffusers_to_ldm_state_dict(sd)
    # Some diffusers -> LDM conversions leave the attention 1x1 convs as 2-D [C, C] matrices.
    sd = {k: v[:, :, None, None] if v.ndim == 2 and _LDM_ATTN_WEIGHT.search(k) else v for k, v in sd.items()}
    if not any(k.startswith("encoder.") for k in sd):
        raise ValueError(f"{source}: not an autoencoder checkpoint (no encoder.* tensors; first keys: {sorted(sd)[:5]})")
    if diffusers_config is not None:
        config = _config_from_diffusers(diffusers_config, source)  # normalisation as the folder says
    elif config is None:
        config = _infer_kl_config(sd, source)
        if scaling_factor is None:  # (given, it replaces whatever the family would say)
            norm, note = _family_norm(config, source, raw_keys)
            config.update(norm)
            if log is not None:
                log(f"{source}: the file stores no latent normalisation; using {note}")
    config = dict(config)
    if scaling_factor is not None:
        config.update(scaling_factor=float(scaling_factor), latents_mean=None, latents_std=None)
    if shift_factor is not None:
        config["shift_factor"] = float(shift_factor)
    try:
        vae = models.KLVAE(**config)
    except TypeError as e:  # a config key KLVAE does not know
        raise ValueError(f"{source}: its autoencoder config does not fit KLVAE ({e}); config: {config}") from None
    load_state_dict_checked(vae, sd, source)
    return vae.eval()


def diffusers_config(vae):
    """The diffusers AutoencoderKL config.json of a KLVAE (the fields diffusers 0.42 writes)."""
    c = vae.config
    if c["embed_dim"] != c["z_channels"]:
        raise ValueError(f"diffusers' AutoencoderKL has one latent width, this autoencoder two (embed_dim="
                         f"{c['embed_dim']}, z_channels={c['z_channels']}): export it with save_ldm")
    L = len(c["ch_mult"])
    attn = [c["resolution"] // 2 ** i in c["attn_resolutions"] for i in range(L)]  # attention at level i
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0",
        "in_channels": c["in_channels"], "out_channels": c["out_ch"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attn[::-1]],
        "block_out_channels": [c["ch"] * m for m in c["ch_mult"]], "layers_per_block": c["num_res_blocks"],
        "act_fn": "silu", "latent_channels": c["z_channels"], "norm_num_groups": c["norm_num_groups"],
        "sample_size": c["resolution"], "scaling_factor": c["scaling_factor"],
        "shift_factor": c["shift_factor"] or None, "latents_mean": c["latents_mean"], "latents_std": c["latents_std"],
        "force_upcast": True, "use_quant_conv": c["use_quant_conv"], "use_post_quant_conv": c["use_quant_conv"],
        "mid_block_add_attention": True,
    }


def save_diffusers(vae, folder):
    """Write `vae` as a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) that
    AutoencoderKL.from_pretrained loads unchanged; atomically (a kill leaves the old folder or the new one)."""
    from safetensors.torch import save_file
    config = diffusers_config(vae)
    sd = _ldm_to_diffusers_state_dict(_export_state_dict(vae), len(vae.config["ch_mult"]))

    def write(tmp):
        save_file(sd, os.path.join(tmp, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return atomic_folder(folder, write)


def save_ldm(vae, path, discriminator=None):
    """Write `vae` in LDM format: {"state_dict": LDM names} (.ckpt/.pt/.pth) or a flat .safetensors file (FLUX's
    ae.safetensors layout); our config rides along ("config" key / safetensors metadata), ignored by LDM's loader.
    discriminator: also store a PatchGAN as loss.discriminator.*, as LDM's training checkpoints do, so a fine-tune
    of this file starts with it (init_training_state); load_autoencoder ignores it."""
    return _save_state_dict(path, _export_state_dict(vae), discriminator, dict(vae.config))


def _save_state_dict(path, sd, discriminator=None, config=None):
    """{"state_dict": sd[, "config"]} as a .ckpt, or a flat .safetensors with the config in its metadata; the
    discriminator's weights as loss.discriminator.*; atomically."""
    if discriminator is not None:
        sd.update({f"loss.discriminator.{k}": v for k, v in _export_state_dict(discriminator).items()})
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        meta = {"format": "pt", **({"config": json.dumps(config)} if config is not None else {})}
        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return atomic_write(path, lambda tmp: torch.save({"state_dict": sd, **({"config": config} if config else {})},
                                                     tmp))


def set_latent_norm(path, norm):
    """Write a latent normalisation ({scaling_factor, shift_factor, latents_mean, latents_std}, as
    KLVAE.latent_norm()) into an export: a diffusers folder's config.json (the weights are not touched) or a file
    save_ldm wrote (which carries our config). Other files are refused, rather than rewritten."""
    norm = dict(norm)
    folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "vae")
    if os.path.isdir(path) and os.path.isfile(os.path.join(folder, "config.json")):
        config_path = os.path.join(folder, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config.update(norm, shift_factor=norm["shift_factor"] or None)
        _config_from_diffusers(config, config_path)  # still a layout KLVAE reads
        atomic_write(config_path, lambda tmp: open(tmp, "w").write(json.dumps(config, indent=2)))
        return config_path
    sd, config, _, fmt = _read_checkpoint(path)
    if config is None or "quantize.embedding.weight" in sd or fmt not in ("safetensors file", "LDM / taming checkpoint"):
        raise ValueError(f"{path}: only an export of this project (a diffusers folder, or an LDM file save_ldm wrote) "
                         f"is updated in place; convert it first (python checkpoints.py convert {path} OUT --to "
                         f"diffusers), or pass the values as --scaling-factor / --shift-factor")
    config = dict(load_autoencoder(path).config, **norm)  # the file's config, validated by loading it
    # Only the config changes: every tensor stays as stored (its dtype, the discriminator a fine-tune starts from).
    if path.endswith(".safetensors"):
        tensors, meta = _read_state_dict_file(path)
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(meta, config=json.dumps(config))))
    else:
        ckpt = torch_load(path)
        atomic_write(path, lambda tmp: torch.save(dict(ckpt, config=config), tmp))
    return path


def init_training_state(path, autoencoder, discriminator):
    """
    What the official EQ-VAE run starts from besides the weights. It passes LDM's kl-f8 model.ckpt to main.py's
    --resume, so PyTorch Lightning 1.4 restores the whole training state (checkpoint_connector.restore_model and
    restore_training_state): the trained PatchGAN (loss.discriminator.*, BatchNorm statistics included), both Adams
    (moments and step counts, and param_groups: torch's Optimizer.load_state_dict keeps only the live 'params', so
    the file's learning rate replaces the one main.py configured) and global_step. Read from a Lightning (LDM /
    taming) checkpoint, or from one of this project's training checkpoints (disc, opt, opt_disc).
    Returns {"disc": state dict or None, "opt_ae", "opt_disc": optimizer state dicts in the order of
    autoencoder.parameters() / discriminator.parameters(), or None, "global_step", "note": what was found}.
    """
    out = {"disc": None, "opt_ae": None, "opt_disc": None, "global_step": None}
    if os.path.isdir(path):
        path = find_vqgan_checkpoint(path) or path
    path = resolve_hub(path)
    if os.path.isdir(path) or not path.endswith((".ckpt", ".pt", ".pth", ".safetensors")):
        return dict(out, note=f"{path} holds the autoencoder's weights only")
    ckpt = {"state_dict": _read_state_dict_file(path)[0]} if path.endswith(".safetensors") else torch_load(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):  # this project's training checkpoint
        ours = {"disc": ckpt.get("disc"), "opt_ae": ckpt.get("opt"), "opt_disc": ckpt.get("opt_disc")}
        return dict(out, **ours, global_step=ckpt.get("step"), note=f"{path}: a finetune_eqvae.py checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        return dict(out, note=f"{path} holds the autoencoder's weights only")
    sd = ckpt["state_dict"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    disc = {k[len("loss.discriminator."):]: v for k, v in sd.items() if k.startswith("loss.discriminator.")}
    out.update(disc=disc or None, global_step=ckpt.get("global_step"))
    opts = ckpt.get("optimizer_states")
    if disc and isinstance(opts, list) and len(opts) == 2:
        # Lightning stores each Adam's state by parameter position; configure_optimizers lists encoder, decoder,
        # (taming: quantize,) quant_conv, post_quant_conv parameters, then the discriminator's (LDM
        # models/autoencoder.py, taming models/vqgan.py), the order of their state_dict keys.
        groups = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
        ae_names = [k for g in groups for k in sd if k.startswith(g)]
        disc_names = [k for k in disc if not k.endswith(buffers)]
        for key, names, module in (("opt_ae", ae_names, autoencoder), ("opt_disc", disc_names, discriminator)):
            saved = opts[0 if key == "opt_ae" else 1]
            flat = [i for g in saved["param_groups"] for i in g["params"]]
            own = {n: i for i, (n, _) in enumerate(module.named_parameters())}
            if len(flat) != len(names) or set(names) != set(own):
                raise ValueError(f"{path}: its {key} state holds {len(flat)} parameters, not the {len(own)} of this "
                                 f"model: pass --init-state weights (the discriminator alone) or fresh")
            pos = dict(zip(flat, names))
            out[key] = {"state": {own[pos[i]]: s for i, s in saved["state"].items()},
                        "param_groups": [dict(g, params=[own[pos[i]] for i in g["params"]])
                                         for g in saved["param_groups"]]}
    found = [what for what, key in (("discriminator", "disc"), ("Adam states", "opt_ae")) if out[key] is not None]
    return dict(out, note=f"{path}: {' and '.join(found) or 'no training state'} (global step {out['global_step']})")


#################################################################################
#                    VQ-GAN (taming): Shapes -> Config, Save                    #
#################################################################################
# Formats: taming's Lightning last.ckpt ({"state_dict": {encoder.*, decoder.*, quantize.*, quant_conv.*,
# post_quant_conv.*, loss.*}}, plus Lightning bookkeeping), the same file as MaskGIT-pytorch distributes it
# (pretrained_maskgit/VQGAN/last.ckpt next to model.yaml; its trainer reads ckpts/last.ckpt + configs/model.yaml,
# taming's release layout), a plain state dict, LDM checkpoints with a VQ first stage under first_stage_model.,
# and this project's {"model": sd, "config": cfg}. load_autoencoder reads all of them; model.yaml is never needed:
# the shapes give the architecture.

def infer_vqgan_config(sd, source="state dict"):
    """Read a VQ-GAN config off the tensor shapes of a taming-named state dict."""
    def shape(key):
        if key not in sd:
            raise ValueError(f"{source}: not a taming VQ-GAN state dict, tensor {key!r} is missing "
                             f"(first keys: {sorted(sd)[:5]})")
        return tuple(sd[key].shape)

    n_embed, embed_dim = shape("quantize.embedding.weight")
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"{source}: encoder.down levels {levels} are not 0, 1, ..., L-1")
    attn_levels = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    config = dict(
        ch=ch, in_channels=in_channels, out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels],
        num_res_blocks=len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}),
        z_channels=shape("quant_conv.weight")[1], n_embed=n_embed, embed_dim=embed_dim)
    # The weights store neither the training resolution (it only places attention: the network is convolutional)
    # nor the GroupNorm group count. A known config with these shapes supplies both; else taming's 256 px and 32.
    for build in models.VQGAN_models.values():
        with torch.device("meta"):
            known = build().config
        known_attn = [i for i in levels if known["resolution"] // 2 ** i in known["attn_resolutions"]]
        if all(known[k] == v for k, v in config.items()) and known_attn == attn_levels:
            return known
    widths = [ch] + [ch * m for m in config["ch_mult"]]
    if any(w % 32 for w in widths):
        raise ValueError(f"{source}: channel widths {widths} are not multiples of 32, so the GroupNorm group count "
                         f"cannot be inferred; pass config= or load a checkpoint that carries its config")
    with torch.device("meta"):
        return models.VQGAN(**config, resolution=256, attn_resolutions=[256 // 2 ** i for i in attn_levels]).config


def load_vqgan_from_state_dict(sd, source="state dict", config=None):
    """A taming / MaskGIT / LDM / own-format VQ-GAN state dict (wrapped or not) -> VQGAN in eval mode.
    config: None (read from the checkpoint or inferred from shapes), a VQGAN_models name or a dict of VQGAN arguments."""
    if isinstance(config, str):
        with torch.device("meta"):
            config = models.build(models.VQGAN_models, config).config
    saved_config = None
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # taming / Lightning
    elif isinstance(sd.get("model"), dict):
        saved_config = sd.get("config") if isinstance(sd.get("config"), dict) else None
        sd = sd["model"]  # this project's {"model": sd, "config": cfg}
    # Prefixes (DDP module., first_stage_model. of a whole LDM) and taming's loss.* (VQLPIPSWithDiscriminator's
    # LPIPS + PatchGAN, stored next to the model) are handled as for the KL autoencoder.
    sd = _strip_prefixes(sd)
    inferred = infer_vqgan_config(sd, source)
    if config is None:
        config = saved_config if saved_config is not None else inferred
    # The two mistakes worth a sentence of their own: the wrong codebook size or the wrong code width.
    for key, what in (("n_embed", "{} codes"), ("embed_dim", "{}-dim codes")):
        if config.get(key, inferred[key]) != inferred[key]:
            raise ValueError(f"{source}: the codebook holds {what.format(inferred[key])} (quantize.embedding.weight "
                             f"{tuple(sd['quantize.embedding.weight'].shape)}) but the config asks for "
                             f"{key}={config[key]}")
    model = models.VQGAN(**config)
    load_state_dict_checked(model, sd, source)  # names missing / unexpected keys and shape mismatches
    return model.eval()


def find_vqgan_checkpoint(folder):
    """The checkpoint file of a taming / MaskGIT-pytorch VQGAN folder, or None."""
    for name in ("last.ckpt", os.path.join("ckpts", "last.ckpt")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def save_taming(vq, path, discriminator=None):
    """Write vq in taming's layout ({"state_dict": ...}) that taming's VQModel.init_from_ckpt and MaskGIT-pytorch
    read (the architecture is read back off the shapes); atomically (an interrupted save leaves the previous file);
    a .safetensors path gives the same keys, flat. discriminator: also store a PatchGAN as loss.discriminator.*, as
    taming's last.ckpt does."""
    return _save_state_dict(path, _export_state_dict(vq), discriminator)


#################################################################################
#                     Pretrained Networks: LPIPS, DiT/SiT/REPA                  #
#################################################################################

_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_LPIPS_VGG_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"


def load_lpips(vgg_weights=None, lin_weights=None, vgg_flag="--lpips-vgg", lin_flag="--lpips-lin"):
    """models.LPIPS with torchvision's VGG16 features (vgg16-397923af.pth) and the LPIPS v0.1 lin layers (vgg.pth,
    keys lin{k}.model.1.weight): the given paths, else torch hub's cache; frozen, in eval mode."""
    lpips = models.LPIPS()
    vgg = torch.load(find_weights("vgg16-397923af.pth", _VGG16_URL, vgg_weights, vgg_flag), map_location="cpu",
                     weights_only=True)
    vgg = {k[len("features."):]: v for k, v in vgg.items()
           if k.startswith("features.") and int(k.split(".")[1]) < len(lpips.features)}
    load_state_dict_checked(lpips.features, vgg, "VGG16 weights")
    lin = torch.load(find_weights("vgg.pth", _LPIPS_VGG_URL, lin_weights, lin_flag), map_location="cpu",
                     weights_only=True)
    load_state_dict_checked(lpips.lins, lin, "LPIPS lin weights")
    return lpips.eval()


def dit_config_from_state_dict(state_dict):
    """Read (depth, hidden_size, patch_size, in_channels, out_channels, input_size, num_classes) off DiT weights."""
    w = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    out_ch = state_dict["final_layer.linear.weight"].shape[0] // (p * p)
    grid = int(round(state_dict["pos_embed"].shape[1] ** 0.5))
    return dict(depth=depth, hidden_size=hidden, patch_size=p, in_channels=in_ch, out_channels=out_ch,
                input_size=grid * p, num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1)


def _describe_dit(cfg):
    """Human-readable config, with the DiT_models size name when one matches."""
    size = next((s for s, c in models.DIT_SIZES.items()
                 if (c["depth"], c["hidden_size"]) == (cfg["depth"], cfg["hidden_size"])), None)
    name = f"DiT-{size}/{cfg['patch_size']} " if size else ""
    return (f"{name}(depth {cfg['depth']}, hidden {cfg['hidden_size']}, patch {cfg['patch_size']}, "
            f"{cfg['in_channels']}->{cfg['out_channels']} channels, {cfg['input_size']}x{cfg['input_size']} latents, "
            f"{cfg['num_classes']} classes)")


def load_dit_weights(model, state_dict, source="checkpoint"):
    """model.load_state_dict(state_dict) with errors that say which config the checkpoint was trained for."""
    return load_state_dict_checked(model, state_dict, source,
                                   describe=lambda sd: _describe_dit(dit_config_from_state_dict(sd)))


def sit_from_state_dict(state_dict, encoder_depth=None, **kwargs):
    """
    Build the SiT or REPA model a state dict was saved from and load it (keys checked, errors name them).
    Learned sigma is read off the output width, REPA's projectors off `projectors.*`; REPA's encoder_depth is not
    stored in its checkpoints: None means 8 (the released SiT-XL/2 + REPA), or the depth of a shallower model
    (sampling never uses the projectors, so it only has to be valid).
    """
    cfg = dit_config_from_state_dict(state_dict)
    encoder_depth = min(8, cfg["depth"]) if encoder_depth is None else encoder_depth
    z_dims, proj_dim, i = [], 2048, 0
    while f"projectors.{i}.4.weight" in state_dict:
        z_dims.append(state_dict[f"projectors.{i}.4.weight"].shape[0])
        proj_dim = state_dict[f"projectors.{i}.0.weight"].shape[0]
        i += 1
    repa = dict(encoder_depth=encoder_depth, z_dims=z_dims, projector_dim=proj_dim) if z_dims else {}
    # The head count leaves no trace in the weights: take the SiT_models config of this width (64-dim heads).
    heads = kwargs.pop("num_heads", None) or {c["hidden_size"]: c["num_heads"]
                                              for c in models.DIT_SIZES.values()}.get(cfg["hidden_size"])
    if heads is None:
        raise ValueError(f"hidden size {cfg['hidden_size']} is no SiT_models config: pass num_heads")
    model = models.SiT(input_size=cfg["input_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                       hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=heads,
                       num_classes=cfg["num_classes"], learn_sigma=cfg["out_channels"] == 2 * cfg["in_channels"],
                       **repa, **kwargs)
    return load_dit_weights(model, state_dict)


#################################################################################
#                     Pretrained Networks: DINOv2, MaskGIT                      #
#################################################################################

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"


def load_dinov2(name="dinov2_vitb14", path=None, pos_embed_resample="dinov2", flag="--dinov2"):
    """
    DINOv2_models[name] with the official weights (path, or torch hub's cache as find_weights resolves it), frozen
    and in eval mode. "dinov2_tiny" has no weights: random init. Wrong keys or shapes are an error naming them.
    """
    model = models.build(models.DINOv2_models, name, pos_embed_resample=pos_embed_resample)
    if name != "dinov2_tiny":
        path = find_weights(f"{name}_pretrain.pth", DINOV2_URL.format(name=name), path, flag)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        load_state_dict_checked(model, state_dict.get("model", state_dict), f"{path} ({name})")
    model.eval().requires_grad_(False)
    return model


def maskgit_config_from_state_dict(state_dict, num_classes=1000, num_heads=16):
    """
    Read the architecture off MaskTransformer weights. The table holds K + 1 + C + 1 rows, so the split between codes
    K and classes C needs one of them: num_classes (1000 for the released ImageNet models). Heads cannot be read off
    weights: num_heads, 16 as in every released model.
    """
    vocab, hidden = state_dict["tok_emb.weight"].shape
    depth = 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("transformer.layers."))
    grid = int(round((state_dict["pos_emb"].shape[1] - 1) ** 0.5))
    return dict(input_size=grid, codebook_size=vocab - num_classes - 2, num_classes=num_classes, hidden_size=hidden,
                depth=depth, num_heads=num_heads, mlp_dim=state_dict["transformer.layers.0.1.fn.net.0.weight"].shape[0])


def load_maskgit_weights(model, state_dict, source="checkpoint"):
    """model.load_state_dict(state_dict) that names the first missing/unexpected keys and shape mismatches."""
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}  # DDP saves
    return load_state_dict_checked(model, state_dict, f"{source} (MaskTransformer {model.config})")


def load_maskgit(path, use_ema=True, num_classes=1000, num_heads=16):
    """
    A MaskTransformer in eval mode from a checkpoint file: this project's train_maskgit.py checkpoint ({"model",
    "ema", "config", "vqgan", ...}; EMA weights unless use_ema=False) or a Maskgit-pytorch file ({"model_state_dict",
    ...}, e.g. its released MaskGIT_ImageNet_256.pth, or a plain state dict; config read off the weights, with
    num_classes and num_heads given, as the weights do not tell).
    model.vqgan_path is the VQ-GAN the checkpoint was trained on, when it says (ours), else None.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MaskGIT checkpoint not found: {path}")
    ckpt = torch_load(path)
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:  # ours
        state_dict = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
        config = ckpt["config"]
    else:
        state_dict = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        if not isinstance(state_dict, dict) or "tok_emb.weight" not in state_dict:
            found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise KeyError(f"{path} is neither a train_maskgit.py checkpoint nor a Maskgit-pytorch state dict "
                           f"(no 'tok_emb.weight'; top-level keys: {found})")
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        config = maskgit_config_from_state_dict(state_dict, num_classes=num_classes, num_heads=num_heads)
    model = load_maskgit_weights(models.MaskTransformer(**config), state_dict).eval()
    # The tokeniser it was trained on (train_maskgit.py records its path; None for Maskgit-pytorch files).
    model.vqgan_path = ckpt.get("vqgan") if isinstance(ckpt, dict) else None
    return model


#################################################################################
#                   Command Line: inspect and convert autoencoders              #
#################################################################################

def describe_autoencoder(path):
    """What an autoencoder file or folder holds: {format, family, architecture, parameters, latent, scaling}."""
    fmt = _read_checkpoint(path)[3]
    ae = load_autoencoder(path)
    c = ae.config
    out = {"path": str(path), "format": fmt, "family": type(ae).__name__, "parameters": sum(p.numel() for p in
           ae.parameters()), "downsampling": ae.downsampling}
    if isinstance(ae, models.VQGAN):
        out.update(codebook=f"{c['n_embed']} codes x {c['embed_dim']}", latent_channels=c["embed_dim"])
    else:
        out.update(latent_channels=c["embed_dim"], **ae.latent_norm())
    out["config"] = c
    return out


def convert(src, dst, to):
    """Re-save any autoencoder load_autoencoder reads as a diffusers folder, an LDM file or a taming file."""
    ae = load_autoencoder(src)
    is_vq = isinstance(ae, models.VQGAN)
    if (to == "taming") != is_vq:
        raise ValueError(f"{src} holds a {type(ae).__name__}: convert it to "
                         f"{'taming' if is_vq else 'diffusers or ldm'}, not {to}")
    {"diffusers": save_diffusers, "ldm": save_ldm, "taming": save_taming}[to](ae, dst)
    return dst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print what an autoencoder file or folder holds (one JSON line)")
    p.add_argument("path")
    p = sub.add_parser("convert", help="convert an autoencoder to another format")
    p.add_argument("src", help="anything load_autoencoder reads: diffusers folder, LDM / taming / own checkpoint")
    p.add_argument("dst", help="output folder (diffusers) or file (.ckpt / .pt / .safetensors)")
    p.add_argument("--to", required=True, choices=["diffusers", "ldm", "taming"],
                   help="diffusers folder, LDM checkpoint (KL) or taming checkpoint (VQ-GAN)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            info = describe_autoencoder(args.path)
            for k, v in info.items():
                if k != "config":
                    print(f"  {k:<16} {v}", file=sys.stderr)
            print(json.dumps(info))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                convert(args.src, args.dst, args.to)
            print(f"wrote {args.dst} ({args.to})", file=sys.stderr)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"checkpoints.py {args.command}: {e}")


if __name__ == "__main__":
    main()
