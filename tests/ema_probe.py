"""
Run a stage script (python tests/ema_probe.py SCRIPT ARGS..., under torchrun or not) and record, on every rank,
whether its EMA starts from the weights DDP broadcast from rank 0: each rank builds its model and EMA before DDP
wraps the model, so an EMA made from a rank's own initialisation would drift from the model it averages.
Writes $EQVAE_PROBE_DIR/rank<r>.json: {"compared": parameters compared, "max_diff": largest |EMA - rank 0 model|}.
"""
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_utils as tu  # noqa: E402

broadcast, real_distributed, real_update = {}, tu.distributed, tu.update_ema


def distributed(model, device):
    wrapped = real_distributed(model, device)  # DDP copies rank 0's parameters to every rank here
    broadcast.update({n: p.detach().clone() for n, p in tu.unwrap(wrapped).named_parameters()})
    return wrapped


def update_ema(ema_model, model, decay=0.9999):
    if not getattr(update_ema, "done", False):
        update_ema.done = True
        diffs = []
        for name, p in tu.unwrap(ema_model).named_parameters():
            ref = broadcast.get(name, broadcast.get("vae." + name))  # finetune's DDP module holds the VAE as .vae
            if ref is not None:
                diffs.append((p.detach() - ref).abs().max().item())
        with open(os.path.join(os.environ["EQVAE_PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump({"compared": len(diffs), "max_diff": max(diffs, default=None)}, f)
    return real_update(ema_model, model, decay)


tu.distributed, tu.update_ema = distributed, update_ema
script = os.path.join(ROOT, sys.argv[1])
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
