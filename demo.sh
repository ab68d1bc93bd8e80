#!/usr/bin/env bash
# The EQ-VAE paper in miniature: every stage, end to end, on the built-in synthetic data (10 classes, 64 px),
# offline on a CPU. Each step below is one of the stage scripts with flags: copy a line from
# results/demo/report.md (section Commands) and raise the steps / point --data at ImageNet to scale it up.
#
#   bash demo.sh                          # the paper's claims, 3 seeds (about an hour on 2 cores): results/demo/
#   bash demo.sh --quick                  # a handful of steps per stage, one seed (what CI runs), same layout
#   bash demo.sh --study regularizers     # EQ-VAE, scale-eq, VA-VAE's vf, none (35 minutes): results/study/
#   DEMO_DIR=/tmp/d bash demo.sh
#
# 1. Autoencoders: the tiny KL-VAE and VQ-GAN this project trained (assets/, the "pretrained" bases), fine-tuned
#    with the same steps and data for each of 3 seeds: EQ-VAE (the paper's objective) and plain (--eq-prob 0, the
#    paper's Table 6 control); the VQ-GAN with EQ-VAE. (--study regularizers: the KL base with each regulariser.)
# 2. For every autoencoder, on held-out synthetic images and on crops of real photographs (scikit-image's):
#    PSNR / SSIM, equivariance error per rotation and per scale; for the KL ones the intrinsic dimension, latent
#    PCA pictures, power and block-DCT spectra (and, in the study, the alignment with DINOv2).
# 3. DiT and SiT on each KL latent space, MaskGIT on each VQ token space (every fine-tune seed; the study: DiT):
#    same steps, seeds and data; every checkpoint sampled and scored by gFD-probe (the Frechet distance in the
#    features of a small classifier of the synthetic classes, trained here): convergence curves.
# 4. report.md: Table 1 and Table 2 style tables with the spread over seeds, the paper's claims checked seed by
#    seed, figures, and the command behind every number.
#
# A second run reuses every finished step (its output exists); an interrupted training run resumes
# (--resume auto). A failing step stops the demo with "demo: step NAME failed" and the end of its log.
set -euo pipefail
cd "$(dirname "$0")"

QUICK=${DEMO_QUICK:-0}
STUDY=paper
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=1 ;;
        --study) shift; STUDY=${1:-}
                 [[ $STUDY == regularizers || $STUDY == paper ]] || {
                     echo "demo.sh: --study takes 'regularizers' (or 'paper', the default)" >&2; exit 2; } ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "demo.sh: unknown argument $1 (use --quick, --study regularizers, or nothing)" >&2; exit 2 ;;
    esac
    shift
done

D=${DEMO_DIR:-results/$([[ $STUDY == paper ]] && echo demo || echo study)}
PY=${PYTHON:-python3}
# Two cores: one process at a time, each with both threads (set OMP_NUM_THREADS=1 on a shared machine).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-${OMP_NUM_THREADS:-2}}
export PYTHONUNBUFFERED=1

# ---- Scale. Every number is a flag of a stage script; DEMO_<NAME> overrides it.
if [[ $QUICK == 1 ]]; then
    MODE=quick
    FT_STEPS=${DEMO_FT_STEPS:-2}; AE_BATCH=${DEMO_AE_BATCH:-4}; AE_IMAGES=${DEMO_AE_IMAGES:-64}
    GEN_STEPS=${DEMO_GEN_STEPS:-4}; GEN_IMAGES=${DEMO_GEN_IMAGES:-64}; GEN_BATCH=${DEMO_GEN_BATCH:-8}
    NUM_SAMPLES=${DEMO_SAMPLES:-16}; SAMPLING_STEPS=${DEMO_SAMPLING_STEPS:-4}; EVAL_IMAGES=${DEMO_EVAL_IMAGES:-32}
    PROBE_STEPS=${DEMO_PROBE_STEPS:-10}; PROBE_IMAGES=${DEMO_PROBE_IMAGES:-128}; PROBE_REF=${DEMO_PROBE_REF:-100}
    PHOTO_CROPS=${DEMO_PHOTO_CROPS:-2}; LOG_EVERY=1; ID_K=10; SEEDS=(${DEMO_SEEDS:-0})
