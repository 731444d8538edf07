#!/usr/bin/env bash
# SmolLM2-135M-Instruct on GSM8K, on a CPU: zero-shot eval -> traces -> SFT -> eval -> GRPO -> eval.
#
#   GSM8K_DIR=path/with/train+test.jsonl MODEL=models/smollm2 RUNS=runs/smollm2-gsm8k \
#     bash examples/recipes/smollm2_gsm8k.sh            # every stage, in order
#   bash examples/recipes/smollm2_gsm8k.sh sft eval-sft  # only these stages
#
# A stage that finished (its summary.json or final/ exists) is skipped, so rerunning the
# script after an interruption continues where it stopped: a training stage interrupted
# mid-way resumes from its newest checkpoint-N/ (--resume), an evaluation starts over. Only the two
# newest checkpoints are kept (--save-total-limit 2): each holds the weights and AdamW's state, 2.2 GB
# for SmolLM2-135M in float32, and the 20 of one 160-step SFT run took 43 GB.
# Each stage's wall-clock minutes, the machine's mean load average during it and the CPU minutes
# (user + system) of its process go to $RUNS/minutes.tsv. docs/recipes.md has the numbers.
set -euo pipefail

GSM8K_DIR=${GSM8K_DIR:?set GSM8K_DIR to the directory holding GSM8K train.jsonl and test.jsonl}
MODEL=${MODEL:-models/smollm2}              # made by: reasontune models get smollm2-135m-instruct --output-dir models/smollm2
RUNS=${RUNS:-runs/smollm2-gsm8k}
THREADS=${THREADS:-1}                       # 1: on a loaded 2-core machine two threads fight (10x slower decoding)
PROMPT=${PROMPT:-$(dirname "$0")/smollm2_r1_zero_chat.prompt}  # SmolLM2's chat template, R1-Zero instruction, ends in <think>
EVAL_QUESTIONS=${EVAL_QUESTIONS:-200}       # the same seeded subset of the test split for every stage
# SFT_TRACES=compact (the default): the solutions' equations only (compact_traces.py; 4 a step, lr
# 1e-4, 160 steps: 99.5% formatted and 6.0% right on the 200 questions, docs/recipes.md); full:
# GSM8K's solutions without their <<…>> annotations (an earlier run: 8 a step, lr 2e-4, 44 steps).
SFT_TRACES=${SFT_TRACES:-compact}
if [ "$SFT_TRACES" = compact ]; then
    SFT_EXAMPLES=${SFT_EXAMPLES:-1000}; SFT_STEPS=${SFT_STEPS-160}; SFT_BATCH=${SFT_BATCH:-4}; SFT_LR=${SFT_LR:-1e-4}; SFT_SAVE=16
else
    SFT_EXAMPLES=${SFT_EXAMPLES:-640}; SFT_STEPS=${SFT_STEPS-44}; SFT_BATCH=${SFT_BATCH:-8}; SFT_LR=${SFT_LR:-2e-4}; SFT_SAVE=16
fi                                          # SFT_EXAMPLES: the seeded training subset; SFT_STEPS= : one pass over it
RL_QUESTIONS=${RL_QUESTIONS:-easy}          # easy: GSM8K's one- and two-step training questions (2,674); all: its training split
GRPO_STEPS=${GRPO_STEPS:-4}                 # each up to 3 draws of GRPO_QUESTIONS x GRPO_GROUP samples: 11.7 minutes for 4 at load 3
GRPO_QUESTIONS=${GRPO_QUESTIONS:-4}         # questions a draw; GRPO_GROUP samples each
GRPO_GROUP=${GRPO_GROUP:-16}
GRPO_LR=${GRPO_LR:-1e-5}
# dr_grpo: a constant per-token weight (sum over 256), so a long unformatted rollout weighs what a short one does;
# with the default sequence mean two steps at 2e-5 took the format rate from 97% to 82% (docs/recipes.md)
GRPO_RECIPE=${GRPO_RECIPE-dr_grpo}
GRPO_KL=${GRPO_KL:-0.05}                    # k3 KL to the SFT weights (a reference copy of the model is kept)
REASONTUNE=${REASONTUNE:-python3 -m reasontune}

mkdir -p "$RUNS"

cpu_seconds() {  # cpu_seconds FILE: writes the user + system CPU seconds of this shell's finished children
    times > "$1"   # in this shell, not in a $(...) subshell, whose children are not the stage's
    python3 -c "import re, sys
line = open(sys.argv[1]).read().splitlines()[1]
print(sum(60 * float(m) + float(s) for m, s in re.findall(r'(\d+)m([\d.]+)s', line)))" "$1" > "$1.sum"
}

timed() {  # timed STAGE COMMAND...: runs it; appends "STAGE<TAB>minutes<TAB>mean load<TAB>CPU minutes" to minutes.tsv
    local stage=$1; shift
    local start=$SECONDS loads
    loads=$(mktemp)
    echo "== $stage: $*" >&2
    # the machine's 1-minute load average every 20 s: the minutes mean little without it
    ( while true; do cut -d' ' -f1 /proc/loadavg >> "$loads"; sleep 20; done ) &
    local sampler=$! status=0 cpu_before
    cpu_seconds "$loads.cpu"; cpu_before=$(cat "$loads.cpu.sum")
    "$@" || status=$?  # an interrupted stage still records the minutes it ran
    kill "$sampler"
    cpu_seconds "$loads.cpu"
    python3 -c "import sys; loads = [float(x) for x in open(sys.argv[3]).read().split()] or [0.0]
cpu = (float(sys.argv[5]) - float(sys.argv[4])) / 60
print(f'{sys.argv[1]}\t{int(sys.argv[2]) / 60:.1f}\t{sum(loads) / len(loads):.1f}\t{cpu:.1f}')" \
        "$stage" $(( SECONDS - start )) "$loads" "$cpu_before" "$(cat "$loads.cpu.sum")" >> "$RUNS/minutes.tsv"
    rm -f "$loads" "$loads.cpu" "$loads.cpu.sum"
    return "$status"
}

