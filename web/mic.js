// Microphone capture: getUserMedia → AudioWorklet → mono Float32 → 16 kHz → PCM16 little-endian
// chunks of ~100 ms, plus an RMS level (0..1) for the meter. The caller sends the chunks as binary
// websocket frames (see audio.start in the protocol).

export const TARGET_RATE = 16000;
const CHUNK_SAMPLES = 1600; // 100 ms at 16 kHz

export function micSupported() {
  return Boolean(navigator.mediaDevices?.getUserMedia && window.AudioContext && window.AudioWorkletNode);
}

// Linear-interpolation resampler that keeps its phase across calls.
class Resampler {
  constructor(from, to) {
    this.ratio = from / to;
    this.pos = 0;
    this.prev = 0;
  }
  push(input) {
    if (this.ratio === 1) return input;
    const out = [];
    // Sample positions are relative to the start of `input`; index -1 is the previous chunk's last sample.
    while (this.pos < input.length - 1 + 1e-9) {
      const i = Math.floor(this.pos);
      const frac = this.pos - i;
      const a = i < 0 ? this.prev : input[i];
      const b = input[Math.min(i + 1, input.length - 1)];
      out.push(a + (b - a) * frac);
      this.pos += this.ratio;
    }
    this.pos -= input.length;
    this.prev = input[input.length - 1];
    return Float32Array.from(out);
  }
}

function toPcm16(samples) {
  const buf = new ArrayBuffer(samples.length * 2);
  const view = new DataView(buf);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return buf;
}

export class Recorder {
  constructor({ onChunk, onLevel }) {
    this.onChunk = onChunk;
    this.onLevel = onLevel;
    this.pending = [];
    this.pendingLen = 0;
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    // Ask for 16 kHz; browsers that cannot give it run at their rate and we resample.
    try {
      this.ctx = new AudioContext({ sampleRate: TARGET_RATE });
    } catch {
      this.ctx = new AudioContext();
    }
    await this.ctx.audioWorklet.addModule(new URL("./pcm-worklet.js", import.meta.url));
    this.resampler = new Resampler(this.ctx.sampleRate, TARGET_RATE);
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "pcm-tap");
    this.node.port.onmessage = (e) => this.feed(e.data);
    this.source.connect(this.node);
    this.startedAt = performance.now();
  }

  feed(input) {
    let sum = 0;
    for (let i = 0; i < input.length; i++) sum += input[i] * input[i];
    this.onLevel?.(Math.min(1, Math.sqrt(sum / input.length) * 4));
    const samples = this.resampler.push(input);
    this.pending.push(samples);
    this.pendingLen += samples.length;
    if (this.pendingLen >= CHUNK_SAMPLES) this.flush();
  }

  flush() {
    if (!this.pendingLen) return;
    const all = new Float32Array(this.pendingLen);
    let off = 0;
    for (const p of this.pending) { all.set(p, off); off += p.length; }
    this.pending = [];
    this.pendingLen = 0;
    this.onChunk(toPcm16(all));
  }

  async stop() {
    this.node?.port && (this.node.port.onmessage = null);
    this.source?.disconnect();
    this.node?.disconnect();
    this.stream?.getTracks().forEach((t) => t.stop());
    this.flush();
    this.onLevel?.(0);
    await this.ctx?.close().catch(() => {});
    return performance.now() - (this.startedAt || performance.now());
  }
}
