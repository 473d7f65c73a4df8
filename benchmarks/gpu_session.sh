#!/bin/sh
# The prepared run for a lent GPU machine: the routing benchmark (issue 4), then short real
# training runs on CIFAR-10 that exercise the CUDA training path (bf16 autocast,
# channels_last, the device-resident loader, fused and sparse routing) and measure images/s.
#
# usage (from the project root):
#   sh benchmarks/gpu_session.sh [--device cuda|cpu] [--data-dir DIR] [--compile] [--train-step]
#
#   --device    cuda (default) or cpu (a dry run of the same steps, for testing the script)
#   --data-dir  a folder holding cifar-10-batches-bin/; without it the training runs are skipped
#               (the routing benchmark needs no data)
#   --compile   afterwards, run the routing benchmark again with torch.compile
#   --train-step  last, benchmarks/train_step.py (the trainer against a plain loop, issue 14);
#               on the data of --data-dir, else on synthetic images
#
# Everything lands in $OUT (default: out/gpu_session), at most 8 files, none in subfolders:
#   env.txt                     machine, GPU, torch, git commit
#   routing_<device>.json       benchmarks/routing.py's JSON (rewritten after every part)
#   routing.log                 its output (Markdown table at the end)
#   train.log                   one JSON summary line per training run, plus its tail on failure
#                               (--train-step appends train_step.py's table, then its JSON on one line)
#   train_<name>.jsonl          metrics.jsonl of each training run (loss, images/s, routing)
#   routing_<device>_compiled.json   with --compile
#
# Each step has its own time limit (seconds; environment overrides), so that one slow step
# cannot use up the others' time: ROUTING_S (default 270), TRAIN_S per run (default 75),
# COMPILE_S (default 240), TRAIN_STEP_S (default 240). ROUTING_ARGS adds options to the
# routing benchmark (e.g. "--quick"), TRAIN_STEP_ARGS to train_step.py (e.g. "--repeats 3");
# TRAIN_STEPS (default 300) and TRAIN_RUNS (default "reset38 resnet38 t2_r7_gst": config
# names) shape the training runs. A step that fails or times out is recorded and the
# script goes on; the exit status is the number of failed steps.
#
# On the lent machine no package is installed from this checkout: the script runs the
# source tree through PYTHONPATH=src with the machine's python3 (torch, numpy, pyyaml, tqdm,
# safetensors, tensorboard are there).
set -u

device=cuda
data_dir=
compile=0
train_step=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --data-dir) data_dir=$2; shift 2 ;;
        --compile) compile=1; shift ;;
        --train-step) train_step=1; shift ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) echo "gpu_session.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_session.sh: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac
[ -f benchmarks/routing.py ] || { echo "gpu_session.sh: run it from the project root" >&2; exit 2; }

out=${OUT:-out/gpu_session}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
routing_s=${ROUTING_S:-270}
train_s=${TRAIN_S:-75}
compile_s=${COMPILE_S:-240}
train_step_s=${TRAIN_STEP_S:-240}
steps=${TRAIN_STEPS:-300}
runs=${TRAIN_RUNS:-reset38 resnet38 t2_r7_gst}
failed=0
note() { echo "[gpu_session $(date -u +%H:%M:%S)] $*"; }

# 0. where we are
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "uname: $(uname -srm)"
    nproc 2>/dev/null | sed 's/^/cpus: /'
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | sed 's/^/gpu: /'
    "$py" -c "import sys, torch; print('python:', sys.version.split()[0]); print('torch:', torch.__version__, '| cuda:', torch.version.cuda, '| available:', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# 1. the routing benchmark (issue 4); it writes its JSON after every part
note "routing benchmark on $device (limit ${routing_s}s)"
# shellcheck disable=SC2086  # ROUTING_ARGS is a list of options
timeout "$routing_s" "$py" benchmarks/routing.py --device "$device" --json "$out/routing_$device.json" ${ROUTING_ARGS:-} > "$out/routing.log" 2>&1
status=$?
if [ "$status" -ne 0 ]; then
    note "routing benchmark failed (status $status; 124: timed out); the JSON keeps the parts that finished"
    failed=$((failed + 1))