else
    MODE=full
    FT_STEPS=${DEMO_FT_STEPS:-200}; AE_BATCH=${DEMO_AE_BATCH:-16}; AE_IMAGES=${DEMO_AE_IMAGES:-2048}
    GEN_STEPS=${DEMO_GEN_STEPS:-500}; GEN_IMAGES=${DEMO_GEN_IMAGES:-512}; GEN_BATCH=${DEMO_GEN_BATCH:-16}
    NUM_SAMPLES=${DEMO_SAMPLES:-256}; SAMPLING_STEPS=${DEMO_SAMPLING_STEPS:-50}; EVAL_IMAGES=${DEMO_EVAL_IMAGES:-256}
    if [[ $STUDY == regularizers ]]; then  # 13 DiT runs x 5 checkpoints: half the samples and sampling steps
        NUM_SAMPLES=${DEMO_SAMPLES:-128}; SAMPLING_STEPS=${DEMO_SAMPLING_STEPS:-25}
    fi
    PROBE_STEPS=${DEMO_PROBE_STEPS:-200}; PROBE_IMAGES=${DEMO_PROBE_IMAGES:-2048}; PROBE_REF=${DEMO_PROBE_REF:-1000}
    PHOTO_CROPS=${DEMO_PHOTO_CROPS:-16}; LOG_EVERY=10; ID_K=20; SEEDS=(${DEMO_SEEDS:-0 1 2})
fi
# Generator checkpoints (EMA exports) 5 times per run: the points of the convergence curves.
GEN_CKPT=$(( GEN_STEPS / 5 > 0 ? GEN_STEPS / 5 : 1 ))
FT_PREVIEW=$(( FT_STEPS / 4 > 0 ? FT_STEPS / 4 : 1 ))
# EMA and learning rate for runs this short: the papers' EMA 0.9999 would keep the weights near their initial
# values, and lr 1e-4 (DiT, SiT; batch 256, 400K steps) barely moves a tiny model in a few hundred steps.
GEN_EMA=${DEMO_GEN_EMA:-0.99}; GEN_LR=${DEMO_GEN_LR:-1e-3}

mkdir -p "$D/logs"
LOGS=$D/logs
STEPS_TSV=$D/steps.tsv
START=$SECONDS
cat > "$D/settings.json" <<EOF
{"mode": "$MODE", "study": "$STUDY", "seeds": [$(IFS=,; echo "${SEEDS[*]}")], "ft_steps": $FT_STEPS, "ae_batch": $AE_BATCH, "ae_images": $AE_IMAGES, "gen_steps": $GEN_STEPS, "gen_batch": $GEN_BATCH, "gen_images": $GEN_IMAGES, "num_samples": $NUM_SAMPLES, "sampling_steps": $SAMPLING_STEPS, "eval_images": $EVAL_IMAGES, "probe_steps": $PROBE_STEPS, "gen_ema": $GEN_EMA, "gen_lr": $GEN_LR}
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

echo "demo: $MODE mode, study $STUDY, seeds ${SEEDS[*]}, into $D (OMP_NUM_THREADS=$OMP_NUM_THREADS)"

#################################################################################
#       0. The probe classifier (offline generation metric), real photographs   #
#################################################################################
step probe-train "$D/probe/probe.pt" \
    "$PY" demo.py probe-train --out "$D/probe/probe.pt" --steps "$PROBE_STEPS" --num-images "$PROBE_IMAGES" \
    --num-ref "$PROBE_REF" --seed 0
DATASETS=(synthetic)
if "$PY" -c "import skimage" 2> /dev/null; then
    step photos "$D/photos/astronaut" "$PY" demo.py photos --out "$D/photos" --crops "$PHOTO_CROPS"
    DATASETS+=(photos)
else
    record photos missing 0 "demo.py photos: scikit-image is not installed (pip install scikit-image)"
fi

#################################################################################
#             1. Autoencoders: the shipped bases and their fine-tunes            #
#################################################################################
# The bases are assets/tiny-kl-f8.safetensors and assets/tiny-vq-f8.safetensors (assets/README.md: how they were
# trained); each fine-tune starts from one with its PatchGAN (--init-state), as the official run starts from
# kl-f8. Same steps, data and held-out previews for every fine-tune; the fine-tune seed is 1 + s.
FT=("$PY" finetune_eqvae.py --preset tiny --results-dir "$D/ae" --num-images "$AE_IMAGES"
    --global-batch-size "$AE_BATCH" --max-steps "$FT_STEPS" --ckpt-every "$FT_STEPS" --preview-every "$FT_PREVIEW"
    --val-every "$FT_STEPS" --log-every "$LOG_EVERY" --keep-last 1 --keep-best 0 --resume auto)
