#!/usr/bin/env bash
# bench/gpu_check.sh - the whole GPU check of simclr-rs in ONE device call (docs/gpu.md).
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repo root, gpu-bin/ carried
#
# 1. nvidia-smi, host and torch facts;
# 2. parity CPU vs CUDA: gpu-bin/gpu_parity (model fixtures + custom ops, f32 and bf16; JSON
#    lines, exit 0 when within tolerance), then `simclr parity --device cuda` when the CLI has it
#    (each fused kernel against its CPU twin, then a whole training step);
#    then, with an NCCL build, `simclr rendezvous-check --nccl` on one rank (communicator +
#    all-reduce);
# 3. the pretraining step, ours (`simclr bench-step`) then PyTorch (bench/torch_bench.py) on the
#    same card, alternating: R18-CIFAR 32² batch 512 and R50 1x 224² batch 128, f32 and bf16;
# 4. a markdown table (img/s, ratio, MFU) last, and every raw line in $OUT/gpu_results.jsonl.
#
# Every step has a timeout inside one overall budget (GPU_CHECK_BUDGET seconds, default 420);
# a failing step says why and the script goes on. Knobs (env): GPU_CHECK_BUDGET, GPU_CHECK_STEPS
# (timed steps, default 5), GPU_CHECK_ONLY (e.g. "r18" or "r50": one model only),
# GPU_CHECK_SKIP_PARITY=1, GPU_CHECK_TF32=0 (skip the extra PyTorch TF32 run), GPU_CHECK_R18_BATCH
# / GPU_CHECK_R50_BATCH (default 512 / 128), OURS_R18_MODEL / OURS_R50_MODEL (our --model names,
# default r18 / r50; `r18` at 32 px is the CIFAR stem), GPU_CHECK_DEVICE (default cuda; `cpu`
# with tiny batches is the dry run that checks this script here, without a GPU).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-420}
STEPS=${GPU_CHECK_STEPS:-5}
DEV=${GPU_CHECK_DEVICE:-cuda}
RESERVE=20 # seconds kept back for the summary
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
RES="$OUT/gpu_results.jsonl"
LOG="$OUT/gpu_check.log"
: >"$RES"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PY=$(command -v python3 || command -v python || echo python3)

left() { echo $((BUDGET - ($(date +%s) - START))); }
# cap WANT: the step's timeout, or nothing (return 1) when the budget is spent.
cap() {
    local want=$1 l
    l=$(($(left) - RESERVE))
    [ "$l" -lt 15 ] && return 1
    [ "$want" -gt "$l" ] && want=$l
    echo "$want"
}
hdr() { echo; echo "=== [$(($(date +%s) - START)) s, $(left) s left] $*"; }

# --- the recorder and the summary (plain python3: json only) ---------------------------------
cat >"$WORK/gc.py" <<'PY'
import json, sys, re

def figure_of(path):
    """The BENCH {json} line, else the last bare {json} line, of a captured stdout."""
    bare = None
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return None
    for line in lines:
        line = line.strip()
        if line.startswith("BENCH "):
            try:
                return json.loads(line[6:])
            except ValueError:
                pass
        elif line.startswith("{"):
            try:
                bare = json.loads(line)
            except ValueError:
                pass
    return bare

def record(res, kind, stdout, rc, wall, *kv):
    rec = {"kind": kind, "rc": int(rc), "wall_s": float(wall)}
    for item in kv:
        k, _, v = item.partition("=")
        rec[k] = int(v) if v.isdigit() else v
    if kind == "parity":  # every JSON line it printed, one record each
        n = 0
        try:
            for line in open(stdout, errors="replace"):
                line = line.strip()
                if line.startswith("{"):
                    try:
                        r = dict(rec, line=json.loads(line))
                    except ValueError:
                        continue
                    print(json.dumps(r)); n += 1
        except OSError:
            pass
        print(json.dumps(dict(rec, kind="parity-exit", lines=n)))
        return
    if kind == "nccl":  # the command's own verdict line
        try:
            lines = [l.strip() for l in open(stdout, errors="replace") if l.strip()]
        except OSError:
            lines = []
        rec["line"] = lines[-1] if lines else ""
        print(json.dumps(rec))
        return
    fig = figure_of(stdout)
    rec["figure"] = fig
    if fig is None:
        rec["error"] = "no figure line"
    print(json.dumps(rec))

