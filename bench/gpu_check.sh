#!/usr/bin/env bash
# The GPU check of issue 19: one script, at most 8 minutes on one H100/H200, that runs everything in hf_seqkd that
# needs a GPU and writes every result (logs, JSON, Markdown tables) to one folder:
#
#   0_machine        nvidia-smi, Python, torch / transformers / datasets / accelerate / ctranslate2 versions
#   1_gpu_tests      pytest tests/test_gpu.py (the tests that skip without CUDA): bf16 / fp16 teachers' word-KD loss
#                    against float32's; build_seqkd_dataset on CUDA against the CPU (float32)
#   2_generation     bench/generation.py --device cuda: naive Dataset.map + generate (float32), build_seqkd_dataset
#                    (bf16, its CUDA default), CTranslate2 float16, on 1,000 Multi30k sentences (teacher trained here)
#   3_kd_step        bench/kd_step.py --device cuda --bf16: a word-KD training step's time and peak memory vs CE-only
#   4a_multi30k_train     bench/multi30k.py --preset gpu_check: tokenizer, teacher, seqkd_corpus, baseline, word_kd,
#                         seq_kd (bf16 training on the GPU)
#   4b_multi30k_evaluate  its evaluate stage (BLEU, chrF, speed of whatever 4a finished)
#   4c_multi30k_report    the study's Markdown report and JSON, written into the results folder
#
#   bash bench/gpu_check.sh              # on the GPU machine; results in ${OUT:-bench/results/gpu_check}
#   bash bench/gpu_check.sh --dry        # (or GPU_CHECK_DRY=1) the same parts end to end on this CPU, tiny sizes,
#                                        # ~3 min on one thread; results in ${OUT:-bench/runs/gpu_check_dry}
#
# Each part runs under `timeout` with its own limit, cut further to what is left of the whole budget
# (GPU_CHECK_BUDGET seconds, default 450 on a GPU), so one slow part cannot eat the 8 minutes; a part that fails or
# times out is recorded (summary.md, summary.json, parts.tsv) and the next part runs. The exit status is 0 only when
# every part succeeded. Nothing is downloaded: the models are trained here from scratch on Multi30k.
#
# Settings (environment):
#   OUT               the results folder (created; this script's earlier result files in it are replaced)
#   DATA_DIR          Multi30k (train/val/test_2016_flickr .de.gz/.en.gz); default: the first of ../shared/data/multi30k,
#                     shared/data/multi30k (inside the checkout: it travels to a GPU machine), /work/shared/data/multi30k.
#                     Dry mode without the corpus writes a small synthetic stand-in (hf_seqkd.make_toy_corpus).
#   PYTHON            the interpreter (default: python, else python3); the checkout is put on PYTHONPATH, so hf_seqkd
#                     needs no install
#   GPU_CHECK_WHEELS  a folder of wheels to install first (pip --no-index --no-deps into a temporary folder put on
#                     PYTHONPATH), for packages the GPU machine lacks, e.g. datasets, dill, multiprocess, evaluate,
#                     sacremoses, ctranslate2
#   GPU_CHECK_WORK    where models and caches go (default: a new temporary folder, removed at the end unless
#                     GPU_CHECK_KEEP_WORK=1); never inside OUT by default, so OUT holds only small result files
#   GPU_CHECK_BUDGET  the whole run's time budget in seconds
#
# CTranslate2's Linux wheels load CUDA 12's cuBLAS (libcublas.so.12) for the GPU; on a machine with only CUDA 13's
# libraries its float16 row fails: 2_generation then records the error and still reports the other two ways.
#
# A machine that sends back only a few files: OUT=/tmp/gpu_check bash bench/gpu_check.sh; tar czf results.tgz -C /tmp
# gpu_check

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=${GPU_CHECK_DRY:-0}
for arg in "$@"; do
    case $arg in
        --dry) DRY=1 ;;
        -h|--help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --dry, or --help)" >&2; exit 2 ;;
    esac
done
[[ $DRY == 1 || $DRY == true ]] && DRY=1 || DRY=0

if [[ $DRY == 1 ]]; then
    OUT=${OUT:-$REPO/bench/runs/gpu_check_dry}
    BUDGET=${GPU_CHECK_BUDGET:-900}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
