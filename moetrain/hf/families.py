"""Model families shared with transformers: one name table and one config mapping per family.

    mixtral   MixtralForCausalLM   softmax top-k router, renormalised gates, no shared experts
    glm4_moe  Glm4MoeForCausalLM   DeepSeek-V3 routing (sigmoid, score-correction bias,
                                   group-limited top-k, route scale, shared experts, first
                                   dense layers) with GQA attention
    llama     LlamaForCausalLM     a dense moetrain model (model.moe null)

A name table maps a moetrain parameter name (`{i}` a layer) to its name in a transformers
checkpoint; for stacked experts `{e}` is the expert, so one moetrain tensor (E, out, in) is E
tensors on disk, as hub checkpoints store them. A setting with no transformers equivalent raises
a ValueError naming it: a converted model is the same model or nothing.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

from moetrain.config import BalanceConfig, ModelConfig, MoEConfig

ATTENTION = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
DENSE_FFN = {
    "layers.{i}.ffn.w_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.ffn.w_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.ffn.w_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
MIXTRAL_MOE = {
    "layers.{i}.ffn.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "layers.{i}.ffn.experts.w_gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "layers.{i}.ffn.experts.w_down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "layers.{i}.ffn.experts.w_up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
}
GLM4_MOE = {
    "layers.{i}.ffn.router.weight": "model.layers.{i}.mlp.gate.weight",
    "layers.{i}.ffn.router.expert_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
    "layers.{i}.ffn.experts.w_gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "layers.{i}.ffn.experts.w_up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "layers.{i}.ffn.experts.w_down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "layers.{i}.ffn.shared_experts.w_gate.weight":
        "model.layers.{i}.mlp.shared_experts.gate_proj.weight",
    "layers.{i}.ffn.shared_experts.w_up.weight":
        "model.layers.{i}.mlp.shared_experts.up_proj.weight",
    "layers.{i}.ffn.shared_experts.w_down.weight":
        "model.layers.{i}.mlp.shared_experts.down_proj.weight",
}

# config.json key holding moetrain's own model config: what transformers has no field for
# (balancing, init scale, how shared experts are split) survives a round trip through it.
STASH_KEY = "moetrain_model"


def _fail(setting: str, why: str) -> None:
    raise ValueError(f"{setting} has no transformers equivalent: {why}")


def _refuse(setting: str, why: str) -> None:
    """An import's refusal: a config.json field moetrain cannot build."""
    raise ValueError(f"{setting} in config.json has no moetrain equivalent: {why}")


# --------------------------------------------------------------------------- moetrain -> HF
def _common_to_hf(m: ModelConfig, eos_id: int | None) -> dict:
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_theta": m.rope_theta,  # where transformers < 5 reads it
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
    }


def _check_moe_exportable(moe: MoEConfig) -> None:
    if moe.router == "expert_choice":
        _fail("moe.router='expert_choice'", "transformers' MoE blocks route each token to its "
              "own top-k experts")
    if moe.capacity_factor is not None:
        _fail(f"moe.capacity_factor={moe.capacity_factor}", "transformers' MoE blocks are "
              "dropless; set moe.capacity_factor=null (and fine-tune briefly) to export")


def mixtral_to_hf(m: ModelConfig, eos_id: int | None) -> dict:
    moe = m.moe
    _check_moe_exportable(moe)
    if moe.router == "top1":
        _fail("moe.router='top1'", "Switch gates with the raw probability; Mixtral renormalises "
              "the top-k weights (use router softmax_topk with norm_topk_prob true)")
    if not moe.norm_topk_prob:
        _fail("moe.norm_topk_prob=false", "MixtralForCausalLM always renormalises its top-k "
              "gate weights")
    if moe.route_scale != 1.0:
        _fail(f"moe.route_scale={moe.route_scale}", "MixtralForCausalLM has no gate scale")
    if moe.n_shared_experts:
        _fail(f"moe.n_shared_experts={moe.n_shared_experts}", "MixtralForCausalLM has no "
              "shared experts (use router sigmoid for the DeepSeek family)")
    if m.first_k_dense:
        _fail(f"model.first_k_dense={m.first_k_dense}", "every MixtralForCausalLM layer is MoE")
    return {**_common_to_hf(m, eos_id), "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral", "head_dim": m.dim // m.n_heads,
            "intermediate_size": moe.expert_hidden, "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "sliding_window": None,
            "router_jitter_noise": 0.0, "output_router_logits": False,
            "router_aux_loss_coef": m.balance.aux_loss_coef}