declare -A AE_PATH=([kl-base]=assets/tiny-kl-f8.safetensors [vq-base]=assets/tiny-vq-f8.safetensors)
if [[ $STUDY == paper ]]; then
    # EQ-VAE (the official mix), the plain control, and EQ-VAE on the VQ-GAN (tau before quantisation, Sec. 3.3).
    VARIANTS=("kl-eq:--model kl" "kl-plain:--model kl --eq-prob 0" "vq-eq:--model vq")
else
    VARIANTS=("kl-eq:--regularizer eq" "kl-scale-eq:--regularizer scale-eq" "kl-vf:--regularizer vf"
              "kl-none:--regularizer none")
fi
KL_AES=(kl-base); VQ_AES=()
if [[ $STUDY == paper ]]; then VQ_AES=(vq-base); fi
for s in "${SEEDS[@]}"; do
    for v in "${VARIANTS[@]}"; do
        group=${v%%:*}; read -r -a flags <<< "${v#*:}"
        ae=$group-s$s
        export_file=$([[ $group == vq-* ]] && echo vqgan.ckpt || echo eqvae.ckpt)
        step "ae-$ae" "$D/ae/$ae/$export_file" "${FT[@]}" "${flags[@]}" --exp-name "$ae" --global-seed $((1 + s))
        AE_PATH[$ae]=$D/ae/$ae/$export_file
        if [[ $group == vq-* ]]; then VQ_AES+=("$ae"); else KL_AES+=("$ae"); fi
    done
done

#################################################################################
#  2. Autoencoder metrics: PSNR/SSIM, equivariance, ID, latents (and alignment)  #
#################################################################################
# Held-out images: synthetic seed 3 (every training run draws seed 0; the fine-tunes' previews seed 1) and the
# photograph crops. No rFID / LPIPS offline (both need downloaded weights: Inception, VGG16).
for ds in "${DATASETS[@]}"; do
    if [[ $ds == synthetic ]]; then EV=(--data synthetic:3 --num-images "$EVAL_IMAGES");
    else EV=(--data "$D/photos"); fi
    EV+=(--resolution 64 --num-workers 0 --batch-size 64)
    for ae in "${KL_AES[@]}" "${VQ_AES[@]}"; do
        v=${AE_PATH[$ae]}
        png=(); if [[ $ds == synthetic ]]; then png=(--save-png "$D/recon/$ae"); fi
        step_json "recon-$ds-$ae" "$D/eval/$ds/$ae/recon.json" "$PY" evaluate.py recon --vae "$v" "${EV[@]}" \
            --no-fid --no-lpips "${png[@]}"
        # rFID's stand-in on the synthetic classes: the probe's Frechet distance of the reconstructions (a floor
        # under the generators' gFD-probe: their samples go through the same decoder).
        if [[ $ds == synthetic ]]; then
            step_json "rfd-$ae" "$D/eval/$ds/$ae/rfd.json" \
                "$PY" demo.py probe-eval "$D/recon/$ae/recon" --probe "$D/probe/probe.pt"
        fi
        step_json "equivariance-$ds-$ae" "$D/eval/$ds/$ae/equivariance.json" \
            "$PY" evaluate.py equivariance --vae "$v" "${EV[@]}"
    done
done
# Latent pictures and spectra at 128 px (16 x 16 latents: enough positions to show structure); TwoNN at 64 px.
for ae in "${KL_AES[@]}"; do
    v=${AE_PATH[$ae]}
    EV=(--data synthetic:3 --num-images "$EVAL_IMAGES" --num-workers 0 --batch-size 64)
    step_json "id-$ae" "$D/eval/synthetic/$ae/id.json" "$PY" evaluate.py id --vae "$v" "${EV[@]}" --resolution 64 \
        --k "$ID_K"
    step_json "latents-$ae" "$D/eval/synthetic/$ae/latents.json" "$PY" evaluate.py latents --vae "$v" "${EV[@]}" \
        --resolution 128 --pca-scale sigma --out "$D/eval/synthetic/$ae/latents"
    if [[ $STUDY == regularizers ]]; then
        step_json "alignment-$ae" "$D/eval/synthetic/$ae/alignment.json" "$PY" evaluate.py alignment --preset tiny \
            --vae "$v" "${EV[@]}" --resolution 64
    fi
