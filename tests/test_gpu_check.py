"""bench/gpu_check.sh, the prepared GPU check, keeps working: its --cpu-smoke run (the same code at toy sizes on
the CPU) finishes, every stage reports a row, and none fails."""
import os
import subprocess

from helpers import ROOT


def test_gpu_check_cpu_smoke():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| stage |"):]
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["EQ-VAE fine-tune fp32", "EQ-VAE fine-tune fp32 NHWC+bench", "EQ-VAE fine-tune fp16", "DiT-T/2", "DiT-T/2 compiled", "SiT-T/2 + REPA",
                     "maskgit-tiny", "sample.py DiT-T/2", "FID features"], names
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[4]) > 0, r  # ms/step, img/s, TFLOP
    assert "FAILED" not in out.stdout and "matmul peak" in out.stdout