# Dense peaks, TFLOP/s, by the card's name: (bf16, tf32, fp32 non-tensor).
PEAKS = [("PCIe", (756.0, 378.0, 51.0)), ("NVL", (835.0, 418.0, 60.0)),
         ("", (989.0, 495.0, 67.0))]  # H100 SXM; the H200 has the same compute
# Analytic fallback (forward GFLOP per view x 3 x 2 views) when no PyTorch figure came back.
GFLOP_FALLBACK = {"r18": 1.1204 * 6, "r50": 8.1957 * 6}

def summary(res, gpu):
    recs = []
    for line in open(res):
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    peaks = next(p for key, p in PEAKS if key in gpu)
    peak_of = {"bf16": peaks[0], "tf32": peaks[1], "fp32": peaks[2], "f32": peaks[2]}
    print(f"\n## GPU check: {gpu or 'unknown GPU'}\n")
    par = [r for r in recs if r["kind"] == "parity"]
    ex = [r for r in recs if r["kind"] == "parity-exit"]
    if par or ex:
        print("| parity | model | precision | check | max rel | tol | ok |")
        print("|---|---|---|---|---|---|---|")
        # One row per fused kernel (its worst check), then the whole-step rows.
        ops = {}
        for r in par:
            l = r["line"]
            if "op" in l:
                w = ops.get(l["op"])
                if w is None or not l.get("ok") or (w.get("ok") and l["max_rel"] > w["max_rel"]):
                    ops[l["op"]] = l
        for name, l in ops.items():
            print(f"| kernel | {name} | f32 | worst of output and gradients | "
                  f"{l['max_rel']:.2e} | {l['tol']} | {'yes' if l.get('ok') else 'NO'} |")
        for r in par:
            l = r["line"]
            if "op" in l:
                continue
            rel = l.get("max_rel", l.get("max_rel_err", l.get("rel")))
            rel = f"{rel:.2e}" if isinstance(rel, (int, float)) else str(rel)
            what = l.get("check", l.get("name", "?"))
            if l.get("where"):
                what += f" ({l['where']})"
            print(f"| {r.get('bin', '?')} | {l.get('model', l.get('fixture', ''))} | "
                  f"{l.get('precision', '')} | {what} | {rel} | {l.get('tol', '')} | "
                  f"{'yes' if l.get('ok') else 'NO'} |")
        for r in ex:
            print(f"\n{r.get('bin', '?')}: exit {r['rc']} ({'pass' if r['rc'] == 0 else 'FAIL'}), "
                  f"{r['lines']} lines, {r['wall_s']:.0f} s")
    for r in recs:
        if r["kind"] == "nccl":
            print(f"\nnccl: exit {r['rc']} ({'pass' if r['rc'] == 0 else 'FAIL'}): {r.get('line', '')}")
    bench = [r for r in recs if r["kind"] == "bench"]
    if not bench:
        print("\nno benchmark ran"); return
    print("\n| scenario | precision | ours img/s | PyTorch img/s | ratio | MFU ours | MFU torch "
          "| ours s/step | torch s/step | GPU MiB ours / torch (nvidia-smi peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = []
    for r in bench:
        k = (r["scenario"], r["precision"], r.get("variant", ""))
        if k not in keys:
            keys.append(k)
    for sc, prec, variant in keys:
        ours = next((r for r in bench if (r["scenario"], r["precision"], r.get("variant", ""))
                     == (sc, prec, variant) and r["impl"] == "ours"), None)
        torch = next((r for r in bench if (r["scenario"], r["precision"], r.get("variant", ""))
                      == (sc, prec, variant) and r["impl"] == "torch"), None)
        fo = ours and ours.get("figure")
        ft = torch and torch.get("figure")
        gflop = (ft or {}).get("gflop_per_image") or GFLOP_FALLBACK[sc.split("-")[0]]
        def ips(r, f):
            if f:
                return f"{f['images_per_s']:.1f}"
            if r is None:
                return "–"
            return "timeout" if r["rc"] in (124, 137) else f"failed ({r['rc']})"
        ratio = f"{fo['images_per_s'] / ft['images_per_s']:.2f}×" if fo and ft else "–"
        mfu_o = (f"{fo['images_per_s'] * gflop / (peak_of['bf16' if prec == 'bf16' else 'fp32'] * 1e3):.1%}"
                 if fo else "–")
        math = (ft or {}).get("math", "bf16" if prec == "bf16" else "fp32")
        mfu_t = f"{ft['images_per_s'] * gflop / (peak_of[math] * 1e3):.1%} ({math})" if ft else "–"
        sp = lambda f: f"{f['seconds_per_step']:.4f}" if f else "–"
        mem = lambda r: str(r.get("smi_peak_mib") or "?") if r else "–"
        label = sc + (f" [{variant}]" if variant else "")
        print(f"| {label} | {prec} | {ips(ours, fo)} | {ips(torch, ft)} | {ratio} | {mfu_o} | "
              f"{mfu_t} | {sp(fo)} | {sp(ft)} | {mem(ours)} / {mem(torch)} |")
    print(f"\nMFU = images/s × GFLOP per image (forward per view × 3 × 2 views: "
          + ", ".join(f"{s} {g:.2f}" for s, g in sorted(
              {k[0]: ((next((r['figure'] for r in bench if r['scenario'] == k[0] and r['impl'] == 'torch'
                             and r.get('figure')), None) or {}).get('gflop_per_image')
                      or GFLOP_FALLBACK[k[0].split('-')[0]]) for k in keys}.items()))
          + f") / dense peak of the card (bf16 {peaks[0]:.0f}, tf32 {peaks[1]:.0f}, "
          f"fp32 {peaks[2]:.0f} TFLOP/s). Ours f32 is counted against fp32 (no TF32).")

if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(*sys.argv[2:])
    else:
        summary(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
PY

# rec KIND STDOUT RC WALL key=value...: append the record(s) to $RES
rec() { "$PY" "$WORK/gc.py" record "$RES" "$@" >>"$RES" 2>/dev/null || echo "(could not record $1)"; }

# GPU memory high-water mark (nvidia-smi, whole card) while a step runs.
smi_start() {
    SMI_FILE="$WORK/smi.$RANDOM"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$SMI_FILE" 2>/dev/null &
    SMI_PID=$!
}
smi_stop() {
    kill "$SMI_PID" 2>/dev/null
    wait "$SMI_PID" 2>/dev/null
    sort -n "$SMI_FILE" 2>/dev/null | tail -1 | tr -d ' '
}

# run_step NAME WANT_TIMEOUT STDOUT_FILE cmd...: runs it under `timeout` (capped by the budget),
# stdout to STDOUT_FILE, stderr to STDOUT_FILE.err; prints both tails; sets RC, WALL, SMI_PEAK.
# Returns 1 only when it was skipped for want of time.
run_step() {
    local name=$1 want=$2 out=$3 t s ms
    shift 3
    RC=125 WALL=0 SMI_PEAK=""
    if ! t=$(cap "$want"); then
        echo "SKIPPED $name: overall budget ($BUDGET s) spent"
        return 1
    fi
    echo "\$ $* (timeout ${t}s)"
    s=$(date +%s%N)
    smi_start
    timeout -k 5 "$t" "$@" >"$out" 2>"$out.err"
    RC=$?
    SMI_PEAK=$(smi_stop)
    ms=$((($(date +%s%N) - s) / 1000000))
    WALL="$((ms / 1000)).$(printf %03d $((ms % 1000)))"
    tail -n 40 "$out"
    if [ "$RC" -ne 0 ]; then
        case $RC in
            124 | 137) echo "FAILED $name: timed out after ${t}s" ;;
            *) echo "FAILED $name: exit $RC after ${WALL}s" ;;
        esac
        echo "--- last stderr of $name:"
        tail -n 25 "$out.err"
    else
        echo "--- ok in ${WALL}s; GPU memory peak (nvidia-smi) ${SMI_PEAK:-?} MiB; stderr tail:"
        tail -n 4 "$out.err"
    fi
    return 0
}

