"""The slot engine's forward for Llama- and Qwen2-style decoders, in fewer kernels.

Replayed from a CUDA graph, a decode step of a small model costs what its kernels cost one after
another, a few microseconds each whatever their size: transformers' Qwen2 decoder launches about 41
per layer (RMSNorm alone is eight: casts, pow, mean, add, rsqrt and two multiplies; rotary
embeddings ten). This forward runs the same arithmetic over the model's own weights in about 14 per
layer on a GPU:

- RMSNorm through ``F.rms_norm`` (one fused kernel on CUDA);
- q, k and v from one matmul, gate and up from one: the module's weights become views of one merged
  tensor each, so no memory is added and the model's own forward still reads the same numbers;
- rotary embeddings for q and k together, as ``x * cos + roll(x) * signed_sin`` (three kernels),
  from a cos/sin table built once for every position;
- grouped-query attention without repeating keys: the query heads that share a key head are laid
  out as that head's queries, so SDPA reads each key once, under an additive mask built once per step;
- the residual additions folded into the output and down projections (``addmm_`` into the stream).

``fusable`` says why a model is not taken; the slot engine then runs the model's own decoder, and
its load check compares either against the model's own forward.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURES = ("llama", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq and its scaling fixed at load


def fusable(model: Any) -> str | None:
    """None when :class:`FusedDecoder` computes what ``model``'s decoder does; else why not."""
    import torch

    cfg = model.config.get_text_config()
    if cfg.model_type not in ARCHITECTURES:
        return f"architecture {cfg.model_type!r} (fused: {', '.join(ARCHITECTURES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "activation or tensor-parallel layout"
    decoder = model.get_decoder()
    rope = getattr(getattr(decoder, "rotary_emb", None), "rope_type", None)
    if rope not in STATIC_ROPE:
        return f"rotary embedding type {rope!r}"
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not torch.nn.Linear for m in linears):
            return "projections that are not plain linear layers (quantized?)"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
    return None


def _merge(torch: Any, linears: list[Any]) -> tuple[Any, Any]:
    """One weight (and bias) for ``linears``; each module's own become views of it."""
    weight = torch.cat([m.weight.data for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias.data if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight.data = weight[start:end]
        if m.bias is not None:
            m.bias.data = bias[start:end]
        start = end
    return weight, bias


class _Layer:
    __slots__ = ("ln1", "ln2", "eps1", "eps2", "qkv", "qkv_bias", "o", "o_bias", "gate_up", "gate_up_bias",
                 "down", "down_bias", "scaling")  # fmt: skip


class FusedDecoder:
    """``forward(ids, positions, mask) -> last hidden states``, writing keys and values through
    ``cache.update`` (the slot engine's static cache) as the model's own layers do."""

    def __init__(self, model: Any, cache: Any, max_len: int) -> None:
        import torch

        self.torch = torch
        self.cache = cache
        decoder = model.get_decoder()
        cfg = model.config.get_text_config()
        first = decoder.layers[0].self_attn
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = first.head_dim
        self.group = self.heads // self.kv_heads
        self.hidden = cfg.hidden_size
        self.embed = decoder.embed_tokens.weight
        self.norm, self.norm_eps = decoder.norm.weight, decoder.norm.variance_epsilon
        self.layers = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fused = _Layer()
            fused.ln1, fused.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
            fused.ln2, fused.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
            fused.qkv, fused.qkv_bias = _merge(torch, [attn.q_proj, attn.k_proj, attn.v_proj])
            fused.gate_up, fused.gate_up_bias = _merge(torch, [mlp.gate_proj, mlp.up_proj])
            fused.o, fused.o_bias = attn.o_proj.weight, attn.o_proj.bias
            fused.down, fused.down_bias = mlp.down_proj.weight, mlp.down_proj.bias
            fused.scaling = attn.scaling
            self.layers.append(fused)
        # cos and sin for every position, as the model's rotary module computes them (float32
        # angles, scaled, then the model's dtype); sin signed so that rotate_half(x) * sin is
        # roll(x, half) * signed_sin.
        rotary = decoder.rotary_emb
        positions = torch.arange(max_len + 1, dtype=torch.float32, device=self.embed.device)
        freqs = positions[:, None] * rotary.inv_freq.float()[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        dtype = self.embed.dtype
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(angles.device)
        self.cos = (angles.cos() * rotary.attention_scaling).to(dtype)
        self.sin = (angles.sin() * rotary.attention_scaling).to(dtype) * sign.to(dtype)

    def _bias(self, mask: Any) -> Any:
        """[B, 1, T, L] boolean mask -> additive bias for the grouped queries [B, 1, G*T, L]."""
        torch = self.torch
        b, _, t, length = mask.shape
        grouped = mask[:, :, None].expand(b, 1, self.group, t, length).reshape(b, 1, self.group * t, length)
        return torch.zeros(grouped.shape, dtype=self.embed.dtype, device=mask.device).masked_fill_(
            grouped.logical_not(), float("-inf")
        )

    def __call__(self, ids: Any, positions: Any, mask: Any) -> Any:
        torch = self.torch
        F = torch.nn.functional
        b, t = ids.shape
        heads, kv, d, g, hidden = self.heads, self.kv_heads, self.head_dim, self.group, self.hidden
        n_qk = (heads + kv) * d
        x = F.embedding(ids, self.embed)  # [B, T, H]: the residual stream, updated in place
        flat = x.view(b * t, hidden)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [B, T, 1, D]
        bias = self._bias(mask)
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (hidden,), layer.ln1, layer.eps1)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            qk = qkv[..., :n_qk].view(b, t, heads + kv, d)
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin)
            q, k = qk[:, :, :heads], qk[:, :, heads:]
            v = qkv[..., n_qk:].view(b, t, kv, d)
            keys, values = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), i)
            # query heads h*G..h*G+G-1 share key head h: they become head h's G*T queries
            q = q.reshape(b, t, kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=layer.scaling)
            out = out.reshape(b, kv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b * t, heads * d)
            flat.addmm_(out, layer.o.t())
            if layer.o_bias is not None:
                flat.add_(layer.o_bias)
            h = F.rms_norm(x, (hidden,), layer.ln2, layer.eps2)
            gate, up = F.linear(h, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            flat.addmm_((F.silu(gate) * up).view(b * t, -1), layer.down.t())
            if layer.down_bias is not None:
                flat.add_(layer.down_bias)
        return F.rms_norm(x, (hidden,), self.norm, self.norm_eps)