def glm4_moe_to_hf(m: ModelConfig, eos_id: int | None) -> dict:
    moe = m.moe
    _check_moe_exportable(moe)
    shared = moe.shared_hidden_size
    if shared % moe.expert_hidden:
        _fail(f"moe.shared_hidden={moe.shared_hidden} x moe.n_shared_experts="
              f"{moe.n_shared_experts}", f"Glm4MoeForCausalLM's shared experts are a multiple "
              f"of the expert width {moe.expert_hidden}, and {shared} is not")
    if moe.num_experts // moe.n_groups < 2:
        _fail(f"moe.num_experts={moe.num_experts} in moe.n_groups={moe.n_groups}",
              "Glm4MoeForCausalLM scores a group by its top-2 experts, so every group needs "
              "2 or more")
    rope = {"rope_type": "default", "rope_theta": m.rope_theta, "partial_rotary_factor": 1.0}
    return {**_common_to_hf(m, eos_id), "architectures": ["Glm4MoeForCausalLM"],
            "model_type": "glm4_moe", "rope_parameters": rope, "partial_rotary_factor": 1.0,
            "attention_bias": False,
            "use_qk_norm": False, "intermediate_size": m.ffn_hidden,
            "moe_intermediate_size": moe.expert_hidden, "n_routed_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "n_shared_experts": shared // moe.expert_hidden,
            "routed_scaling_factor": moe.route_scale, "n_group": moe.n_groups,
            "topk_group": moe.topk_groups, "first_k_dense_replace": m.first_k_dense,
            "norm_topk_prob": moe.norm_topk_prob, "num_nextn_predict_layers": 0,
            "output_router_logits": False}


def llama_to_hf(m: ModelConfig, eos_id: int | None) -> dict:
    return {**_common_to_hf(m, eos_id), "architectures": ["LlamaForCausalLM"],
            "model_type": "llama", "head_dim": m.dim // m.n_heads,
            "intermediate_size": m.ffn_hidden, "attention_bias": False, "mlp_bias": False,
            "pretraining_tp": 1}


# --------------------------------------------------------------------------- HF -> moetrain
def _get(c: dict, key: str, default=None):
    value = c.get(key, default)
    return default if value is None else value


# What transformers' config classes (5.x) assume for a field config.json leaves out: an
# import must build the model transformers would, not one with moetrain's own defaults.
MIXTRAL_DEFAULTS = dict(rope_theta=1e6, rms_norm_eps=1e-5, num_key_value_heads=8,
                        max_position_embeddings=4096 * 32)
GLM4_MOE_DEFAULTS = dict(rope_theta=1e4, rms_norm_eps=1e-5, num_key_value_heads=8,
                         max_position_embeddings=131072)
LLAMA_DEFAULTS = dict(rope_theta=1e4, rms_norm_eps=1e-6, num_key_value_heads=None,  # = heads
                      max_position_embeddings=2048)


