"""A decoder-only Transformer (RMSNorm, RoPE, causal GQA attention, SwiGLU or MoE FFNs).

Plain PyTorch for one process: nothing here knows about ranks. Build on the meta device for
large shapes, then `to_empty(device=...)` and `init_weights()`.
Shapes: B batch, T sequence, D model dim, H heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from moetrain.config import ModelConfig
from moetrain.model.experts import SwiGLU
from moetrain.model.init import seeded_normal_
from moetrain.model.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # at least fp32: bf16 squares lose too much; fp64 models stay fp64
        x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None):
    """cos, sin tables (max_seq_len, head_dim / 2) for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh), rotating interleaved-free halves: (x1, x2) -> (x1 cos - x2 sin, ...)."""
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def init_weights(self, std: float) -> None:
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, std=std)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv,..)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id in cfg.moe_layers
        self.ffn = (MoE(cfg.dim, cfg.moe, cfg.balance) if self.is_moe
                    else SwiGLU(cfg.dim, cfg.ffn_hidden))
        # Activation checkpointing: keep only the block's input, recompute the rest in backward
        # (Transformer.checkpoint_activations turns it on).
        self.checkpoint_activations = False

    def forward(self, x, cos, sin):
        if self.checkpoint_activations and torch.is_grad_enabled():
            # No early stop: the recomputation runs the whole block, so under expert
            # parallelism every rank re-issues the same all-to-alls in backward.
            with set_checkpoint_early_stop(False):
                return checkpoint(self._forward, x, cos, sin, use_reentrant=False,
                                  context_fn=self._checkpoint_contexts)
        return self._forward(x, cos, sin)

    def _checkpoint_contexts(self):
        """(forward, recomputation): the recomputation must not count the tokens again."""
        recompute = self.ffn.recomputation() if self.is_moe else contextlib.nullcontext()
        return contextlib.nullcontext(), recompute

    def _forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if self.is_moe:
            ffn_out, aux_loss = self.ffn(self.ffn_norm(x))
        else:
            ffn_out, aux_loss = self.ffn(self.ffn_norm(x)), None
        return x + ffn_out, aux_loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.output.weight.device.type != "meta":  # on meta: init after materialising
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter and buffer in place; call after `to_empty` from meta.

        Each parameter is drawn from generators seeded by (seed, its name, row), so the weights
        are the same whatever sharding the parameters have (moetrain.model.init). seed=None
        draws one from torch's global RNG: `torch.manual_seed(s)` then `Transformer(cfg)` is
        reproducible."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        cfg = self.cfg
        self.init_buffers()
        for name, param in self.named_parameters():
            if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                param.fill_(1.0)
            else:
                seeded_normal_(param, cfg.init_std, seed, name)
        for moe in self.moe_layers():
            if hasattr(moe.router, "expert_bias"):
                moe.router.expert_bias.zero_()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the buffers no checkpoint holds (rotary tables, per-step load counts): after
        `to_empty`, when the weights come from a checkpoint instead of `init_weights`."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers():
            moe.step_tokens_per_expert.zero_()

    def checkpoint_activations(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations: activation
        memory falls from every op's outputs per layer to one (B, T, D) input per layer, for
        about one more forward of compute."""
        for layer in self.layers:
            layer.checkpoint_activations = enabled

    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if layer.is_moe]

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) -> logits (B, T, vocab), aux loss (scalar, sum over MoE layers)."""
        T = tokens.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len="
                             f"{self.cfg.max_seq_len}")
        x = self.tok_embeddings(tokens)
        aux_total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
        for layer in self.layers:
            x, aux_loss = layer(x, self.rope_cos, self.rope_sin)
            if aux_loss is not None:
                aux_total = aux_total + aux_loss
        return self.output(self.norm(x)), aux_total


def num_params(model: Transformer) -> dict[str, int]:
    """Total parameters and parameters active per token (shared counted once, routed k/E)."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for moe in model.moe_layers() for p in moe.experts.parameters())
    moe_cfg = model.cfg.moe
    active_routed = 0
    if moe_cfg is not None and routed:
        active_routed = routed * moe_cfg.top_k // moe_cfg.num_experts
    return {"total": total, "active": total - routed + active_routed}
