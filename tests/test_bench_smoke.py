"""The benchmark harness runs end to end on the CPU with tiny models (speed is not asserted here:
absolute and relative speed are measured on the GPU; see bench/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_harness_smoke_run_measures_every_server_and_writes_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--profile", "cpu-smoke", "--only", "chat", "web", "mixed", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    tokens = result["settings"]["max_new_tokens"]
    assert set(result["chat"]) == {"naive", "ours-thread", "ours-process", "ours-thread-library"}
    for name, runs in result["chat"].items():
        assert "error" not in runs, runs
        for n, run in runs.items():
            assert run["sessions"] == int(n) and run["completed"] == int(n), (name, run)
            assert run["completion_tokens"] == int(n) * tokens, (name, run)
            assert run["ttft_ms"]["p50"] > 0 and run["frames"] >= int(n) and run["loop_lag"]["probes"] > 0
            # where the server says each turn's time to first frame went (the naive server too)
            assert set(run["ttft_stages_ms"]) == {"admit", "start", "model", "send"}, (name, run)
            assert sum(run["ttft_stages_ms"].values()) <= run["ttft_ms"]["max"] + 5, (name, run)
    for variant in ("ours-thread", "ours-process", "ours-thread-library"):
        assert set(result["ratios_vs_naive"][variant]) == {"1", "4"}
    web = result["web_process"]
    assert web["flood"]["completed"] == web["flood"]["sessions"] and web["flood"]["frames_per_s"] > 0
    assert web["idle"]["sessions"] == 50 and web["idle"]["rss_after_mib"] >= web["idle"]["rss_before_mib"]
    mixed = result["mixed"]
    assert "error" not in mixed, mixed
    assert mixed["with_media"]["chat"]["completed"] == mixed["config"]["sessions"]
    assert mixed["with_media"]["speech_latency_ms"]["p50"] > 0 and mixed["with_media"]["vision_latency_ms"]["p50"] > 0
    for phase in (mixed["chat_alone"], mixed["with_media"]["chat"]):  # each burst's server-side stages, for a miss's profile
        seen = phase["server_rounds"]
        assert len(seen) == len(phase["ttft_p95_rounds_ms"]) == mixed["config"].get("rounds", 1)
        assert all(set(r["ttft_stages_ms"]) == {"admit", "start", "model", "send"} for r in seen), seen
        assert all(set(r["full_gc"]) == {"collections", "ms"} for r in seen), seen  # the web process's full collections
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_fused_step_bench_counts_and_times_both_forwards(tmp_path: Path) -> None:
    """bench/fused_step.py (what bench/gpu.sh runs on the GPU), in a short CPU run. The operation
    counts are exact, not timings: the fused forward must dispatch well under half of the model
    decoder's operations per decode step, at each batch size."""
    out = tmp_path / "fused.json"
    proc = subprocess.run(
        [sys.executable, "bench/fused_step.py", "--batches", "1", "4", "--steps", "2", "--rounds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["batches"]] == [1, 4]
    for row in result["batches"]:
        ops = row["ops_per_step"]
        assert ops["fused"]["total"] * 2.5 < ops["model"]["total"], ops
        assert "rms_norm" in ops["fused"]["top"] and "rsqrt" in ops["model"]["top"], ops
        assert row["step_ms"]["fused"] > 0 and row["step_ms"]["model"] > 0


def test_gc_pauses_bench_times_the_servers_full_collections_per_burst(tmp_path: Path) -> None:
    """bench/gc_pauses.py, briefly: its probe sees the server (a process of its own) freeze what it
    loaded, and each burst is recorded with the full collections that fell inside it."""
    out = tmp_path / "gc.json"
    proc = subprocess.run(
        [sys.executable, "bench/gc_pauses.py", "--idle", "20", "--bursts", "4", "--sessions", "8", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["frozen_objects"] > 10_000, result["frozen_objects"]
    assert len(result["bursts"]) == 4 and all(b["ttft_p95_ms"] > 0 for b in result["bursts"])
    assert result["full_gc"]["collections"] == len(result["full_gc"]["ms"]) == len(result["full_gc"]["freed"])


def test_long_session_bench_grows_a_session_whose_turns_each_name_a_new_image(tmp_path: Path) -> None:
    """bench/long_session.py --images new, briefly: every turn uploads a new image and names it, and
    the server stored each as a numbered image of the session (the turns went to chat, as asked)."""
    import sqlite3

    out = tmp_path / "long.json"
    proc = subprocess.run(
        [sys.executable, "bench/long_session.py", "--images", "new", "--configs", "window", "--checkpoints", "4", "12",
         "--probes", "20", "--port", "8961", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["images"] == "new"
    assert [r["messages"] for r in result["runs"]["window"]] == [4, 12]
    # 20 probes: the server's CPU time is counted in 10 ms ticks, and 3 turns of about 3 ms each read 0 at times.
    assert all(r["ttft_ms_p50"] > 0 and r["server_cpu_ms_per_turn"] > 0 for r in result["runs"]["window"])
    with sqlite3.connect(Path(result["workdir"]) / "window" / "assistant.db") as conn:
        named = conn.execute(
            "SELECT count(*), count(DISTINCT first_position) FROM attachments WHERE first_position IS NOT NULL"
        ).fetchone()
        skills = {row[0] for row in conn.execute("SELECT skill FROM messages WHERE role = 'assistant'")}
    assert named == (42, 42) and skills == {"chat"}  # 2 + 20 + 0 + 20 turns, one new image each


def test_followups_bench_reuses_each_conversations_earlier_turns(tmp_path: Path) -> None:
    """bench/followups.py (what bench/gpu.sh runs on the GPU), briefly: the same replies with reuse
    and without, and from the second turn on the model computes fewer prompt tokens with it."""
    out = tmp_path / "followups.json"
    proc = subprocess.run(
        [sys.executable, "bench/followups.py", "--shape", "tiny", "--sessions", "2", "--turns", "3", "--words", "4",
         "--max-new", "8", "--rounds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["replies_same"] and result["sessions"] == 2
    runs = {run["reuse"]: run["turns"] for run in result["runs"]}
    assert [t["reused"] for t in runs[False]] == [0, 0, 0]
    assert runs[True][0]["reused"] == 0 and all(t["reused"] > 0 for t in runs[True][1:])
    for with_reuse, without in zip(runs[True], runs[False]):
        assert with_reuse["computed"] + with_reuse["reused"] == without["computed"]
    assert result["prompt_tokens_computed"]["reuse"] < result["prompt_tokens_computed"]["no_reuse"]


def test_long_prompt_bench_streams_between_the_pieces_of_a_long_prompt(tmp_path: Path) -> None:
    """bench/long_prompt.py, briefly: the same replies whole and in pieces; in pieces the streaming
    replies get a token per piece while the long prompt is read, whole about one (counts, not speed)."""
    out = tmp_path / "long_prompt.json"
    proc = subprocess.run(
        [sys.executable, "bench/long_prompt.py", "--shape", "tiny", "--streams", "2", "--long-tokens", "300",
         "--chunk", "32", "--context", "512", "--rounds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["replies_same"] and result["streams"] == 2
    runs = {run["chunk"]: run for run in result["runs"]}
    pieces = -(-runs[32]["long_prompt_tokens"][0] // 32)
    assert runs[32]["stream_tokens_while_read"]["min"] >= pieces - 2, runs[32]
    assert runs[0]["stream_tokens_while_read"]["min"] <= 2, runs[0]