done

#################################################################################
#        3. Generators on each latent space, sampled at every checkpoint         #
#################################################################################
# Same steps, batch, seed and images on every latent space; latents / tokens cached once per autoencoder.
GEN=(--data synthetic --num-images "$GEN_IMAGES" --global-batch-size "$GEN_BATCH" --max-steps "$GEN_STEPS"
     --ckpt-every "$GEN_CKPT" --log-every "$LOG_EVERY" --lr "$GEN_LR" --ema-decay "$GEN_EMA" --global-seed 0
     --num-workers 0 --resume auto --results-dir "$D/gen")
gen_aes() {  # gen_aes KIND: the autoencoders a generator of KIND (kl|vq) trains on: the base and every fine-tune
    local kind=$1 ae
    for ae in $([[ $kind == kl ]] && echo "${KL_AES[@]}" || echo "${VQ_AES[@]}"); do
        if [[ $ae == *-base ]]; then echo "$ae"; continue; fi
        for s in "${SEEDS[@]}"; do if [[ $ae == *-s$s ]]; then echo "$ae"; fi; done
    done
}
declare -A FAMILY=([dit]="train_dit.py DiT-T/2 kl" [sit]="train_sit.py SiT-T/2 kl" [maskgit]="train_maskgit.py maskgit-tiny vq")
GENS=(dit sit maskgit)
if [[ $STUDY == regularizers ]]; then GENS=(dit); fi
for gen in "${GENS[@]}"; do
    read -r script model kind <<< "${FAMILY[$gen]}"
    for ae in $(gen_aes "$kind"); do
        if [[ $kind == kl ]]; then ae_flags=(--vae "${AE_PATH[$ae]}" --cache-latents "$D/cache/latents-$ae");
        else ae_flags=(--vqgan "${AE_PATH[$ae]}" --cache "$D/cache/tokens-$ae" --resolution 64); fi
        step "train-$gen-$ae" "$D/gen/$gen-$ae/ema/$(printf '%07d' "$GEN_STEPS").pt" \
            "$PY" "$script" --preset tiny --model "$model" "${ae_flags[@]}" --exp-name "$gen-$ae" "${GEN[@]}"
    done
done

# Convergence curves (curves.py): every EMA export sampled with the family's sampler (no guidance, as the
# paper's Table 1 and 2 gFIDs; DiT: SAMPLING_STEPS respaced ancestral steps, SiT: Heun ODE with as many model
# calls, MaskGIT: its 8 reveal steps), gFD-probe per point; the last point is the Table 2 number.
declare -A SAMPLER_FLAGS=([dit]="--num-sampling-steps $SAMPLING_STEPS"
                          [sit]="--mode ode --sampler heun --num-sampling-steps $(( SAMPLING_STEPS / 2 > 0 ? SAMPLING_STEPS / 2 : 1 ))"
                          [maskgit]="--num-sampling-steps 8")
for gen in "${GENS[@]}"; do
    read -r script model kind <<< "${FAMILY[$gen]}"
    runs=(); for ae in $(gen_aes "$kind"); do runs+=("$D/gen/$gen-$ae"); done
    read -r -a sampler <<< "${SAMPLER_FLAGS[$gen]}"
    step_json "curves-$gen" "$D/curves/$gen.out.json" "$PY" curves.py "${runs[@]}" --metric probe \
        --probe "$D/probe/probe.pt" --num-samples "$NUM_SAMPLES" --out "$D/curves/$gen" -- --preset tiny \
        --image-size 64 --num-classes 10 --per-proc-batch-size 64 --cfg-scale 1.0 --global-seed 0 "${sampler[@]}"
done

#################################################################################
#                                 4. The report                                 #
#################################################################################
ELAPSED=$((SECONDS - START))
rm -f "$D/report.json.new"   # the report is always rewritten: it reads whatever the steps above left
step_json report "$D/report.json.new" "$PY" demo.py report --demo-dir "$D" --elapsed "$ELAPSED"
mv "$D/report.json.new" "$D/report.json"
echo "demo: done in $((SECONDS - START)) s ($MODE, study $STUDY); report: $D/report.md"
