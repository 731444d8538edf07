#!/usr/bin/env bash
# SmolLM2-135M-Instruct on GSM8K, on a CPU: zero-shot eval -> SFT -> eval -> GRPO -> eval.
#
#   GSM8K_DIR=path/with/train+test.jsonl MODEL=models/smollm2 RUNS=runs/smollm2-gsm8k \
#     bash examples/recipes/smollm2_gsm8k.sh            # every stage, in order
#   bash examples/recipes/smollm2_gsm8k.sh sft eval-sft  # only these stages
#
# A stage that finished (its summary.json or final/ exists) is skipped, so rerunning the
# script after an interruption continues where it stopped: a training stage interrupted
# mid-way resumes from its newest checkpoint-N/ (--resume), an evaluation starts over.
# Each stage's wall-clock minutes and the machine's mean load average during it go to
# $RUNS/minutes.tsv. docs/recipes.md has the numbers.
set -euo pipefail

GSM8K_DIR=${GSM8K_DIR:?set GSM8K_DIR to the directory holding GSM8K train.jsonl and test.jsonl}
MODEL=${MODEL:-models/smollm2}              # made by: reasontune models get smollm2-135m-instruct --output-dir models/smollm2
RUNS=${RUNS:-runs/smollm2-gsm8k}
THREADS=${THREADS:-1}                       # 1: on a loaded 2-core machine two threads fight (10x slower decoding)
PROMPT=${PROMPT:-$(dirname "$0")/smollm2_r1_zero_chat.prompt}  # SmolLM2's chat template, R1-Zero instruction, ends in <think>
EVAL_QUESTIONS=${EVAL_QUESTIONS:-200}       # the same seeded subset of the test split for every stage
SFT_EXAMPLES=${SFT_EXAMPLES:-640}           # the seeded subset of the training split the SFT steps draw from
SFT_STEPS=${SFT_STEPS-44}                   # optimizer steps of 8 traces (352 traces, 44 minutes at load 8); SFT_STEPS= : one pass over SFT_EXAMPLES
GRPO_STEPS=${GRPO_STEPS:-1}                 # one step: up to 3 draws of 4 questions x 8 samples, 6 minutes at load 4.6
REASONTUNE=${REASONTUNE:-python3 -m reasontune}

mkdir -p "$RUNS"

timed() {  # timed STAGE COMMAND...: runs it; appends "STAGE<TAB>minutes<TAB>mean load average" to minutes.tsv
    local stage=$1; shift
    local start=$SECONDS loads
    loads=$(mktemp)
    echo "== $stage: $*" >&2
    # the machine's 1-minute load average every 20 s: the minutes mean little without it
    ( while true; do cut -d' ' -f1 /proc/loadavg >> "$loads"; sleep 20; done ) &
    local sampler=$! status=0
    "$@" || status=$?  # an interrupted stage still records the minutes it ran
    kill "$sampler"
    python3 -c "import sys; loads = [float(x) for x in open(sys.argv[3]).read().split()]
print(f'{sys.argv[1]}\t{int(sys.argv[2]) / 60:.1f}\t{sum(loads) / len(loads):.1f}')" \
        "$stage" $(( SECONDS - start )) "$loads" >> "$RUNS/minutes.tsv"
    rm -f "$loads"
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

stage_sft() {
    local out=$RUNS/sft
    if [ -d "$out/final" ]; then echo "== sft: done ($out/final)" >&2; return; fi
    # Full fine-tuning: on this CPU it trains as many tokens/s as LoRA rank 16 and its loss falls faster.
    timed sft $REASONTUNE sft --model "$MODEL" --train-data "$GSM8K_DIR/train.jsonl" \
        --max-train-examples "$SFT_EXAMPLES" --prompt-template "$PROMPT" \
        --batch-size 8 --gradient-accumulation-steps 1 --learning-rate 2e-4 --warmup-ratio 0.05 \
        --max-length 512 --eval-examples 0 --save-every 16 --num-threads "$THREADS" \
        ${SFT_STEPS:+--max-steps "$SFT_STEPS"} --output-dir "$out" $(resume_flag "$out")
}

stage_eval_sft() { evaluate sft "$RUNS/sft/final"; }

stage_grpo() {
    local out=$RUNS/grpo
    if [ -d "$out/final" ]; then echo "== grpo: done ($out/final)" >&2; return; fi
    # Strict r1_zero reward (rollouts stop at </answer>); at ~2% accuracy most groups of 8 are
    # all wrong, so dynamic sampling draws up to 3 batches of questions a step and trains only
    # on the groups whose rewards differ.
    timed grpo $REASONTUNE grpo --model "$RUNS/sft/final" --train-data "$GSM8K_DIR/train.jsonl" \
        --prompt-template "$PROMPT" --dynamic-sampling --dynamic-sampling-max-tries 3 \
        --n-grpo-steps "$GRPO_STEPS" --rollout-batch-size 32 --group-size 8 \
        --train-batch-size 32 --gradient-accumulation-steps 4 --learning-rate 2e-5 \
        --sampling-temperature 0.8 --sampling-max-tokens 256 --generation-batch-size 32 --eval-examples 0 --save-every 1 \
        --num-threads "$THREADS" --output-dir "$out" $(resume_flag "$out")
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