def _common_from_hf(c: dict, defaults: dict) -> dict:
    heads = c["num_attention_heads"]
    dim = c["hidden_size"]
    if _get(c, "hidden_act", "silu") != "silu":
        _refuse(f"hidden_act={c['hidden_act']!r}", "moetrain's FFNs are SwiGLU (silu)")
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim != dim // heads:
        _refuse(f"head_dim={head_dim}", f"moetrain's attention uses hidden_size / "
                f"num_attention_heads = {dim // heads}")
    for key in ("attention_bias", "mlp_bias", "use_qk_norm"):
        if c.get(key):
            _refuse(f"{key}=true", "moetrain's projections have no bias and no q/k norm")
    max_positions = _get(c, "max_position_embeddings", defaults["max_position_embeddings"])
    if c.get("sliding_window") and c["sliding_window"] < max_positions:
        _refuse(f"sliding_window={c['sliding_window']}", "moetrain's attention is full causal")
    rope = dict(c.get("rope_parameters") or {})
    if c.get("rope_scaling"):
        rope.update(c["rope_scaling"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        _refuse(f"rope_type={rope_type!r}", "moetrain implements plain RoPE only")
    theta = _get(rope, "rope_theta", _get(c, "rope_theta", defaults["rope_theta"]))
    return dict(vocab_size=c["vocab_size"], dim=dim, n_layers=c["num_hidden_layers"],
                n_heads=heads,
                n_kv_heads=_get(c, "num_key_value_heads", defaults["num_key_value_heads"] or heads),
                max_seq_len=max_positions, rope_theta=float(theta),
                norm_eps=float(_get(c, "rms_norm_eps", defaults["rms_norm_eps"])),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                init_std=float(_get(c, "initializer_range", 0.02)))


def _partial_rotary(c: dict, default: float) -> float:
    rope = c.get("rope_parameters") or {}
    return float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", default)))


def mixtral_from_hf(c: dict) -> ModelConfig:
    common = _common_from_hf(c, MIXTRAL_DEFAULTS)
    if _get(c, "router_jitter_noise", 0.0):
        _refuse(f"router_jitter_noise={c['router_jitter_noise']}", "transformers' jitter "
                "also scales the experts' input; moetrain's moe.router_jitter scales only the "
                "router's. Set it to 0 in config.json and use moe.router_jitter")
    moe = MoEConfig(router="softmax_topk", num_experts=c["num_local_experts"],
                    top_k=c["num_experts_per_tok"], expert_hidden=c["intermediate_size"],
                    norm_topk_prob=True)
    return ModelConfig(**common, ffn_hidden=c["intermediate_size"], first_k_dense=0, moe=moe)


def glm4_moe_from_hf(c: dict) -> ModelConfig:
    common = _common_from_hf(c, GLM4_MOE_DEFAULTS)
    factor = _partial_rotary(c, 0.5)  # Glm4MoeConfig's default when the field is absent
    if factor != 1.0:
        _refuse(f"partial_rotary_factor={factor}", "moetrain rotates the whole head dimension")
    moe = MoEConfig(router="sigmoid", num_experts=c["n_routed_experts"],
                    top_k=c["num_experts_per_tok"], expert_hidden=c["moe_intermediate_size"],
                    n_shared_experts=_get(c, "n_shared_experts", 1),
                    route_scale=float(_get(c, "routed_scaling_factor", 1.0)),
                    n_groups=_get(c, "n_group", 1), topk_groups=_get(c, "topk_group", 1),
                    norm_topk_prob=bool(_get(c, "norm_topk_prob", True)))
    return ModelConfig(**common, ffn_hidden=c["intermediate_size"],
                       first_k_dense=min(_get(c, "first_k_dense_replace", 1),
                                         c["num_hidden_layers"]), moe=moe)


def llama_from_hf(c: dict) -> ModelConfig:
    if _get(c, "pretraining_tp", 1) != 1:
        _refuse(f"pretraining_tp={c['pretraining_tp']}", "moetrain's projections are unsplit")
    return ModelConfig(**_common_from_hf(c, LLAMA_DEFAULTS), ffn_hidden=c["intermediate_size"],
                       moe=None)


# --------------------------------------------------------------------------- the families
@dataclass(frozen=True)
class Family:
    name: str  # transformers' model_type
    architecture: str
    weights: dict[str, str]  # moetrain name pattern -> transformers name pattern
    to_hf: Callable[[ModelConfig, int | None], dict]
    from_hf: Callable[[dict], ModelConfig]


FAMILIES = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", {**ATTENTION, **MIXTRAL_MOE},
                      mixtral_to_hf, mixtral_from_hf),
    "glm4_moe": Family("glm4_moe", "Glm4MoeForCausalLM", {**ATTENTION, **DENSE_FFN, **GLM4_MOE},
                       glm4_moe_to_hf, glm4_moe_from_hf),
    "llama": Family("llama", "LlamaForCausalLM", {**ATTENTION, **DENSE_FFN},
                    llama_to_hf, llama_from_hf),
}


