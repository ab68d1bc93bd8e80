#!/usr/bin/env bash
# The EQ-VAE paper in miniature: every stage, end to end, on the built-in synthetic data (10 classes, 64 px),
# offline on a CPU, in minutes. Each step below is one of the stage scripts with flags: copy a line from
# results/demo/report.md (section Commands) and raise the steps / point --data at ImageNet to scale it up.
#
#   bash demo.sh              # the full demo (<= 20 minutes on 2 cores), results in results/demo/
#   bash demo.sh --quick      # a handful of steps per stage (what CI runs), same layout
#   DEMO_DIR=/tmp/d bash demo.sh
#
# 1. Autoencoders: a tiny KL-VAE trained from scratch (the "pretrained" base), then fine-tuned two ways for the
#    same steps and seed: EQ-VAE (--eq-prob 0.5) and plain (--eq-prob 0, the paper's Table 6 control). The same
#    for a tiny VQ-GAN (base, EQ-VAE).
# 2. For every autoencoder: PSNR / SSIM, equivariance error (rotation, scale); for the KL ones also the intrinsic
#    dimension and the latent PCA pictures and power spectra.
# 3. DiT and SiT on each KL latent space, MaskGIT on each VQ token space: same steps, seeds and data; samples;
#    gFD-probe (Frechet distance in the features of a small classifier of the synthetic classes, trained here)
#    and that classifier's accuracy on the class each sample was asked for.
# 4. results/demo/report.md: Table 1 and Table 2 style tables, figures, and the command behind every number.
#
# A second run reuses every finished step (its output exists); an interrupted training run resumes
# (--resume auto). A failing step stops the demo with "demo: step NAME failed" and the end of its log.
set -euo pipefail
cd "$(dirname "$0")"

QUICK=${DEMO_QUICK:-0}
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "demo.sh: unknown argument $arg (use --quick or nothing)" >&2; exit 2 ;;
    esac
done

D=${DEMO_DIR:-results/demo}
PY=${PYTHON:-python3}
# Two cores: one process at a time, each with both threads (set OMP_NUM_THREADS=1 on a shared machine).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-${OMP_NUM_THREADS:-2}}
export PYTHONUNBUFFERED=1

# ---- Scale. Every number is a flag of a stage script; DEMO_<NAME> overrides it.
if [[ $QUICK == 1 ]]; then
    MODE=quick
    AE_STEPS=${DEMO_AE_STEPS:-4}; FT_STEPS=${DEMO_FT_STEPS:-2}; AE_BATCH=${DEMO_AE_BATCH:-4}
    AE_IMAGES=${DEMO_AE_IMAGES:-64}; GEN_STEPS=${DEMO_GEN_STEPS:-4}; GEN_IMAGES=${DEMO_GEN_IMAGES:-64}
    GEN_BATCH=${DEMO_GEN_BATCH:-8}; NUM_SAMPLES=${DEMO_SAMPLES:-16}; SAMPLING_STEPS=${DEMO_SAMPLING_STEPS:-4}
    EVAL_IMAGES=${DEMO_EVAL_IMAGES:-32}; PROBE_STEPS=${DEMO_PROBE_STEPS:-10}; PROBE_IMAGES=${DEMO_PROBE_IMAGES:-128}
    PROBE_REF=${DEMO_PROBE_REF:-100}; LOG_EVERY=1; ID_K=10
else
    MODE=full
    AE_STEPS=${DEMO_AE_STEPS:-400}; FT_STEPS=${DEMO_FT_STEPS:-300}; AE_BATCH=${DEMO_AE_BATCH:-8}
    AE_IMAGES=${DEMO_AE_IMAGES:-1024}; GEN_STEPS=${DEMO_GEN_STEPS:-500}; GEN_IMAGES=${DEMO_GEN_IMAGES:-512}
    GEN_BATCH=${DEMO_GEN_BATCH:-16}; NUM_SAMPLES=${DEMO_SAMPLES:-256}; SAMPLING_STEPS=${DEMO_SAMPLING_STEPS:-50}
    EVAL_IMAGES=${DEMO_EVAL_IMAGES:-256}; PROBE_STEPS=${DEMO_PROBE_STEPS:-200}; PROBE_IMAGES=${DEMO_PROBE_IMAGES:-2048}
    PROBE_REF=${DEMO_PROBE_REF:-1000}; LOG_EVERY=10; ID_K=20
