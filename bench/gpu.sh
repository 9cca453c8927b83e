#!/usr/bin/env bash
# The GPU run, as one command for a machine that has the project's Python packages (or carries them
# as wheels in .whl/, installed to /tmp/site without touching the system).
#   bash bench/gpu.sh OUT_DIR [STAGE ...]     # stages: tests profile load (default: all three), staggered
# tests:   the slot engine's and speech decoder's GPU tests (graph replay = eager steps)  -> OUT/gpu_tests.txt
# profile: bench/fused_step.py, one graph-replayed decode step through the fused forward and the model's
#          own decoder, 1 and 64 rows                                            -> OUT/fused_step_gpu.json
#          bench/profile_chat.py, the slot engine with and without graphs, 1 and 64 sessions -> OUT/profile_slots_gpu.json
# load:    bench/run.py --profile gpu (BENCH_TIMEOUT seconds, default 520; BENCH_VARIANTS="ours-process ..." runs
#          only those of the profile's servers besides the naive baseline)      -> OUT/load_gpu.json, .png, log.txt
# staggered: bench/staggered.py, 256 replies of 8-256 tokens, slots moved down or not -> OUT/staggered_gpu.json
# mixed:   the mixed phase alone, chat first on then off, 5 bursts each way (a line each: stages, media held)
#          -> OUT/mixed_gpu.json, mixed_chat_first_off_gpu.json
# speech:  bench/speech_rtf.py, Whisper-base shape, 1 and 16 streams against transcribe, in English, then
#          detecting the language (the server's default)              -> OUT/speech_rtf_gpu.json, speech_rtf_detect_gpu.json
# followups: bench/followups.py, 8-turn conversations (1 and 64 at once), prefix reuse on and off
#          (a line per session count: TTFT of the last turn, prompt tokens computed)   -> OUT/followups_gpu.json
# longprompt: bench/long_prompt.py, a 2,000-token prompt sent while 64 replies stream, in pieces of 1,024
#          (the GPU default) and whole: the streams' longest gap, both prompts' TTFT -> OUT/long_prompt_gpu.json
# framecap: bench/frame_cap.py, 256 model-free paced streams, no cap and 4000 frames/s (the web process
#          on this machine's CPU; no GPU work)                                   -> OUT/frame_cap_gpu_host.json
set -uo pipefail
OUT_DIR=${1:-${OUT:-bench/results}}
shift || true
STAGES=${*:-tests profile load}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
rc=0
for stage in $STAGES; do
  echo "=== $stage ($(date +%T))"
  case $stage in
    tests) timeout 180 python3 -m pytest -q -p no:cacheprovider -rs -k "cuda_graphs or cuda_float16" tests/test_slot_engine.py tests/test_speech_decoder.py 2>&1 | tee "$OUT_DIR/gpu_tests.txt" || rc=1 ;;
    profile) timeout 120 python3 bench/fused_step.py --device cuda --shape qwen2.5-0.5b --out "$OUT_DIR/fused_step_gpu.json" || rc=1
             timeout 240 python3 bench/profile_chat.py --sessions 1 64 --engines slots --window-s 1.0 \
               --out "$OUT_DIR/profile_slots_gpu.json" || rc=1 ;;
    load) timeout "${BENCH_TIMEOUT:-520}" python3 bench/run.py --profile gpu --out "$OUT_DIR/load_gpu.json" --logs "$OUT_DIR" \
            ${BENCH_VARIANTS:+--variants $BENCH_VARIANTS} \
            2>&1 | tee "$OUT_DIR/log.txt" || rc=1 ;;
    staggered) timeout 240 python3 bench/staggered.py --shape qwen2.5-0.5b --sessions 256 --max-new 256 \
               --out "$OUT_DIR/staggered_gpu.json" || rc=1 ;;
    mixed) for first in on off; do
             name=$([ $first = on ] && echo mixed_gpu || echo mixed_chat_first_off_gpu)
             timeout 200 python3 bench/run.py --profile gpu --only mixed --chat-first $first --out "$OUT_DIR/$name.json" \
               2>&1 | tail -14 || rc=1
           done ;;
    speech) timeout 240 python3 bench/speech_rtf.py --dims base --streams 16 --device cuda --out "$OUT_DIR/speech_rtf_gpu.json" \
              | tail -40 || rc=1
            timeout 240 python3 bench/speech_rtf.py --dims base --streams 16 --device cuda --language "" \
              --out "$OUT_DIR/speech_rtf_detect_gpu.json" | grep -A3 '"single_stream"' || rc=1 ;;
    followups) timeout 300 python3 bench/followups.py --shape qwen2.5-0.5b --device cuda --sessions 1 64 --rounds 1 \
                 --max-new 128 --out "$OUT_DIR/followups_gpu.json" | python3 -c "import json, sys
for r in json.load(sys.stdin)['results']: print({k: v for k, v in r.items() if k != 'runs'})" || rc=1 ;;
    longprompt) timeout 240 python3 bench/long_prompt.py --shape qwen2.5-0.5b --device cuda --streams 64 --chunk 1024 \
                  --long-tokens 2000 --late-ms 2 --out "$OUT_DIR/long_prompt_gpu.json" | python3 -c "import json, sys
for r in json.load(sys.stdin)['results']: print({k: v for k, v in r.items() if k != 'runs'})" || rc=1 ;;
    framecap) timeout 120 python3 bench/frame_cap.py --sessions 256 --caps 0 4000 --out "$OUT_DIR/frame_cap_gpu_host.json" \
                2>&1 | grep "  cap" || rc=1 ;;
    *) echo "unknown stage $stage (tests, profile, load, staggered, mixed, speech, followups, longprompt, framecap)"; exit 2 ;;
  esac
done
exit $rc