else
    OUT=${OUT:-$REPO/bench/results/gpu_check}
    BUDGET=${GPU_CHECK_BUDGET:-450}
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check.sh: cannot create $OUT" >&2; exit 2; }
# this script's own result files from an earlier run go: what is in OUT afterwards is this run's
rm -f "$OUT"/[0-4]_* "$OUT"/4[abc]_* "$OUT"/summary.md "$OUT"/summary.json "$OUT"/parts.tsv \
      "$OUT"/multi30k_gpu_check.json "$OUT"/multi30k_gpu_check_bleu_vs_speed.png

if [[ -n ${GPU_CHECK_WORK:-} ]]; then
    WORK=$GPU_CHECK_WORK; REMOVE_WORK=0
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/hf_seqkd_gpu_check.XXXXXX"); REMOVE_WORK=1
fi
[[ ${GPU_CHECK_KEEP_WORK:-0} == 1 ]] && REMOVE_WORK=0
RUN=$WORK/run_$(date +%Y%m%d_%H%M%S)_$$   # fresh per run: the study must not skip stages a previous run finished
mkdir -p "$RUN"

if [[ -z ${PYTHON:-} ]]; then
    PYTHON=$(command -v python || command -v python3) || { echo "gpu_check.sh: no python" >&2; exit 2; }
fi
export PYTHON
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 WANDB_DISABLED=true HF_HOME="$RUN/hf_home" MPLBACKEND=Agg

if [[ -n ${GPU_CHECK_WHEELS:-} ]]; then
    echo "[gpu_check] installing the wheels in $GPU_CHECK_WHEELS (offline) ..."
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$RUN/site" \
        "$GPU_CHECK_WHEELS"/*.whl || { echo "gpu_check.sh: installing the wheels failed" >&2; exit 2; }
    export PYTHONPATH="$RUN/site:$PYTHONPATH"
fi

if [[ -z ${DATA_DIR:-} ]]; then
    for d in "$REPO/../shared/data/multi30k" "$REPO/shared/data/multi30k" /work/shared/data/multi30k; do
        [[ -f $d/train.de.gz ]] && { DATA_DIR=$(cd "$d" && pwd); break; }
    done
fi
DATA_NOTE="Multi30k from ${DATA_DIR:-}"
if [[ -z ${DATA_DIR:-} || ! -f $DATA_DIR/train.de.gz ]]; then
    if [[ $DRY == 1 ]]; then
        DATA_DIR=$RUN/toy_multi30k
        DATA_NOTE="no Multi30k found: a synthetic stand-in (hf_seqkd.make_toy_corpus) in $DATA_DIR"
        "$PYTHON" - "$REPO" "$DATA_DIR" <<'EOF' || { echo "gpu_check.sh: could not write the stand-in corpus" >&2; exit 2; }
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("bench_multi30k", os.path.join(sys.argv[1], "bench", "multi30k.py"))
multi30k = importlib.util.module_from_spec(spec)
spec.loader.exec_module(multi30k)
multi30k.write_stand_in_corpus(sys.argv[2], num_train=400, num_test=40)
EOF
    else
        echo "gpu_check.sh: no Multi30k corpus found (set DATA_DIR to a folder with train.de.gz ...)" >&2
        exit 2
    fi
fi
export DATA_DIR OUT RUN DRY

MODE=$([[ $DRY == 1 ]] && echo "dry run on the CPU (tiny sizes)" || echo "GPU")
echo "[gpu_check] $MODE; results in $OUT; work files in $RUN; budget ${BUDGET}s; data: $DATA_NOTE"
printf 'part\tstatus\texit\tseconds\tlimit\tresults\n' >"$OUT/parts.tsv"
DEADLINE=$(( SECONDS + BUDGET ))
MIN_PART_SECONDS=15

