"""The benchmark harness: our server against the naive baseline, in one run, through the websocket.

    .venv/bin/python bench/run.py --profile cpu-smoke     # tiny model on CPU: proves the harness (CI)
    python3 bench/run.py --profile gpu                    # Qwen2.5-0.5B-shaped model on one GPU

Starts each server as its own process (``bench/serve.py``) on loopback and drives it with
``bench/load.py``:
  * chat: for each concurrency, N sessions each send one turn at once; time to first token, time
    per output token, frame gaps (p50/p95) and aggregate tokens/s, for our server (transformers
    continuous batching, in one or more configurations) and the naive baseline (same model behind a
    lock, one eager ``generate`` at a time); ratios ours/naive are taken within this run;
  * web process: frames/s with a model-free skill that streams as fast as the loop runs, and
    resident memory per idle session with --idle sessions open;
  * event-loop lag during every chat run (the server's own probe, from /metrics);
  * speech and vision: ``bench/speech_rtf.py`` and ``bench/vision_batching.py`` (profile gpu, or
    --with-media).
Writes JSON (``--out``) and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import load  # noqa: E402
from bench.serve import raise_fd_limit  # noqa: E402

PROFILES: dict[str, dict] = {
    "cpu-smoke": dict(
        shape="tiny", device="cpu", max_new_tokens=16, concurrency=[1, 4], naive_concurrency=[1, 4], naive_cap_s=30.0, cap_s=120.0,
        variants={
            "ours-thread": ["--worker", "thread"],
            "ours-process": ["--worker", "process"],
            "ours-thread-library": ["--worker", "thread", "--engine", "library"],
        },
        flood_sessions=8, flood_words=50, idle=50, media=False,
        mixed=dict(sessions=4, speech_streams=1, vision_streams=1, speech_dims="tiny", vision_shape="tiny"),
    ),
    # The engines and transports compared on a CPU with the tiny model (ratios only).
    "cpu": dict(
        shape="tiny", device="cpu", max_new_tokens=64, concurrency=[1, 16, 64], naive_concurrency=[1, 16], naive_cap_s=30.0,
        cap_s=120.0,
        variants={
            "ours-thread": ["--worker", "thread", "--slots", "64"],
            "ours-thread-library": ["--worker", "thread", "--engine", "library", "--kv-blocks", "256"],
            "ours-process": ["--worker", "process", "--slots", "64"],
            "ours-process-library": ["--worker", "process", "--engine", "library", "--kv-blocks", "256"],
        },
        flood_sessions=8, flood_words=50, idle=50, media=False,
        mixed=dict(sessions=4, speech_streams=1, vision_streams=1, speech_dims="tiny", vision_shape="tiny"),
    ),
    # Ordered so that a 10-minute GPU call measures what matters first (each phase saves its JSON).
    "gpu": dict(
        shape="qwen2.5-0.5b", device="cuda", max_new_tokens=256, concurrency=[1, 64, 256], naive_concurrency=[1, 64],
        naive_cap_s=15.0, cap_s=120.0,
        variants={
            "ours-process": ["--worker", "process"],  # the product's defaults on a GPU: slot engine, CUDA graphs
            "ours-process-library": ["--worker", "process", "--engine", "library"],  # transformers' CB, graphs on
            "ours-thread": ["--worker", "thread"],
            "ours-process-slots-eager": ["--worker", "process", "--cuda-graphs", "off"],
        },
        flood_sessions=64, flood_words=400, idle=1000, media=True,
        mixed=dict(sessions=64, speech_streams=16, vision_streams=16, speech_dims="base", vision_shape="blip-base",
                   rounds=5, server_args=["--kv-blocks", "512"]),  # leave GPU memory for Whisper and BLIP
    ),
}


class ServerProcess:
    def __init__(
        self, name: str, args: list[str], workdir: Path, port: int, timeout: float = 240, *, module: str = "bench.serve"
    ) -> None:
        """``module`` is run with ``bench.serve``'s arguments (a wrapper around it, e.g. a probe)."""
        self.name, self.port, self.workdir = name, port, workdir
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/v1/ws"
        self.log = open(workdir / f"{name}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", module, "--port", str(port), "--workdir", str(workdir / name), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        self.token = (workdir / name / "token").read_text()
        self.pid = self.proc.pid

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited; see {self.log.name}:\n{self.tail()}")
            try:
                skills = httpx.get(f"{self.http}/healthz", timeout=5).json()["skills"]
                states = {k: v["state"] for k, v in skills.items()}
                if all(s != "loading" for s in states.values()):
                    if any(s == "unavailable" for s in states.values()):
                        raise RuntimeError(f"{self.name}: skills {skills}\n{self.tail()}")
                    return
            except (httpx.HTTPError, KeyError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} server not ready in {timeout} s\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return "".join(Path(self.log.name).read_text().splitlines(keepends=True)[-30:])

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far."""
        return sum(psutil.Process(self.pid).cpu_times()[:2])

    def sample(self, out: Path, *, native: bool = False) -> subprocess.Popen | None:
        """Start py-spy on the server, writing raw samples to ``out`` when stopped with
        ``end_sample`` (None: py-spy is not installed). ``native`` adds C frames, and py-spy then has
        to pause the server for each sample, which inflates its CPU time."""
        tool = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if tool is None:
            return None
        cmd = [tool, "record", "-p", str(self.pid), "-r", "1000", "-f", "raw", "-o", str(out)]
        cmd.append("--native" if native else "--nonblocking")
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def end_sample(spy: subprocess.Popen | None) -> None:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled
            spy.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_runs(srv: ServerProcess, concurrency: list[int], cap_s: float, warm: int) -> dict:
    for n in sorted({1, warm}):  # warm-up: kernels, graphs, allocator, batch shapes
        asyncio.run(load.chat_load(srv.ws, srv.token, n, cap_s=cap_s))
    out = {}
    for n in concurrency:
        before = load.server_metrics(srv.http)
        stats = asyncio.run(load.chat_load(srv.ws, srv.token, n, cap_s=cap_s))
        stats.update(load.between(before, load.server_metrics(srv.http)))
        out[str(n)] = stats
        print(f"  {srv.name:>18} x{n:<4} {stats['tokens_per_s']} tok/s  ttft p50 {stats['ttft_ms']['p50']} ms "
              f"p95 {stats['ttft_ms']['p95']} ms  tpot p50 {stats['tpot_ms']['p50']} ms  "
              f"ttft stages (mean ms) {stats.get('ttft_stages_ms')}", flush=True)
    return out


def web_process(workdir: Path, sessions: int, words: int, idle: int) -> dict:
    # A frame per word and no cap on frames a second: what the web process can send, not what it chooses to.
    args = ["--mode", "flood", "--flood-words", str(words), "--flush-interval", "0", "--frames-per-s", "0"]
    srv = ServerProcess("flood", args, workdir, free_port())
    try:
        asyncio.run(load.chat_load(srv.ws, srv.token, 2))
        before, cpu0 = load.server_metrics(srv.http), srv.cpu_s()
        flood = asyncio.run(load.chat_load(srv.ws, srv.token, sessions))
        flood["server_cpu_ms_per_1000_frames"] = round((srv.cpu_s() - cpu0) * 1e6 / max(flood["frames"], 1), 1)
        flood.update(load.between(before, load.server_metrics(srv.http)))

        async def hold() -> dict:
            rss0 = srv.rss()
            conns = await load.idle_sessions(srv.ws, srv.token, idle)
            rss1 = srv.rss()
            await load.close_all(conns)
            return {"sessions": idle, "rss_before_mib": round(rss0 / 2**20, 1), "rss_after_mib": round(rss1 / 2**20, 1),
                    "kib_per_idle_session": round((rss1 - rss0) / 1024 / idle, 1)}

        idle_stats = asyncio.run(hold())
    finally:
        srv.stop()
    print(f"  web process: {flood['frames_per_s']} frames/s; {idle_stats['kib_per_idle_session']} KiB per idle session", flush=True)
    return {"flood": flood, "idle": idle_stats}


def media_inputs() -> tuple[bytes, bytes]:
    """Three seconds of speech as PCM16 (espeak-ng when installed, else a tone: speed is the same) and
    a JPEG photograph (scikit-image's cat when installed, else a gradient)."""
    import io

    import numpy as np
    from PIL import Image

    from bench.speech_rtf import make_audio

    with tempfile.TemporaryDirectory() as tmp:
        samples = make_audio(Path(tmp), 1)[0]
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    try:
        from skimage import data

        pixels = data.chelsea()
    except ImportError:
        pixels = np.tile(np.linspace(0, 255, 640, dtype=np.uint8)[None, :, None], (480, 1, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return pcm, buf.getvalue()


def mixed(workdir: Path, common: list[str], cfg: dict) -> dict:
    """Chat time to first token with and without speech and vision load, on one server that runs all
    three skills (the same server for both runs). With ``rounds`` bursts each way, each side is its
    median round (by TTFT p95)."""
    from bench.speech_rtf import build_model as build_whisper
    from bench.vision_batching import build_model as build_blip

    models = workdir / "media-models"
    models.mkdir(exist_ok=True)
    speech = build_whisper(models, cfg["speech_dims"])
    caption = build_blip(models / "caption", cfg["vision_shape"], "caption")
    pcm, image = media_inputs()
    args = [*common, "--mode", "ours", "--speech-model", str(speech), "--caption-model", str(caption),
            *cfg.get("server_args", [])]
    rounds = cfg.get("rounds", 1)
    srv = ServerProcess("mixed", args, workdir, free_port())
    try:
        ws, tok = srv.ws, srv.token
        asyncio.run(load.chat_with_media(srv.http, ws, tok, 2, speech_streams=1, vision_streams=1, pcm=pcm, image=image))
        asyncio.run(load.chat_load(ws, tok, cfg["sessions"]))  # warm-up at full width, as chat_runs does
        before = load.server_metrics(srv.http)
        alone = asyncio.run(load.chat_rounds(ws, tok, cfg["sessions"], rounds, http=srv.http))
        alone.update(load.between(before, before := load.server_metrics(srv.http)))
        loaded = asyncio.run(load.chat_with_media(
            srv.http, ws, tok, cfg["sessions"], speech_streams=cfg["speech_streams"], vision_streams=cfg["vision_streams"],
            pcm=pcm, image=image, rounds=rounds))  # fmt: skip
        loaded.update(load.between(before, load.server_metrics(srv.http)))
    finally:
        srv.stop()
    ratio = loaded["chat"]["ttft_ms"]["p95"] / alone["ttft_ms"]["p95"]
    print(f"  mixed: chat ttft p95 {alone['ttft_ms']['p95']} ms alone, {loaded['chat']['ttft_ms']['p95']} ms with "
          f"speech and vision load ({ratio:.2f}x)", flush=True)
    for name, phase in (("alone", alone), ("with media", loaded["chat"])):
        for i, (p95, seen) in enumerate(zip(phase["ttft_p95_rounds_ms"], phase.get("server_rounds", [])), 1):
            print(f"    {name}, burst {i}: ttft p95 {p95} ms; stages (ms) {seen.get('ttft_stages_ms')}; "
                  f"media held {seen.get('media_held')}; full gc {seen.get('full_gc')}", flush=True)
    return {"config": cfg, "chat_alone": alone, "with_media": loaded, "ttft_p95_ratio": round(ratio, 3)}


def media(device: str, out_dir: Path, tag: str, sizes: dict) -> dict:
    """Speech and vision through their own benchmarks (same model and inputs, batched vs not)."""
    results = {}
    jobs = {
        "speech": ["bench/speech_rtf.py", "--dims", sizes["speech_dims"], "--streams", "16", "--device", device],
        "vision": ["bench/vision_batching.py", "--shape", sizes["vision_shape"], "--requests", "32", "--batch-size", "32",
                   "--device", device],
    }
    for name, cmd in jobs.items():
        path = out_dir / f"{Path(cmd[0]).stem}_{tag}.json"
        proc = subprocess.run([sys.executable, *cmd, "--out", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
        if proc.returncode:
            results[name] = {"error": proc.stderr[-2000:]}
        else:
            results[name] = json.loads(path.read_text())
        print(f"  {name}: {time.strftime('%H:%M:%S')} done ({'error' if proc.returncode else 'ok'})", flush=True)
    return results


def ratios(chat: dict, baseline: str = "naive") -> dict:
    out: dict = {}
    for variant, runs in chat.items():
        if variant == baseline:
            continue
        for n, stats in runs.items():
            base = chat[baseline].get(n)
            if base and base["tokens_per_s"] and stats["tokens_per_s"]:
                out.setdefault(variant, {})[n] = {
                    "tokens_per_s": round(stats["tokens_per_s"] / base["tokens_per_s"], 2),
                    "ttft_p50": round(base["ttft_ms"]["p50"] / stats["ttft_ms"]["p50"], 2),
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu-smoke")
    ap.add_argument("--model", type=Path, help="chat model folder (default: build a random-weight one)")
    ap.add_argument("--concurrency", type=int, nargs="*", help="sessions per chat run (overrides the profile)")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--variants", nargs="*", help="run only these of the profile's configurations (the naive baseline always runs)")
    ap.add_argument("--only", nargs="*", default=["chat", "web", "mixed", "media"], choices=["chat", "web", "mixed", "media"])
    ap.add_argument("--with-media", action="store_true", help="run the speech and vision benchmarks too")
    ap.add_argument("--chat-first", choices=["auto", "on", "off"], help="the mixed server's ASSISTANT_CHAT_FIRST")
    ap.add_argument("--mixed-rounds", type=int, help="chat bursts each way in the mixed phase (the median one counts)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--logs", type=Path, help="copy the servers' logs here as servers.log")
    args = ap.parse_args()
    prof = dict(PROFILES[args.profile])
    if args.concurrency:
        prof["concurrency"] = args.concurrency
    if args.chat_first:
        prof["mixed"] = {**prof["mixed"], "server_args": [*prof["mixed"].get("server_args", []), "--chat-first", args.chat_first]}
    if args.mixed_rounds:
        prof["mixed"] = {**prof["mixed"], "rounds": args.mixed_rounds}
    if args.max_new_tokens:
        prof["max_new_tokens"] = args.max_new_tokens
    if args.variants:
        unknown = set(args.variants) - set(prof["variants"])
        if unknown:
            ap.error(f"no variant {sorted(unknown)} in profile {args.profile}: {sorted(prof['variants'])}")
        prof["variants"] = {k: v for k, v in prof["variants"].items() if k in args.variants}
    out = args.out or ROOT / "bench" / "results" / f"load_{args.profile}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    result: dict = {
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "profile": args.profile,
        "settings": {k: v for k, v in prof.items() if k != "variants"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    import torch

    if torch.cuda.is_available():
        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    result["machine"]["torch"] = torch.__version__
    model = args.model
    if model is None and {"chat", "mixed"} & set(args.only):
        from bench.chat_model import build_chat_model

        t = time.perf_counter()
        model = build_chat_model(workdir / "chat-model", prof["shape"])
        print(f"built {prof['shape']} chat model in {time.perf_counter() - t:.1f} s", flush=True)
    common = ["--chat-model", str(model), "--device", prof["device"], "--max-new-tokens", str(prof["max_new_tokens"])]

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    chat: dict = {}
    servers = {"naive": ["--mode", "naive"], **{k: ["--mode", "ours", *v] for k, v in prof["variants"].items()}}

    def chat_phase(names: list[str]) -> None:
        result["chat"] = chat
        for name in names:
            print(f"chat: {name} ({time.strftime('%H:%M:%S')})", flush=True)
            try:
                srv = ServerProcess(name, [*common, *servers[name]], workdir, free_port())
            except RuntimeError as exc:
                chat[name] = {"error": str(exc)[-3000:]}
                print(chat[name]["error"], flush=True)
                continue
            try:
                if name == "naive":  # one generate at a time: a bounded window is enough to measure it
                    chat[name] = chat_runs(srv, prof["naive_concurrency"], prof["naive_cap_s"], 1)
                else:
                    chat[name] = chat_runs(srv, prof["concurrency"], prof["cap_s"], 16)
                result.setdefault("server_rss_mib", {})[name] = round(srv.rss() / 2**20, 1)
            except Exception as exc:  # noqa: BLE001 - keep the other variants' results
                chat[name] = {"error": f"{type(exc).__name__}: {exc}", "log": srv.tail()}
                print(chat[name], flush=True)
            finally:
                srv.stop()
            if "error" not in chat.get("naive", {"error": 1}):
                result["ratios_vs_naive"] = ratios({k: v for k, v in chat.items() if "error" not in v})
            save()

    # The baseline and the first (the product's) configuration first; the other configurations last.
    names = list(servers)
    if "chat" in args.only:
        chat_phase(names[:2])
    if "web" in args.only:
        print("web process", flush=True)
        result["web_process"] = web_process(workdir, prof["flood_sessions"], prof["flood_words"], prof["idle"])
        save()
    if "mixed" in args.only:
        print("chat with speech and vision load", flush=True)
        try:
            result["mixed"] = mixed(workdir, common, prof["mixed"])
        except Exception as exc:  # noqa: BLE001 - keep what the other phases measured
            result["mixed"] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
            print(result["mixed"], flush=True)
        save()
    if "media" in args.only and (prof["media"] or args.with_media):
        print("speech and vision", flush=True)
        result["media"] = media(prof["device"], out.parent, args.profile, prof["mixed"])
        save()
    if "chat" in args.only:
        chat_phase(names[2:])
    if args.logs:
        with open(args.logs / "servers.log", "w") as f:
            for log in sorted(workdir.glob("*.log")):
                f.write(f"===== {log.name}\n{log.read_text()[-20000:]}\n")
    from bench.plot import plot

    plot(result, out.with_suffix(".png"))
    print(json.dumps(result.get("ratios_vs_naive", {}), indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