fi
SEED=${DEMO_SEED:-0}
# Previews (Figure 2 view) and the equivariance error on a fixed batch, 4 times per run: its curve over training.
AE_PREVIEW=$(( AE_STEPS / 4 > 0 ? AE_STEPS / 4 : 1 )); FT_PREVIEW=$(( FT_STEPS / 4 > 0 ? FT_STEPS / 4 : 1 ))
# EMA and learning rate for runs this short: the papers' EMA 0.9999 would keep the weights near their initial
# values, and lr 1e-4 (DiT, SiT; batch 256, 400K steps) barely moves a tiny model in a few hundred steps.
GEN_EMA=${DEMO_GEN_EMA:-0.99}; GEN_LR=${DEMO_GEN_LR:-1e-3}

mkdir -p "$D/logs"
LOGS=$D/logs
STEPS_TSV=$D/steps.tsv
START=$SECONDS
cat > "$D/settings.json" <<EOF
{"mode": "$MODE", "ae_steps": $AE_STEPS, "ft_steps": $FT_STEPS, "ae_batch": $AE_BATCH, "ae_images": $AE_IMAGES, "gen_steps": $GEN_STEPS, "gen_batch": $GEN_BATCH, "gen_images": $GEN_IMAGES, "num_samples": $NUM_SAMPLES, "sampling_steps": $SAMPLING_STEPS, "eval_images": $EVAL_IMAGES, "probe_steps": $PROBE_STEPS, "seed": $SEED, "gen_ema": $GEN_EMA, "gen_lr": $GEN_LR}
EOF

# ---- The step runner.
quote() { printf '%q ' "$@" | sed 's/ $//'; }
record() {  # record NAME STATUS SECONDS COMMAND: one line of steps.tsv (the report's Commands table)
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS_TSV"
}
fail() {  # fail NAME LOG [WHY]
    if [[ -f $2 ]]; then tail -n 25 "$2" >&2; fi
    echo "demo: step $1 failed${3:+: $3} (log: $2)" >&2
    exit 1
}
step() {  # step NAME MARKER CMD...: run CMD unless MARKER (a path or glob) exists; on failure stop the demo
    local name=$1 marker=$2; shift 2
    local cmd; cmd=$(quote "$@")
    if compgen -G "$marker" > /dev/null; then
        echo "demo: [$name] reused: $marker exists"
        record "$name" reused 0 "$cmd"
        return 0
    fi
    echo "demo: [$name] $cmd"
    local t0=$SECONDS
    "$@" > "$LOGS/$name.log" 2>&1 || fail "$name" "$LOGS/$name.log"
    compgen -G "$marker" > /dev/null || fail "$name" "$LOGS/$name.log" "it exited 0 but did not write $marker"
    record "$name" ran $((SECONDS - t0)) "$cmd"
}
step_json() {  # step_json NAME OUT.json CMD...: as step, the command's JSON stdout kept in OUT.json
    local name=$1 out=$2; shift 2
    local cmd; cmd="$(quote "$@") > $(quote "$out")"
    if [[ -e $out ]]; then
        echo "demo: [$name] reused: $out exists"
        record "$name" reused 0 "$cmd"
        return 0
    fi
    echo "demo: [$name] $cmd"
    mkdir -p "$(dirname "$out")"
    local t0=$SECONDS
    "$@" > "$out.tmp" 2> "$LOGS/$name.log" || fail "$name" "$LOGS/$name.log"
    mv "$out.tmp" "$out"
    record "$name" ran $((SECONDS - t0)) "$cmd"
}
last_ckpt() { echo "$1/checkpoints/$(printf '%07d' "$2").pt"; }

# The demo's own commands (demo.py): probe-train, probe-eval, report.
EVAL_DEMO=("$PY" demo.py)

echo "demo: $MODE mode into $D (OMP_NUM_THREADS=$OMP_NUM_THREADS)"

#################################################################################
#                  0. The probe classifier (offline generation metric)          #
#################################################################################
step probe-train "$D/probe/probe.pt" \
    "${EVAL_DEMO[@]}" probe-train --out "$D/probe/probe.pt" --steps "$PROBE_STEPS" --num-images "$PROBE_IMAGES" \
    --num-ref "$PROBE_REF" --seed "$SEED"

#################################################################################
#           1. Autoencoders: base from scratch, EQ-VAE and plain fine-tunes      #
#################################################################################
# Common flags: tiny preset (64 px synthetic, no LPIPS: VGG16 weights are a download), batch, logging.
FT=("$PY" finetune_eqvae.py --preset tiny --results-dir "$D/ae" --num-images "$AE_IMAGES"
    --global-batch-size "$AE_BATCH" --log-every "$LOG_EVERY" --keep-last 1 --resume auto)