# --- 1. the machine ---------------------------------------------------------------------------
hdr "machine"
date -u
uname -a
ldd --version 2>&1 | head -1
nvidia-smi || echo "nvidia-smi failed"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,power.limit \
    --format=csv 2>/dev/null
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")' \
    || echo "python3/torch check failed"
echo "{\"kind\": \"env\", \"gpu\": \"$GPU\", \"budget_s\": $BUDGET, \"steps\": $STEPS}" >>"$RES"

# --- our binaries: unpack, point LD_LIBRARY_PATH at the CUDA 13 libs of the machine's torch ----
hdr "binaries"
BIN="$WORK/bin"
mkdir -p "$BIN"
unpack() { # gpu-bin/NAME(.gz) -> $BIN/NAME; prints the path, or nothing
    local n=$1
    if [ -f "gpu-bin/$n.gz" ]; then
        gunzip -c "gpu-bin/$n.gz" >"$BIN/$n" && chmod +x "$BIN/$n" && echo "$BIN/$n"
    elif [ -x "gpu-bin/$n" ]; then
        echo "$PWD/gpu-bin/$n"
    fi
}
SIMCLR=$(unpack simclr)
PARITY=$(unpack gpu_parity)
[ -n "$SIMCLR" ] || echo "MISSING gpu-bin/simclr.gz: our benchmarks and CLI parity are skipped"
[ -n "$PARITY" ] || echo "MISSING gpu-bin/gpu_parity.gz: fixture/custom-op parity is skipped"
SP=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" 2>/dev/null)
echo "torch site-packages: ${SP:-NOT FOUND}"
export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:$SP/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for b in $SIMCLR $PARITY; do
    if ldd "$b" | grep -q 'not found'; then # fallback: a CUDA 13 toolkit's own libraries
        for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
            [ -d "$d" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
        done
    fi
done
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for b in $SIMCLR $PARITY; do
    echo "-- ldd $(basename "$b")"
    ldd "$b" | grep -E 'not found|libcuda|cublas|cudart|curand|nvrtc|cudnn|nccl' || echo "(ldd failed)"
done

# --- 2. parity ----------------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_PARITY:-0}" != 1 ]; then
    if [ -n "$PARITY" ]; then
        hdr "parity: gpu_parity (fixtures + custom ops, CPU vs CUDA, f32 1e-4 / bf16 2e-2)"
        # The first CUDA run also JIT-compiles candle's PTX (cached for the later runs).
        if run_step gpu_parity 150 "$WORK/parity.out" "$PARITY"; then
            rec parity "$WORK/parity.out" "$RC" "$WALL" bin=gpu_parity
        fi
    fi
    if [ -n "$SIMCLR" ] && "$SIMCLR" --help 2>/dev/null | grep -qw parity; then
        hdr "parity: simclr parity --device cuda (one training step, CPU vs CUDA)"
        if run_step simclr-parity 120 "$WORK/cliparity.out" "$SIMCLR" parity --device "$DEV"; then
            rec parity "$WORK/cliparity.out" "$RC" "$WALL" bin=simclr-parity
        fi
    fi
fi

# NCCL: one rank on this one GPU (two ranks cannot share a GPU); the same command checks a
# multi-GPU node under torchrun or srun (docs/gpu.md). A build without NCCL says so at once
# (before any rendezvous): then the step is skipped rather than failed.
if [ -n "$SIMCLR" ] && [ "$DEV" != cpu ] && ! "$SIMCLR" rendezvous-check --nccl --replicas 1 \
    --rank 0 --rendezvous "$WORK/nccl-probe" --timeout-secs 1 2>&1 | grep -q "built without NCCL"; then
    hdr "nccl: simclr rendezvous-check --nccl (one rank: communicator + all-reduce)"
    if run_step nccl 60 "$WORK/nccl.out" "$SIMCLR" rendezvous-check --nccl --replicas 1 \
        --rank 0 --rendezvous "$WORK/nccl-rendezvous" --timeout-secs 30; then
        rec nccl "$WORK/nccl.out" "$RC" "$WALL" bin=simclr
    fi
fi

# --- 3. the pretraining step: ours, then PyTorch, per configuration -----------------------------
# scenario (torch_bench name) | our --model | side | batch
CONFIGS=(
    "pretrain-r18-cifar-32 ${OURS_R18_MODEL:-r18} 32 ${GPU_CHECK_R18_BATCH:-512}"
    "pretrain-r50-224 ${OURS_R50_MODEL:-r50} 224 ${GPU_CHECK_R50_BATCH:-128}"
)
for cfg in "${CONFIGS[@]}"; do
    read -r SC MODEL SIDE BATCH <<<"$cfg"
    case "${GPU_CHECK_ONLY:-}" in "" | *"${SC:9:3}"*) ;; *) continue ;; esac
    for PREC in f32 bf16; do
        tag="scenario=${SC#pretrain-} precision=$PREC batch=$BATCH image_size=$SIDE"
        if [ -n "$SIMCLR" ]; then
            hdr "ours: $MODEL ${SIDE}² batch $BATCH $PREC"
            if run_step "ours $MODEL $PREC" 120 "$WORK/o.out" "$SIMCLR" bench-step --model "$MODEL" \
                --image-size "$SIDE" --batch "$BATCH" --precision "$PREC" --device "$DEV" --steps "$STEPS"; then
                rec bench "$WORK/o.out" "$RC" "$WALL" impl=ours $tag model="$MODEL" smi_peak_mib="$SMI_PEAK"
            fi
        fi
        hdr "PyTorch: $SC batch $BATCH $PREC"
        if run_step "torch $SC $PREC" 90 "$WORK/t.out" "$PY" bench/torch_bench.py "$SC" --device "$DEV" \
            --precision "$PREC" --batch "$BATCH" --steps "$STEPS"; then
            rec bench "$WORK/t.out" "$RC" "$WALL" impl=torch $tag smi_peak_mib="$SMI_PEAK"
        fi
    done
