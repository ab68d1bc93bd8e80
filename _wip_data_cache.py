import hashlib
import json


#################################################################################
#                                 Latent Cache                                  #
#################################################################################
# Encoding every image with the frozen VAE each step costs more than a DiT-B step (fast-DiT's precomputed latents
# nearly doubled training speed, REFERENCE 7). The cache stores, for every image and for its horizontal mirror,
# the posterior mean and std; each read then draws a fresh flip and a fresh z = mean + std * eps, so training on
# the cache sees the same distribution as encoding on the fly (REPA trains this way too).
#
# Layout of a cache folder:
#   meta.json              VAE fingerprint, resolution, scaling factor, dataset size, latent shape, shard size
#   labels_00000.npy       (n,) int64 class labels of images [k * shard_size, (k + 1) * shard_size)
#   shard_00000.npy        (n, 2, 2C, h, w) float32: [no flip, flip] x [mean (C) | std (C)]
# Shards are written to a temporary name and renamed (shard last, so a shard file marks a finished shard); rank r
# writes shards k with k % world_size == r, so no two ranks touch the same file, and a rerun skips finished shards.

LATENT_CACHE_FORMAT = 1


def vae_fingerprint(vae):
    """sha256 (first 16 hex digits) of the autoencoder's weights: names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _atomic_save_npy(path, array):
    """np.save to a temporary file in the same folder, then rename: readers never see half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _cache_barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_cache_meta(cache_dir, found, expected):
    """A cache built with another VAE, resolution or dataset is an error that names what differs."""
    keys = ["format", "vae_sha256", "resolution", "scaling_factor", "num_images", "latent_shape", "shard_size"]
    diff = [f"{k}: cache {found.get(k)!r} vs now {expected[k]!r}" for k in keys if found.get(k) != expected[k]]
    if diff:
        raise ValueError(f"latent cache {cache_dir} was built with different settings (cache VAE "
                         f"{found.get('vae')!r}, now {expected['vae']!r}):\n  " + "\n  ".join(diff)
                         + "\nUse another --cache-latents folder, or delete this one to rebuild it.")


@torch.no_grad()
def build_latent_cache(vae, dataset, cache_dir, resolution, vae_name="", data_name="", rank=0, world_size=1,
                       batch_size=32, shard_size=1000, device="cpu", log=print):
    """
    Encode `dataset` (items (image (3, R, R) in [-1, 1], label), deterministic: no random flip) into cache_dir,
    this rank's shards only; finished shards are kept. Every rank must call it (it synchronises). Returns meta.
    """
    device = torch.device(device)
    probe = vae.encode(dataset[0][0][None].to(device)).mean  # (1, C, h, w): the latent shape for this resolution
    expected = {"format": LATENT_CACHE_FORMAT, "vae": str(vae_name), "vae_sha256": vae_fingerprint(vae),
                "resolution": int(resolution), "scaling_factor": float(vae.scaling_factor),
                "num_images": len(dataset), "latent_shape": list(probe.shape[1:]), "shard_size": int(shard_size),
                "data": str(data_name)}
    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            _check_cache_meta(cache_dir, json.load(f), expected)
    _cache_barrier()  # everyone has read (and checked) the old meta before rank 0 may write it
    os.makedirs(cache_dir, exist_ok=True)
    if rank == 0 and not os.path.exists(meta_path):
        tmp = f"{meta_path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(expected, f, indent=2)
        os.replace(tmp, meta_path)
    _cache_barrier()

    n = len(dataset)
    num_shards = -(-n // shard_size)
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not os.path.exists(os.path.join(cache_dir, f"shard_{k:05d}.npy"))]
    if rank == 0:
        log(f"Latent cache {cache_dir}: {num_shards} shards of {shard_size} images, {len(mine) - len(todo)} of "
            f"rank 0's {len(mine)} already done")
    for done, k in enumerate(todo):
        indices = range(k * shard_size, min((k + 1) * shard_size, n))
        moments, labels = [], []
        for start in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[start:start + batch_size]]
            x = torch.stack([im for im, _ in items]).to(device)                   # (B, 3, R, R)
            labels += [int(lab) for _, lab in items]
            both = []
            for xi in (x, x.flip(-1)):                                            # DiT's random flip, both ways
                posterior = vae.encode(xi)
                both.append(torch.cat([posterior.mean, posterior.std], dim=1))   # (B, 2C, h, w)
            moments.append(torch.stack(both, dim=1).float().cpu())                # (B, 2, 2C, h, w)
        _atomic_save_npy(os.path.join(cache_dir, f"labels_{k:05d}.npy"), np.asarray(labels, dtype=np.int64))
        _atomic_save_npy(os.path.join(cache_dir, f"shard_{k:05d}.npy"), torch.cat(moments).numpy())
        if rank == 0:
            log(f"  latent cache: shard {k + 1}/{num_shards} written (rank 0: {done + 1}/{len(todo)})")
    _cache_barrier()
    return expected


class LatentCache(torch.utils.data.Dataset):
    """
    A finished latent cache as a dataset: item = (unscaled latent (C, h, w), label). mode "sample" draws a random
    flip (p = 0.5, if flip) and z = mean + std * eps from the global torch RNG (ResumableLoader seeds it per sample
    and epoch); mode "mean" returns the posterior mean of the unflipped image.
    """

    def __init__(self, cache_dir, mode="sample", flip=True):
        meta_path = os.path.join(cache_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{cache_dir} is not a latent cache (no meta.json)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        self.cache_dir, self.mode, self.flip = cache_dir, mode, flip
        self.shard_size = self.meta["shard_size"]
        num_shards = -(-self.meta["num_images"] // self.shard_size)
        missing = [k for k in range(num_shards) if not os.path.exists(self._path("shard", k))]
        if missing:
            raise FileNotFoundError(f"latent cache {cache_dir} is incomplete: {len(missing)} of {num_shards} shards "
                                    f"missing (first: {missing[:3]}); rerun the same command to finish it")
        self.labels = np.concatenate([np.load(self._path("labels", k)) for k in range(num_shards)])
        self._shards = {}  # memory maps, opened lazily (and per loader worker)

    def _path(self, kind, k):
        return os.path.join(self.cache_dir, f"{kind}_{k:05d}.npy")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        k, j = divmod(index, self.shard_size)
        if k not in self._shards:
            self._shards[k] = np.load(self._path("shard", k), mmap_mode="r")
        moments = torch.from_numpy(np.array(self._shards[k][j]))  # (2, 2C, h, w)
        if self.mode == "mean":
            return moments[0].chunk(2, dim=0)[0], int(self.labels[index])
        side = int(torch.rand(()) < 0.5) if self.flip else 0
        mean, std = moments[side].chunk(2, dim=0)                 # (C, h, w) each
        return mean + std * torch.randn_like(mean), int(self.labels[index])