# run_part NAME CAP RESULTS COMMAND...: COMMAND under `timeout` (CAP seconds, or what is left of the budget),
# output to OUT/NAME.log; ok = exit status 0 and every file of RESULTS (comma-separated, relative to OUT) non-empty
run_part() {
    local name=$1 cap=$2 results=$3
    shift 3
    local left=$(( DEADLINE - SECONDS )) limit=$cap log="$OUT/$name.log" status rc start seconds missing=""
    (( left < limit )) && limit=$left
    (( limit < 0 )) && limit=0
    if (( limit < MIN_PART_SECONDS )); then
        echo "[gpu_check] $name: NOT RUN (a limit of ${limit}s; ${left}s of the budget left)"
        echo "not run: a limit of ${limit}s; ${left}s of the budget left" >"$log"
        printf '%s\tnot run\t-\t0\t%s\t%s\n' "$name" "$limit" "$results" >>"$OUT/parts.tsv"
        return
    fi
    echo "[gpu_check] $name: running (limit ${limit}s) ..."
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    seconds=$(( SECONDS - start ))
    if (( rc == 124 || rc == 137 )); then
        status="timeout"
    elif (( rc != 0 )); then
        status="failed"
    else
        status="ok"
        local IFS=,
        for f in $results; do
            [[ -s $OUT/$f ]] || missing="$missing $f"
        done
        [[ -n $missing ]] && status="failed (no result:$missing)"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$limit" "$results" >>"$OUT/parts.tsv"
    echo "[gpu_check] $name: $status (exit $rc, ${seconds}s; log $log)"
    if [[ $status != ok ]]; then
        tail -n 15 "$log" | sed 's/^/    | /'
        echo
    fi
}

# ------------------------------------------------------------------------------------------------------ the parts
part_machine() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(uname -a)"
    echo "cpus: $(getconf _NPROCESSORS_ONLN)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi
        timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
          f"bf16 supported {torch.cuda.is_bf16_supported()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("transformers", "datasets", "accelerate", "tokenizers", "sacrebleu", "evaluate", "ctranslate2"):
    try:
        module = importlib.import_module(name)
        extra = ""
        if name == "ctranslate2":
            extra = f", CUDA devices seen: {module.get_cuda_device_count()}"
        print(f"{name} {module.__version__}{extra}")
    except Exception as e:  # a missing package is reported; the part that needs it fails on its own
        print(f"{name}: not importable ({type(e).__name__}: {e})")
import hf_seqkd
print(f"hf_seqkd from {hf_seqkd.__file__}")
EOF
}

part_gpu_tests() {
    local xml="$OUT/1_gpu_tests.xml" rc
    local -a env_device=()
    [[ $DRY == 1 ]] && env_device=(HF_SEQKD_GPU_TEST_DEVICE=cpu)  # the same checks, on the CPU
    (cd "$REPO" && env "${env_device[@]}" "$PYTHON" -m pytest -q -p no:cacheprovider -o junit_family=xunit1 \
        --junitxml="$xml" tests/test_gpu.py)
    rc=$?
    # counts from the JUnit file; a skipped test counts as not run: the part is ok only when every test passed
    "$PYTHON" - "$xml" "$OUT/1_gpu_tests.json" "$rc" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
xml, out, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
cases = []
for case in ET.parse(xml).getroot().iter("testcase"):
    outcome = "passed"
    for child in case:
        if child.tag in ("failure", "error", "skipped"):
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "seconds": float(case.get("time", 0))})
counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
json.dump({"pytest_exit": rc, **counts, "tests": cases}, open(out, "w"), indent=2)
print(f"tests: {counts}")
sys.exit(0 if rc == 0 and counts["passed"] > 0 and counts["passed"] == len(cases) else 1)
EOF
}

part_generation() {
    local -a sizes
    if [[ $DRY == 1 ]]; then
        sizes=(--device cpu --threads 1 --num_sentences 16 --num_beams 2 --max_new_tokens 8 --train_steps 2
               --train_batch_size 8 --warmup_steps 1 --batch_size 8 --naive_batch_size 8)
    else  # batches of 128 sentences both ways; build_seqkd_dataset's token cap does not shrink them
        sizes=(--device cuda --num_sentences 1000 --train_steps 300 --warmup_steps 100 --batch_size 128
               --naive_batch_size 128 --max_tokens_per_batch 40000)
    fi
    mkdir -p "$RUN/tmp"  # the CTranslate2 conversion goes to a temporary folder: this run's, removed with it
    (cd "$REPO" && TMPDIR="$RUN/tmp" "$PYTHON" bench/generation.py "${sizes[@]}" --data_dir "$DATA_DIR" \
        --ctranslate2 float16 --save_teacher "$RUN/generation_teacher" --json "$OUT/2_generation.json")
    local rc=$?
    sed -n '/^command: /,$p' "$OUT/2_generation.log" >"$OUT/2_generation.md"
    return $rc
}