done

# Extra, when time is left: PyTorch's own default f32 (TF32 convolutions) on R50, for reference.
if [ "${GPU_CHECK_TF32:-1}" = 1 ] && [ "$(left)" -gt $((RESERVE + 60)) ]; then
    case "${GPU_CHECK_ONLY:-}" in
        "" | *r50*)
            hdr "PyTorch: pretrain-r50-224 batch ${GPU_CHECK_R50_BATCH:-128} f32 with TF32 (PyTorch's conv default)"
            if run_step "torch r50 tf32" 60 "$WORK/t.out" "$PY" bench/torch_bench.py pretrain-r50-224 \
                --device "$DEV" --precision f32 --tf32 --batch "${GPU_CHECK_R50_BATCH:-128}" --steps "$STEPS"; then
                rec bench "$WORK/t.out" "$RC" "$WALL" impl=torch scenario=r50-224 precision=f32 \
                    variant=tf32 batch="${GPU_CHECK_R50_BATCH:-128}" image_size=224 smi_peak_mib="$SMI_PEAK"
            fi
            ;;
    esac
fi

# --- 4. summary -----------------------------------------------------------------------------------
hdr "after the runs"
nvidia-smi --query-gpu=temperature.gpu,power.draw,clocks.sm,clocks.mem,memory.used --format=csv 2>/dev/null
echo "raw records: $RES ($(wc -l <"$RES") lines); log: $LOG"
"$PY" "$WORK/gc.py" summary "$RES" "$GPU" || { echo "summary failed; raw records:"; cat "$RES"; }
echo "gpu_check done in $(($(date +%s) - START)) s"
rm -rf "$WORK"
exit 0