def family_for(m: ModelConfig) -> Family:
    """The transformers family a moetrain model exports to."""
    if m.moe is None:
        return FAMILIES["llama"]
    if m.moe.router == "sigmoid":
        return FAMILIES["glm4_moe"]
    if m.moe.router in ("softmax_topk", "top1"):
        return FAMILIES["mixtral"]
    _fail(f"moe.router={m.moe.router!r}", "only token-choice top-k routers have one")


def family_of_hf(c: dict) -> Family:
    model_type = c.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} in config.json is not supported; "
                         f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def hf_config(m: ModelConfig, eos_id: int | None) -> dict:
    """config.json for a moetrain model: the family's fields, plus moetrain's own config."""
    config = family_for(m).to_hf(m, eos_id)
    config[STASH_KEY] = dataclasses.asdict(m)
    return config


def empty_tensors(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Zero-size tensors transformers expects where moetrain has no module: a
    Glm4MoeForCausalLM without shared experts still holds a shared MLP of width 0."""
    if family_for(m).name != "glm4_moe" or m.moe.n_shared_experts:
        return {}
    shapes = {"gate_proj": (0, m.dim), "up_proj": (0, m.dim), "down_proj": (m.dim, 0)}
    return {f"model.layers.{i}.mlp.shared_experts.{proj}.weight": shape
            for i in m.moe_layers for proj, shape in shapes.items()}


def model_config_from_hf(c: dict) -> ModelConfig:
    """moetrain's ModelConfig for a transformers config.json (unsupported fields raise).

    A config.json written by moetrain carries its model config; it is used as is when it
    describes the same model as the transformers fields, so a round trip keeps balancing and
    init settings. If the file was edited since, the transformers fields win."""
    family = family_of_hf(c)
    try:
        derived = family.from_hf(c)
    except KeyError as error:  # a field transformers' config class has no default for either
        raise ValueError(f"config.json has no {error.args[0]!r} (model_type "
                         f"{family.name!r} needs it)") from None
    derived.validate()
    stashed = c.get(STASH_KEY)
    if stashed:
        candidate = model_config_from_dict(stashed)
        try:
            same = _architecture(family, candidate) == _architecture(family, derived)
        except ValueError:
            same = False
        if same:
            return candidate
    return derived


def _architecture(family: Family, m: ModelConfig) -> dict:
    fields = family.to_hf(m, None)
    fields.pop("initializer_range")
    fields.pop("router_aux_loss_coef", None)
    return fields


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    moe = d.pop("moe", None)
    balance = d.pop("balance", None) or {}
    return ModelConfig(**d, moe=MoEConfig(**moe) if moe is not None else None,
                       balance=BalanceConfig(**balance))


# --------------------------------------------------------------------------- names
def _regex(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{escaped}$")


def _rule(family: Family, name: str) -> tuple[str, str | None]:
    """(transformers pattern with the layer filled in, layer) for moetrain tensor `name`."""
    for ours, theirs in family.weights.items():
        match = _regex(ours).match(name)
        if match:
            layer = match.groupdict().get("i")
            return (theirs.replace("{i}", layer) if layer is not None else theirs), layer
    raise ValueError(f"moetrain tensor {name!r} has no name in the {family.name} family")


def is_stacked(family: Family, name: str) -> bool:
    """Whether moetrain tensor `name` is stacked experts (E, ...), one tensor per expert there."""
    return "{e}" in _rule(family, name)[0]


def to_hf_names(family: Family, name: str, num_experts: int) -> list[str]:
    """The transformers names of moetrain tensor `name`: one, or one per expert (in order)."""
    pattern, _ = _rule(family, name)
    if "{e}" in pattern:
        return [pattern.replace("{e}", str(e)) for e in range(num_experts)]
    return [pattern]


def from_hf_name(family: Family, name: str) -> tuple[str, int | None] | None:
    """(moetrain name, expert index or None) for a transformers tensor name, or None."""
    for ours, theirs in family.weights.items():
        match = _regex(theirs).match(name)
        if match:
            groups = match.groupdict()
            ours = ours.replace("{i}", groups["i"]) if "i" in groups else ours
            return ours, int(groups["e"]) if "e" in groups else None
    return None