# The "pretrained" bases: plain reconstruction training from scratch (no tau), the GAN not yet on (SD-VAE's own
# training starts it late, at step 50001; the fine-tunes below start it at once, as EQ-VAE's config does).
step ae-kl-base "$D/ae/kl-base/eqvae.ckpt" \
    "${FT[@]}" --model kl --init none --config tiny --exp-name kl-base --eq-prob 0 --lowres-prob 0 \
    --max-steps "$AE_STEPS" --disc-start "$AE_STEPS" --ckpt-every "$AE_STEPS" --preview-every "$AE_PREVIEW" \
    --global-seed "$SEED"
# EQ-VAE fine-tune (the paper's objective, official mix) and the plain control: same steps, seed, data, lr.
step ae-kl-eq "$D/ae/kl-eq/eqvae.ckpt" \
    "${FT[@]}" --model kl --init "$D/ae/kl-base/eqvae.ckpt" --exp-name kl-eq --eq-prob 0.5 \
    --max-steps "$FT_STEPS" --ckpt-every "$FT_STEPS" --preview-every "$FT_PREVIEW" --global-seed $((SEED + 1))
step ae-kl-plain "$D/ae/kl-plain/eqvae.ckpt" \
    "${FT[@]}" --model kl --init "$D/ae/kl-base/eqvae.ckpt" --exp-name kl-plain --eq-prob 0 --lowres-prob 0 \
    --max-steps "$FT_STEPS" --ckpt-every "$FT_STEPS" --preview-every "$FT_PREVIEW" --global-seed $((SEED + 1))
# VQ-GAN: base from scratch, then EQ-VAE (tau on the continuous latent, before quantisation, Sec. 3.3).
step ae-vq-base "$D/ae/vq-base/vqgan.ckpt" \
    "${FT[@]}" --model vq --init none --config tiny --exp-name vq-base --eq-prob 0 --lowres-prob 0 \
    --max-steps "$AE_STEPS" --disc-start "$AE_STEPS" --ckpt-every "$AE_STEPS" --preview-every "$AE_PREVIEW" \
    --global-seed "$SEED"
step ae-vq-eq "$D/ae/vq-eq/vqgan.ckpt" \
    "${FT[@]}" --model vq --init "$D/ae/vq-base/vqgan.ckpt" --exp-name vq-eq --eq-prob 0.5 \
    --max-steps "$FT_STEPS" --ckpt-every "$FT_STEPS" --preview-every "$FT_PREVIEW" --global-seed $((SEED + 1))

declare -A AE_PATH=([kl-base]="$D/ae/kl-base/eqvae.ckpt" [kl-plain]="$D/ae/kl-plain/eqvae.ckpt"
                    [kl-eq]="$D/ae/kl-eq/eqvae.ckpt" [vq-base]="$D/ae/vq-base/vqgan.ckpt"
                    [vq-eq]="$D/ae/vq-eq/vqgan.ckpt")
KL_AES=(kl-base kl-plain kl-eq)
VQ_AES=(vq-base vq-eq)

#################################################################################
#     2. Autoencoder metrics: PSNR/SSIM, equivariance, intrinsic dim., latents   #
#################################################################################
# Held-out images: the synthetic set is a pure function of (seed, index); --num-images takes the first N.
EV=(--data synthetic --resolution 64 --num-images "$EVAL_IMAGES" --num-workers 0 --batch-size 64)
for ae in "${KL_AES[@]}" "${VQ_AES[@]}"; do
    v=${AE_PATH[$ae]}
    # No rFID / LPIPS: both need downloaded weights (Inception, VGG16); PSNR and SSIM need none.
    step_json "recon-$ae" "$D/eval/$ae/recon.json" "$PY" evaluate.py recon --vae "$v" "${EV[@]}" --no-fid --no-lpips
    step_json "equivariance-$ae" "$D/eval/$ae/equivariance.json" "$PY" evaluate.py equivariance --vae "$v" "${EV[@]}"
done
for ae in "${KL_AES[@]}"; do
    v=${AE_PATH[$ae]}
    step_json "id-$ae" "$D/eval/$ae/id.json" "$PY" evaluate.py id --vae "$v" "${EV[@]}" --k "$ID_K"
    step_json "latents-$ae" "$D/eval/$ae/latents.json" \
        "$PY" evaluate.py latents --vae "$v" "${EV[@]}" --out "$D/eval/$ae/latents"
done