evaluate() {  # evaluate NAME MODEL_DIR
    local out=$RUNS/eval-$1
    if [ -f "$out/summary.json" ]; then echo "== eval-$1: done ($out)" >&2; return; fi
    timed "eval-$1" $REASONTUNE eval --model "$2" --data "$GSM8K_DIR/test.jsonl" \
        --max-examples "$EVAL_QUESTIONS" --seed 0 --prompt-template "$PROMPT" \
        --eval-max-new-tokens 256 --generation-batch-size 100 --num-threads "$THREADS" --output-dir "$out"
}

resume_flag() {  # --resume when the run directory already holds a run
    if [ -f "$1/config.json" ]; then echo --resume; fi
}

stage_zero_shot() { evaluate zero-shot "$MODEL"; }

stage_traces() {  # compact R1-Zero traces (the solutions' equations only) and the one-/two-step questions for RL
    mkdir -p "$RUNS/data"
    [ -f "$RUNS/data/train_compact.jsonl" ] || python3 "$(dirname "$0")/compact_traces.py" \
        "$GSM8K_DIR/train.jsonl" "$RUNS/data/train_compact.jsonl" --prompt-template "$PROMPT"
    [ -f "$RUNS/data/train_easy.jsonl" ] || python3 "$(dirname "$0")/compact_traces.py" \
        "$GSM8K_DIR/train.jsonl" "$RUNS/data/train_easy.jsonl" --prompt-template "$PROMPT" --max-equations 2
}

sft_data() {  # the SFT data flags of SFT_TRACES (compact records carry prompts rendered with $PROMPT)
    if [ "$SFT_TRACES" = compact ]; then echo --train-data "$RUNS/data/train_compact.jsonl"
    else echo --train-data "$GSM8K_DIR/train.jsonl" --prompt-template "$PROMPT"; fi
}

rl_data() {  # the RL data flags of RL_QUESTIONS
    if [ "$RL_QUESTIONS" = easy ]; then echo --train-data "$RUNS/data/train_easy.jsonl"
    else echo --train-data "$GSM8K_DIR/train.jsonl" --prompt-template "$PROMPT"; fi
}

stage_sft() {
    local out=$RUNS/sft
    if [ -d "$out/final" ]; then echo "== sft: done ($out/final)" >&2; return; fi
    stage_traces
    # Full fine-tuning: on this CPU it trains as many tokens/s as LoRA rank 16 on every layer, and
    # per wall-clock second its loss falls faster than LoRA's on the top 8 layers (docs/recipes.md).
    timed sft $REASONTUNE sft --model "$MODEL" $(sft_data) --max-train-examples "$SFT_EXAMPLES" \
        --batch-size "$SFT_BATCH" --gradient-accumulation-steps 1 --learning-rate "$SFT_LR" --warmup-ratio 0.05 \
        --max-length 512 --eval-examples 0 --save-every "$SFT_SAVE" --save-total-limit 2 --num-threads "$THREADS" \
        ${SFT_STEPS:+--max-steps "$SFT_STEPS"} --output-dir "$out" $(resume_flag "$out")
}

stage_eval_sft() { evaluate sft "$RUNS/sft/final"; }

stage_grpo() {
    local out=$RUNS/grpo
    if [ -d "$out/final" ]; then echo "== grpo: done ($out/final)" >&2; return; fi
    stage_traces
    # Strict r1_zero reward (rollouts stop at </answer>); at ~1% accuracy most groups of 8 are
    # all wrong, so dynamic sampling draws up to 3 batches of questions a step and trains only
    # on the groups whose rewards differ.
    timed grpo $REASONTUNE grpo --model "$RUNS/sft/final" $(rl_data) \
        --dynamic-sampling --dynamic-sampling-max-tries 3 \
        --n-grpo-steps "$GRPO_STEPS" --rollout-batch-size $(( GRPO_QUESTIONS * GRPO_GROUP )) --group-size "$GRPO_GROUP" \
        --train-batch-size $(( GRPO_QUESTIONS * GRPO_GROUP )) --gradient-accumulation-steps "$GRPO_QUESTIONS" \
        --learning-rate "$GRPO_LR" ${GRPO_RECIPE:+--recipe "$GRPO_RECIPE"} --kl-coef "$GRPO_KL" \
        --sampling-temperature 0.8 --sampling-max-tokens 256 --generation-batch-size $(( GRPO_QUESTIONS * GRPO_GROUP )) \
        --eval-examples 0 --save-every 1 --save-total-limit 2 --num-threads "$THREADS" --output-dir "$out" $(resume_flag "$out")
}

stage_eval_grpo() { evaluate grpo "$RUNS/grpo/final"; }

stage_compare() {  # paired comparisons of consecutive stages, then the table of docs/recipes.md
    $REASONTUNE compare "$RUNS/eval-zero-shot" "$RUNS/eval-sft" --labels zero-shot sft --metrics pass \
        --output-dir "$RUNS/compare-zero-shot-sft"
    if [ -f "$RUNS/eval-grpo/summary.json" ]; then
        $REASONTUNE compare "$RUNS/eval-sft" "$RUNS/eval-grpo" --labels sft grpo --metrics pass \
            --output-dir "$RUNS/compare-sft-grpo"
    fi
    python3 "$(dirname "$0")/recipe_table.py" "$RUNS"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(zero-shot sft eval-sft grpo eval-grpo compare)
for stage in "${stages[@]}"; do
    "stage_${stage//-/_}"
done