part_kd_step() {
    local -a sizes
    if [[ $DRY == 1 ]]; then
        sizes=(--device cpu --vocab_size 1000 --batch_size 4 --source_length 8 --target_length 8
               --teacher 32,1,64,4 --student 32,1,64,4 --steps 1)
    else  # an opus-mt-sized vocabulary, a Transformer-base teacher and a small student
        sizes=(--device cuda --vocab_size 58101 --batch_size 64 --source_length 32 --target_length 48
               --teacher 512,6,2048,8 --student 256,2,1024,4 --steps 10)
    fi
    (cd "$REPO" && "$PYTHON" bench/kd_step.py "${sizes[@]}" --bf16 --json "$OUT/3_kd_step.json")
    local rc=$?
    sed -n '/^machine: /,$p' "$OUT/3_kd_step.log" >"$OUT/3_kd_step.md"
    return $rc
}

MULTI30K_STAGES=(tokenizer teacher seqkd_corpus baseline word_kd seq_kd)
MULTI30K_SET=()
if [[ $DRY == 1 ]]; then  # the gpu_check preset shrunk to seconds per stage, float32 on the CPU
    MULTI30K_SET=(train_samples=300 vocab_size=1000 "teacher=(32,1,64,4)" "student=(16,1,32,4)" batch_size=32
                  warmup_steps=5 num_beams=2 nbest_size=2 generation_batch_size=32 test_samples=20 batch1_samples=2
                  bf16=False)
fi
MULTI30K_WORK=$RUN/multi30k_gpu_check