#################################################################################
#      3. Generators on each latent space: DiT, SiT (KL), MaskGIT (VQ)           #
#################################################################################
# Same steps, batch, seed and images on every latent space; latents / tokens cached once per autoencoder.
GEN=(--data synthetic --num-images "$GEN_IMAGES" --global-batch-size "$GEN_BATCH" --max-steps "$GEN_STEPS"
     --ckpt-every "$GEN_STEPS" --log-every "$LOG_EVERY" --lr "$GEN_LR" --ema-decay "$GEN_EMA" --global-seed "$SEED"
     --num-workers 0 --resume auto)
# Sampling without guidance (--cfg-scale 1), as the paper's Table 1 and 2 gFIDs. DiT: ancestral sampling over
# SAMPLING_STEPS respaced steps; SiT: Heun ODE with as many model calls; MaskGIT: its 8 reveal steps.
SAMPLE=(--preset tiny --image-size 64 --num-classes 10 --num-samples "$NUM_SAMPLES" --per-proc-batch-size 64
        --cfg-scale 1.0 --global-seed "$SEED")
declare -A SAMPLER_FLAGS=([dit]="--num-sampling-steps $SAMPLING_STEPS"
                          [sit]="--mode ode --sampler heun --num-sampling-steps $(( SAMPLING_STEPS / 2 > 0 ? SAMPLING_STEPS / 2 : 1 ))"
                          [maskgit]="--num-sampling-steps 8")
SAMPLE_NPZ=()
for ae in "${KL_AES[@]}"; do
    v=${AE_PATH[$ae]}
    step "train-dit-$ae" "$(last_ckpt "$D/gen/dit-$ae" "$GEN_STEPS")" \
        "$PY" train_dit.py --preset tiny --model DiT-T/2 --vae "$v" --results-dir "$D/gen" --exp-name "dit-$ae" \
        --cache-latents "$D/cache/latents-$ae" "${GEN[@]}"
    step "train-sit-$ae" "$(last_ckpt "$D/gen/sit-$ae" "$GEN_STEPS")" \
        "$PY" train_sit.py --preset tiny --model SiT-T/2 --vae "$v" --results-dir "$D/gen" --exp-name "sit-$ae" \
        --cache-latents "$D/cache/latents-$ae" "${GEN[@]}"
done
for ae in "${VQ_AES[@]}"; do
    step "train-maskgit-$ae" "$(last_ckpt "$D/gen/maskgit-$ae" "$GEN_STEPS")" \
        "$PY" train_maskgit.py --preset tiny --model maskgit-tiny --vqgan "${AE_PATH[$ae]}" --results-dir "$D/gen" \
        --exp-name "maskgit-$ae" --cache "$D/cache/tokens-$ae" --resolution 64 "${GEN[@]}"
done

# Sampling (sample.py), one folder per run; the .npz (arr_0 images, arr_1 labels) feeds the probe.
for pair in dit:DiT-T/2 sit:SiT-T/2 maskgit:maskgit-tiny; do
    gen=${pair%%:*}; model=${pair#*:}
    if [[ $gen == maskgit ]]; then aes=("${VQ_AES[@]}"); else aes=("${KL_AES[@]}"); fi
    for ae in "${aes[@]}"; do
        out=$D/samples/$gen-$ae
        step "sample-$gen-$ae" "$out/*.npz" \
            "$PY" sample.py --model "$model" --ckpt "$(last_ckpt "$D/gen/$gen-$ae" "$GEN_STEPS")" --vae "${AE_PATH[$ae]}" \
            --sample-dir "$out" "${SAMPLE[@]}" ${SAMPLER_FLAGS[$gen]}
        SAMPLE_NPZ+=("$(ls "$out"/*.npz | head -n 1)")
    done
done

#################################################################################
#                     4. Generation metric and the report                       #
#################################################################################
rm -f "$D/eval/gen.json"   # cheap, and its inputs may have grown since the last run: always recomputed
step_json probe-eval "$D/eval/gen.json" "${EVAL_DEMO[@]}" probe-eval "${SAMPLE_NPZ[@]}" --probe "$D/probe/probe.pt"
ELAPSED=$((SECONDS - START))
rm -f "$D/report.json.new"   # the report is always rewritten: it reads whatever the steps above left
step_json report "$D/report.json.new" "${EVAL_DEMO[@]}" report --demo-dir "$D" --elapsed "$ELAPSED"
mv "$D/report.json.new" "$D/report.json"
echo "demo: done in $((SECONDS - START)) s ($MODE); report: $D/report.md"
