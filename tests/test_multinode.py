"""
Two "nodes" on this machine: two torchrun agents (--nnodes 2 --nproc_per_node 1) that meet over a c10d rendezvous,
as on a cluster, for finetune_eqvae.py and train_dit.py. Each run ends with parameters bit-identical to a 2-process
run on one node: the same two ranks computing the same math, so only the launch differs (global vs local ranks,
rank-0-only writes to the shared results folder, the rendezvous). Where the machine allows it (root, iproute2), each
node gets its own network namespace, joined to the other by a veth pair (so the rendezvous, the store and gloo
really go over a network link between two addresses), and its own mount namespace with a private --cache-latents
folder (a node-local disk: each node must complete the latent cache it reads). Elsewhere (CI without those
permissions, or EQVAE_TEST_LOOPBACK=1) both agents use the loopback interface and one cache folder; the test says
which in its output (pytest -s).
"""
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from helpers import ROOT, free_port, run_script
import train_utils as tu

TINY_VAE = '{"ch": 8, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "resolution": 64, "norm_num_groups": 8}'


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


class Network:
    """Two network namespaces joined by a veth pair (10.231.x.1 and .2), or None where that is not allowed."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = [f"eqvae{tag}a", f"eqvae{tag}b"]
        self.dev = [f"eq{tag}a", f"eq{tag}b"]
        octet = int(tag[:2], 16) % 250 + 1
        self.addr = [f"10.231.{octet}.1", f"10.231.{octet}.2"]
        steps = [("netns", "add", self.ns[0]), ("netns", "add", self.ns[1]),
                 ("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])]
        for i in (0, 1):
            steps += [("link", "set", self.dev[i], "netns", self.ns[i]),
                      ("-n", self.ns[i], "addr", "add", f"{self.addr[i]}/24", "dev", self.dev[i]),
                      ("-n", self.ns[i], "link", "set", self.dev[i], "up"),
                      ("-n", self.ns[i], "link", "set", "lo", "up")]
        for step in steps:
            if _ip(*step).returncode != 0:
                self.close()
                raise OSError(f"ip {' '.join(step)} failed")

    def close(self):
        for ns in self.ns:
            _ip("netns", "del", ns)


def _network():
    if shutil.which("ip") is None or os.geteuid() != 0 or os.environ.get("EQVAE_TEST_LOOPBACK"):
        return None
    try:
        return Network()
    except (OSError, subprocess.SubprocessError):
        return None


def _private_mounts():
    """Whether this process may make mount namespaces with bind mounts (for node-local cache folders)."""
    if shutil.which("unshare") is None or os.geteuid() != 0 or os.environ.get("EQVAE_TEST_LOOPBACK"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount --bind / /mnt && umount /mnt"], capture_output=True, timeout=20)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def nodes():
    net = _network()
    mounts = _private_mounts()
    mode = ("two network namespaces joined by a veth pair" if net else "loopback (network namespaces not allowed "
            "here, or EQVAE_TEST_LOOPBACK set)") + ("; node-local cache folders (mount namespaces)" if mounts else
                                                    "; one cache folder")
    print(f"\n[two-node test] {mode}")
    yield net, mounts
    if net:
        net.close()


def two_nodes(script_args, net, node_dirs=None, cache=None, timeout=240):
    """Run `torchrun --nnodes 2 --nproc_per_node 1` twice, one agent per node, joined by a c10d rendezvous hosted at
    node 0's address. node_dirs[i] is bind-mounted over `cache` inside node i's mount namespace."""
    port, rdzv_id = free_port(), uuid.uuid4().hex[:8]
    host = net.addr[0] if net else "127.0.0.1"
    procs = []
    for i in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{host}:{port}", "--rdzv_id", rdzv_id,
                    "--max-restarts", "0"]
        prefix = []
        if net:
            # Gloo binds to the address of the machine's host name unless told the interface: the veth end.
            env["GLOO_SOCKET_IFNAME"] = net.dev[i]
            # Node 0 hosts the rendezvous store: torchrun would tell by matching the endpoint against the machine's
            # host name, whose address lies outside these namespaces.
            launcher += ["--local-addr", net.addr[i], "--rdzv-conf", f"is_host={int(i == 0)}"]
            prefix = ["ip", "netns", "exec", net.ns[i]]
        cmd = launcher + [os.path.join(ROOT, script_args[0]), *script_args[1:]]
        if node_dirs:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$0" "$1" && shift && exec "$@"', str(node_dirs[i]), str(cache)] + cmd
        procs.append(subprocess.Popen(prefix + cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"a node failed:\n{out[-4000:]}"
    return outs


def _same_state(a, b, parts):
    for part in parts:
        assert list(a[part]) == list(b[part]), part
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs between the 2-node and 1-node runs"


def test_two_nodes_dit_with_node_local_latent_cache_equals_one_node(tmp_path, nodes):
    """train_dit.py: 2 nodes x 1 process == 1 node x 2 processes, bit for bit (DiT draws noise and timesteps per
    rank, seed * world + rank, so the comparison is with the same 2 ranks on one node, not with 1 process). With
    mount namespaces each node builds its latent cache in its own folder: it encodes its rank's shards, then the
    ones the other node wrote where it cannot see them."""
    net, mounts = nodes
    args = lambda results, cache: ["train_dit.py", "--preset", "tiny", "--num-images", "16", "--global-batch-size",
                                   "4", "--max-steps", "3", "--log-every", "3", "--ckpt-every", "3", "--exp-name",
                                   "run", "--results-dir", str(results), "--cache-latents", str(cache),
                                   "--cache-shard-size", "4", "--cache-batch-size", "4"]
    cache = tmp_path / "cache"
    cache.mkdir()
    node_dirs = [tmp_path / "node0-disk", tmp_path / "node1-disk"] if mounts else None
    for d in node_dirs or []:
        d.mkdir()
    outs = two_nodes(args(tmp_path / "two-nodes", cache), net, node_dirs, cache)
    assert any("world_size=2" in out for out in outs)
    run_script(args(tmp_path / "one-node", tmp_path / "cache-one"), nproc=2)
    two = tu.load_checkpoint(str(tmp_path / "two-nodes" / "run" / "checkpoints" / "0000003.pt"))
    one = tu.load_checkpoint(str(tmp_path / "one-node" / "run" / "checkpoints" / "0000003.pt"))
    _same_state(two, one, ("model", "ema"))
    shards = [f"shard_{k:05d}.npy" for k in range(4)]
    if node_dirs:  # each node's own disk holds the whole cache, and the shared folder underneath none of it
        for d in node_dirs:
            assert sorted(f for f in os.listdir(d) if f.startswith("shard")) == shards and (d / "meta.json").exists()
        assert os.listdir(cache) == []
        assert any("built on other nodes are not visible here" in out for out in outs)
    else:
        assert sorted(f for f in os.listdir(cache) if f.startswith("shard")) == shards


def test_two_nodes_finetune_equals_one_node(tmp_path, nodes):
    """finetune_eqvae.py: 2 nodes x 1 process x batch 2 == 1 node x 2 processes x batch 2, bit for bit, with the
    GAN on (its BatchNorm statistics and adaptive weight are per rank, the same ranks in both runs) and gradient
    accumulation; rank 0 alone writes the shared run folder (log, metrics, previews, checkpoints, exports)."""
    net, _ = nodes
    args = lambda results: ["finetune_eqvae.py", "--data", "synthetic", "--resolution", "64", "--num-images", "32",
                            "--init", "none", "--config", TINY_VAE, "--global-batch-size", "4", "--grad-accum", "2",
                            "--lr", "1e-3", "--disc-ndf", "8", "--perceptual-weight", "0", "--num-workers", "0",
                            "--max-steps", "2", "--log-every", "1", "--ckpt-every", "2", "--preview-every", "2",
                            "--results-dir", str(results), "--exp-name", "run"]
    two_nodes(args(tmp_path / "two-nodes"), net)
    run_script(args(tmp_path / "one-node"), nproc=2)
    two = tu.load_checkpoint(str(tmp_path / "two-nodes" / "run" / "checkpoints" / "0000002.pt"))
    one = tu.load_checkpoint(str(tmp_path / "one-node" / "run" / "checkpoints" / "0000002.pt"))
    _same_state(two, one, ("model", "disc"))
    names = lambda d: sorted(os.listdir(d))
    assert names(tmp_path / "two-nodes" / "run") == names(tmp_path / "one-node" / "run")
    assert (tmp_path / "two-nodes" / "run" / "metrics.jsonl").read_text().count('"loss"') == 2