part_multi30k() {  # part_multi30k STAGE...
    local -a set_args=() threads=()
    (( ${#MULTI30K_SET[@]} )) && set_args=(--set "${MULTI30K_SET[@]}")
    [[ $DRY == 1 ]] && threads=(--threads 1)
    (cd "$REPO" && "$PYTHON" bench/multi30k.py --preset gpu_check --work_dir "$MULTI30K_WORK" \
        --data_dir "$DATA_DIR" "${threads[@]}" "${set_args[@]}" --stages "$@") || return
    local stage missing=0
    for stage in "$@"; do
        [[ -f $MULTI30K_WORK/stages/$stage.json ]] || { echo "stage $stage: no record"; missing=1; }
    done
    return $missing
}

part_multi30k_report() {
    (cd "$REPO" && "$PYTHON" - "$MULTI30K_WORK" "$DATA_DIR" "$OUT" "${MULTI30K_SET[@]}" <<'EOF'
import importlib.util, os, sys
work, data, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
spec = importlib.util.spec_from_file_location("bench_multi30k", os.path.join("bench", "multi30k.py"))
multi30k = importlib.util.module_from_spec(spec)
spec.loader.exec_module(multi30k)
study = multi30k.Study("gpu_check", work, data, multi30k.parse_overrides(overrides))
print(multi30k.write_study_report(study, os.path.join(out, "4_multi30k.md"), results_dir=out))
EOF
    )
}

export -f part_machine part_gpu_tests part_generation part_kd_step part_multi30k part_multi30k_report
export MULTI30K_WORK REPO
# arrays do not cross into `bash -c`: the study's overrides travel as one line
export MULTI30K_SET_LINE="${MULTI30K_SET[*]}"

if [[ $DRY == 1 ]]; then
    CAP_MACHINE=60 CAP_TESTS=240 CAP_GENERATION=240 CAP_KD=120 CAP_EVALUATE=240 CAP_REPORT=120
else
    CAP_MACHINE=45 CAP_TESTS=100 CAP_GENERATION=120 CAP_KD=60 CAP_EVALUATE=110 CAP_REPORT=45
fi
RESERVE_AFTER_TRAINING=$(( CAP_EVALUATE + CAP_REPORT ))  # 4a leaves this much of the budget to 4b and 4c

run_part 0_machine "$CAP_MACHINE" 0_machine.log bash -c part_machine
cat "$OUT/0_machine.log"
if [[ $DRY == 0 ]] && ! grep -q "cuda available True" "$OUT/0_machine.log"; then
    echo "[gpu_check] torch sees no CUDA device: this is no GPU machine (use --dry for the CPU dry run)" >&2
    printf '%s\tnot run\t-\t0\t0\t\n' 1_gpu_tests 2_generation 3_kd_step 4a_multi30k_train 4b_multi30k_evaluate \
        4c_multi30k_report >>"$OUT/parts.tsv"
else
    run_part 1_gpu_tests "$CAP_TESTS" 1_gpu_tests.json bash -c part_gpu_tests
    run_part 2_generation "$CAP_GENERATION" 2_generation.json,2_generation.md bash -c part_generation
    run_part 3_kd_step "$CAP_KD" 3_kd_step.json,3_kd_step.md bash -c part_kd_step
    run_part 4a_multi30k_train $(( DEADLINE - SECONDS - RESERVE_AFTER_TRAINING )) "" \
        bash -c 'MULTI30K_SET=($MULTI30K_SET_LINE); part_multi30k "$@"' _ "${MULTI30K_STAGES[@]}"
    LEFT_FOR_EVALUATE=$(( DEADLINE - SECONDS - CAP_REPORT ))
    run_part 4b_multi30k_evaluate $(( LEFT_FOR_EVALUATE < CAP_EVALUATE ? LEFT_FOR_EVALUATE : CAP_EVALUATE )) "" \
        bash -c 'MULTI30K_SET=($MULTI30K_SET_LINE); part_multi30k evaluate'
    run_part 4c_multi30k_report "$CAP_REPORT" 4_multi30k.md,multi30k_gpu_check.json \
        bash -c 'MULTI30K_SET=($MULTI30K_SET_LINE); part_multi30k_report'
fi

# ------------------------------------------------------------------------------------------------------ the summary
"$PYTHON" - "$OUT" "$MODE" "$DATA_NOTE" "$SECONDS" "$BUDGET" <<'EOF'
import csv, json, os, sys
out, mode, data_note, seconds, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with open(os.path.join(out, "parts.tsv")) as f:
    parts = list(csv.DictReader(f, delimiter="\t"))
def read(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.isfile(path) and os.path.getsize(path) else None
results = {}
for name in ("1_gpu_tests.json", "2_generation.json", "3_kd_step.json", "multi30k_gpu_check.json"):
    text = read(name)
    if text:
        results[name] = json.loads(text)
summary = {"mode": mode, "data": data_note, "seconds": seconds, "budget_seconds": budget,
           "all_ok": bool(parts) and all(p["status"] == "ok" for p in parts),
           "parts": [dict(p, results=[r for r in p["results"].split(",") if r]) for p in parts],
           "machine": read("0_machine.log"), "results": results}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
lines = [f"# GPU check (`bench/gpu_check.sh`): {mode}", "", f"Data: {data_note}. Wall time {seconds} s "
         f"(budget {budget} s).", "", "| part | status | exit | seconds | limit (s) | results |",
         "| --- | --- | --- | ---: | ---: | --- |"]
lines += [f"| {p['part']} | {p['status']} | {p['exit']} | {p['seconds']} | {p['limit']} | {p['results']} |"
          for p in parts]
lines += ["", "## Machine", "", "```", (read("0_machine.log") or "(not recorded)").rstrip(), "```", ""]
tests = results.get("1_gpu_tests.json")
if tests:
    lines += ["## GPU tests (`tests/test_gpu.py`)", "", "| test | outcome | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} |" for t in tests["tests"]] + [""]
for title, name in (("Seq-KD corpus building (`bench/generation.py`)", "2_generation.md"),
                    ("Word-KD step, bf16 (`bench/kd_step.py`)", "3_kd_step.md")):
    text = read(name)
    if text:
        lines += [f"## {title}", "", text.rstrip(), ""]
text = read("4_multi30k.md")
if text:
    lines += [text.rstrip(), ""]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
EOF

echo
column -t -s $'\t' "$OUT/parts.tsv" 2>/dev/null || cat "$OUT/parts.tsv"
ALL_OK=1
while IFS=$'\t' read -r part status _; do
    [[ $part == part || $status == ok ]] || ALL_OK=0
done <"$OUT/parts.tsv"
if (( REMOVE_WORK )); then
    rm -rf "$WORK"
else
    echo "[gpu_check] work files kept in $RUN"
fi
echo "[gpu_check] $MODE finished in ${SECONDS}s; results in $OUT (summary.md, summary.json, one log per part)"
if (( ALL_OK )); then
    echo "[gpu_check] every part succeeded"
else
    echo "[gpu_check] SOME PARTS DID NOT SUCCEED: see $OUT/summary.md"
    exit 1
fi