fi
tail -n 40 "$out/routing.log"

# 2. short real training runs
if [ -n "$data_dir" ]; then
    if [ ! -d "$data_dir/cifar-10-batches-bin" ]; then
        note "no $data_dir/cifar-10-batches-bin: training runs skipped"
        failed=$((failed + 1))
    else
        : > "$out/train.log"
        for name in $runs; do
            note "train $name for $steps steps on $device (limit ${train_s}s)"
            run_dir=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session_$name.XXXXXX")
            config=$name  # without an installed package no entry point names the experiments' configs: give their path
            [ -f "src/resetnet_experiments/configs/$name.yaml" ] && config="src/resetnet_experiments/configs/$name.yaml"
            timeout "$train_s" "$py" -m resetnet train --config "$config" --out "$run_dir" --data-dir "$data_dir" \
                --set train.steps="$steps" --set train.eval_every="$steps" --set train.checkpoint_every="$steps" \
                --set train.log_every=50 --set train.route_log_every=100 --set train.progress=false \
                --set train.tensorboard=false --set train.device="$device" --set data.download=false > "$run_dir/stdout" 2>&1
            status=$?
            summary=$(grep '^{"status"' "$run_dir/stdout" | tail -n 1)
            if [ "$status" -eq 0 ] && [ -n "$summary" ]; then
                echo "{\"config\": \"$name\", \"steps\": $steps, \"summary\": $summary}" >> "$out/train.log"
            else
                echo "{\"config\": \"$name\", \"failed\": $status}" >> "$out/train.log"
                tail -n 30 "$run_dir/stdout" >> "$out/train.log"
                failed=$((failed + 1))
            fi
            [ -f "$run_dir/metrics.jsonl" ] && cp "$run_dir/metrics.jsonl" "$out/train_$name.jsonl"
            rm -rf "$run_dir"
        done
        cat "$out/train.log"
    fi
else
    note "no --data-dir: training runs skipped"
fi

# 3. optional: the routing benchmark under torch.compile
if [ "$compile" = 1 ]; then
    note "routing benchmark with --compile (limit ${compile_s}s)"
    # shellcheck disable=SC2086
    timeout "$compile_s" "$py" benchmarks/routing.py --device "$device" --compile --json "$out/routing_${device}_compiled.json" ${ROUTING_ARGS:-} >> "$out/routing.log" 2>&1
    status=$?
    if [ "$status" -ne 0 ]; then
        note "compiled routing benchmark failed (status $status; 124: timed out)"
        failed=$((failed + 1))
    fi
fi

# 4. optional: the trainer against a plain loop (both under the same autocast and memory format)
if [ "$train_step" = 1 ]; then
    note "trainer vs plain loop on $device (limit ${train_step_s}s)"
    source_args="--synthetic"
    [ -n "$data_dir" ] && [ -d "$data_dir/cifar-10-batches-bin" ] && source_args="--data-dir $data_dir"
    json_tmp=$(mktemp "${TMPDIR:-/tmp}/train_step.XXXXXX")
    # shellcheck disable=SC2086  # source_args is a list of options
    # appended to train.log: a file of its own would make 9 with --compile, and the device tool returns 8
    timeout "$train_step_s" "$py" benchmarks/train_step.py --device "$device" $source_args --json "$json_tmp" ${TRAIN_STEP_ARGS:-} >> "$out/train.log" 2>&1
    status=$?
    if [ "$status" -eq 0 ]; then
        tr -d '\n' < "$json_tmp" >> "$out/train.log" && echo >> "$out/train.log"
    else
        note "trainer vs plain loop failed (status $status; 124: timed out)"
        failed=$((failed + 1))
    fi
    rm -f "$json_tmp"
    tail -n 8 "$out/train.log"
fi

note "done, $failed step(s) failed; files in $out:"
ls -l "$out"
exit "$failed"
