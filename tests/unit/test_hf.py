"""Conversion to and from transformers, checked against transformers' own models (built from
configs, never downloaded): logits, greedy generation, round trips, the tokenizer, and the
settings that must refuse to convert."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from moetrain.checkpoint import load_model
from moetrain.config import BalanceConfig, ModelConfig, MoEConfig
from moetrain.data.tokenizer import ByteTokenizer, FileTokenizer
from moetrain.export import main as export_main
from moetrain.hf import export_hf, model_config_from_hf
from moetrain.integrity import MANIFEST, file_digest
from moetrain.train import Trainer
from tests.unit.test_trainer import tiny_run

transformers = pytest.importorskip("transformers")

LENGTHS = (3, 9, 16)  # padding-free sequences, each run on its own


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_mixtral(tmp_path: Path, **overrides) -> Path:
    cfg = transformers.MixtralConfig(**{**dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
        num_experts_per_tok=2, max_position_embeddings=32, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}), **overrides})
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    _spread_routers(model)
    model.save_pretrained(tmp_path / "hf_mixtral")
    return tmp_path / "hf_mixtral"


def hf_glm4_moe(tmp_path: Path, n_shared=2, **overrides) -> Path:
    fields = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=8,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=n_shared, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 1.0},
        num_nextn_predict_layers=0)
    cfg = transformers.Glm4MoeConfig(**{**fields, **overrides})
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(cfg)
    _spread_routers(model)
    with torch.no_grad():  # a trained score-correction bias, so selection != gating
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
    model.save_pretrained(tmp_path / "hf_glm")
    return tmp_path / "hf_glm"


def _spread_routers(model) -> None:
    """Larger router weights than the 0.02 init, so routing differs from token to token."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(std=0.5)


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def assert_same_logits(ours, directory: Path, vocab: int) -> None:
    torch.manual_seed(1)
    for length in LENGTHS:
        tokens = torch.randint(1, vocab, (1, length))
        with torch.no_grad():
            logits = ours(tokens)[0]
        assert rel_err(logits, hf_logits(directory, tokens)) <= 1e-5, length


# --------------------------------------------------------------------------- HF -> moetrain
@pytest.mark.parametrize("family", ["mixtral", "glm4_moe", "glm4_moe_no_shared"])
def test_import_gives_transformers_logits(tmp_path, family):
    directory = (hf_mixtral(tmp_path) if family == "mixtral"
                 else hf_glm4_moe(tmp_path, n_shared=0 if "no_shared" in family else 2))
    model, cfg = load_model(f"hf:{directory}")
    assert cfg.model.moe.router == ("softmax_topk" if family == "mixtral" else "sigmoid")
    assert_same_logits(model, directory, 96)


def test_import_of_a_dense_llama(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    model, run_cfg = load_model(f"hf:{tmp_path / 'llama'}")
    assert run_cfg.model.moe is None and run_cfg.model.tie_embeddings
    assert_same_logits(model, tmp_path / "llama", 64)


def hf_llama(tmp_path: Path) -> Path:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=40,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


@pytest.mark.parametrize("family", ["mixtral", "glm4_moe", "llama"])
def test_import_takes_transformers_defaults_for_fields_config_json_leaves_out(tmp_path,
                                                                             family):
    """A hand-written config.json may leave out fields; the model must be the one
    transformers builds from it, whose defaults differ by family (Mixtral's rope theta is 1e6,
    its eps 1e-5)."""
    directory = {"mixtral": hf_mixtral, "glm4_moe": hf_glm4_moe, "llama": hf_llama}[family](
        tmp_path)
    config = json.loads((directory / "config.json").read_text())
    for key in ("rms_norm_eps", "max_position_embeddings", "rope_theta"):
        config.pop(key, None)
    config.get("rope_parameters", {}).pop("rope_theta", None)
    if family == "llama":  # the saved weights have as many kv heads as heads
        config.pop("num_key_value_heads")
    (directory / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoConfig.from_pretrained(directory)
    ours = model_config_from_hf(config)
    assert ours.norm_eps == theirs.rms_norm_eps
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.max_seq_len == theirs.max_position_embeddings
    assert ours.n_kv_heads == theirs.num_key_value_heads
    model, _ = load_model(f"hf:{directory}")
    assert_same_logits(model, directory, 96)


def test_import_of_a_config_without_a_needed_field_is_one_line(tmp_path):
    config = json.loads((hf_mixtral(tmp_path) / "config.json").read_text())
    del config["num_local_experts"]
    with pytest.raises(ValueError, match="config.json has no 'num_local_experts' "
                                         r"\(model_type 'mixtral' needs it\)"):
        model_config_from_hf(config)


@pytest.mark.parametrize("head", ["different", "equal"])
def test_a_tied_model_that_stores_its_own_head_loads_as_transformers_loads_it(tmp_path, head):
    """transformers leaves the embeddings untied when the checkpoint's lm_head differs from
    them (and ties an equal one)."""
    from safetensors.torch import load_file, save_file
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    weights = tmp_path / "llama" / "model.safetensors"
    tensors = load_file(weights)
    embeddings = tensors["model.embed_tokens.weight"]
    tensors["lm_head.weight"] = (torch.randn_like(embeddings) if head == "different"
                                 else embeddings.clone())
    save_file(tensors, weights, metadata={"format": "pt"})
    model, run_cfg = load_model(f"hf:{tmp_path / 'llama'}")
    assert run_cfg.model.tie_embeddings == (head == "equal")
    assert_same_logits(model, tmp_path / "llama", 64)


@pytest.mark.parametrize("field, value, message", [
    ("use_qk_norm", True, "use_qk_norm=true"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),
    ("head_dim", 16, "head_dim=16"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("model_type", "deepseek_v3", "model_type='deepseek_v3'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
     "rope_type='yarn'"),
])
def test_import_refuses_what_moetrain_cannot_represent(tmp_path, field, value, message):
    directory = hf_glm4_moe(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config[field] = value
    if field == "partial_rotary_factor":
        config["rope_parameters"].pop("partial_rotary_factor")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        model_config_from_hf(config)
    if field != "model_type":
        assert "in config.json has no moetrain equivalent" in str(err.value)


def test_import_refuses_unexpected_tensors(tmp_path):
    from safetensors.torch import save_file
    directory = hf_mixtral(tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text()
                       ) if (directory / "model.safetensors.index.json").exists() else None
    assert index is None  # one file: add a stray tensor to it
    from safetensors.torch import load_file
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.block_sparse_moe.experts.6.w1.weight"] = torch.zeros(24, 32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.block_sparse_moe"
                                         r".experts.6.w1.weight'\]"):
        load_model(f"hf:{directory}")


# --------------------------------------------------------------------------- moetrain -> HF
def trained_checkpoint(tmp_path: Path, family: str, **model_overrides) -> Path:
    if family == "mixtral":
        moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32)
        balance = BalanceConfig(aux_loss="switch")
    else:
        moe = MoEConfig(router="sigmoid", num_experts=8, top_k=3, expert_hidden=16, n_groups=4,
                        topk_groups=2, n_shared_experts=2, route_scale=2.0)
        balance = BalanceConfig(aux_free=True, bias_update_rate=0.05)
    cfg = tiny_run(tmp_path, moe, balance, steps=3)
    cfg.model.n_kv_heads = 1
    if family != "mixtral":
        cfg.model.n_layers, cfg.model.first_k_dense = 3, 1
    for key, value in model_overrides.items():
        setattr(cfg.model, key, value)
    Trainer(cfg).fit()
    return tmp_path / "run"


def greedy_hf(directory: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_export_loads_in_transformers_with_equal_logits_and_generation(tmp_path, family):
    from moetrain.generate import generate
    run_dir = trained_checkpoint(tmp_path, family, tie_embeddings=family == "deepseek")
    out = export_hf(run_dir, tmp_path / "hf", max_shard_size=40_000)  # several shards
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and shards[-1].endswith(f"of-{len(shards):05d}.safetensors")
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert type(hf_model).__name__ == ("MixtralForCausalLM" if family == "mixtral"
                                       else "Glm4MoeForCausalLM")
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    ours, _ = load_model(run_dir)
    assert_same_logits(ours, out, 256)
    prompt = list(b"the ")
    ours_greedy = generate(ours, prompt, 20, temperature=0, eos_id=0)
    assert ours_greedy == greedy_hf(out, prompt, 20)


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_round_trip_is_bit_identical(tmp_path, family):
    run_dir = trained_checkpoint(tmp_path, family)
    ours, cfg = load_model(run_dir)
    export_hf(run_dir, tmp_path / "hf")
    back, back_cfg = load_model(f"hf:{tmp_path / 'hf'}")
    assert back_cfg.model == cfg.model  # balancing and init settings included
    state, back_state = ours.state_dict(), back.state_dict()
    assert state.keys() == back_state.keys()
    for key in state:
        assert torch.equal(state[key], back_state[key]), key
    if family == "deepseek":  # the trained selection bias made it across
        assert back.layers[1].ffn.router.expert_bias.abs().sum() > 0


def test_bf16_export_keeps_the_selection_bias_in_fp32(tmp_path):
    from safetensors import safe_open
    run_dir = trained_checkpoint(tmp_path, "deepseek")
    out = export_hf(run_dir, tmp_path / "hf", dtype="bfloat16")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(out / index["model.layers.1.mlp.gate.weight"], "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias"
                            ).dtype == torch.float32


def save_config_as_if_written(yaml, config: Path) -> None:
    """Edit a checkpoint's config.yaml and its manifest entry, as if the run had saved it so
    (an edit alone fails verification, as it should)."""
    from omegaconf import OmegaConf
    OmegaConf.save(yaml, config)
    manifest = json.loads((config.parent / MANIFEST).read_text())
    manifest["files"]["config.yaml"] = file_digest(config)
    (config.parent / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (dict(router="expert_choice", top_k=2, n_groups=1, topk_groups=1),
     "moe.router='expert_choice'"),
    (dict(capacity_factor=1.25), "moe.capacity_factor=1.25"),
    (dict(shared_hidden=20), r"moe.shared_hidden=20 x moe.n_shared_experts=2"),
    (dict(n_groups=8, topk_groups=4), "moe.num_experts=8 in moe.n_groups=8"),
])
def test_export_refuses_settings_without_equivalent_before_writing(tmp_path, change, message,
                                                                   capsys):
    run_dir = trained_checkpoint(tmp_path, "deepseek")
    config = run_dir / "checkpoints" / "step_00000003" / "config.yaml"
    from omegaconf import OmegaConf
    yaml = OmegaConf.load(config)
    for key, value in change.items():
        yaml.model.moe[key] = value
    if change.get("router") == "expert_choice":
        yaml.model.balance.aux_free = False
    save_config_as_if_written(yaml, config)
    assert export_main([str(run_dir), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("\\", "") in err[0], err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_mixtral_export_refuses_switch_and_dense_first_layers():
    from moetrain.hf import hf_config
    switch = ModelConfig(moe=MoEConfig(router="top1", top_k=1))
    with pytest.raises(ValueError, match=r"moe.router='top1' has no transformers equivalent"):
        hf_config(switch, 0)
    with pytest.raises(ValueError, match=r"model.first_k_dense=1"):
        hf_config(ModelConfig(first_k_dense=1), 0)
    with pytest.raises(ValueError, match=r"moe.norm_topk_prob=false"):
        hf_config(ModelConfig(moe=MoEConfig(norm_topk_prob=False)), 0)


def test_export_never_replaces_a_directory_unasked(tmp_path, capsys):
    run_dir = trained_checkpoint(tmp_path, "mixtral")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(run_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert export_main([str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()



def test_the_default_out_of_a_checkpoint_is_beside_it_in_its_run(tmp_path, capsys):
    run_dir = trained_checkpoint(tmp_path, "mixtral")
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert export_main([str(checkpoint)]) == 0
    out = run_dir / f"export-hf-{checkpoint.name}"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "config.json").is_file() and not (checkpoint / "export-hf").exists()
    assert export_main([str(run_dir), "--format", "safetensors"]) == 0
    assert (run_dir / "export-safetensors" / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_export_never_replaces_its_own_source_or_a_file(tmp_path, capsys, fmt):
    run_dir = trained_checkpoint(tmp_path, "mixtral")
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    for out in (run_dir, run_dir / "checkpoints", checkpoint):
        assert export_main([str(run_dir), "--format", fmt, "--out", str(out),
                            "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds the checkpoint being exported" in err[0], err
    assert export_main([str(checkpoint), "--format", fmt, "--out",
                        str(checkpoint / "export")]) == 2
    assert "is inside the checkpoint being exported" in capsys.readouterr().err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    (tmp_path / "file").write_text("mine")
    assert export_main([str(run_dir), "--format", fmt, "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_logical_safetensors_format_is_kept(tmp_path):
    from safetensors.torch import load_file
    run_dir = trained_checkpoint(tmp_path, "mixtral")
    assert export_main([str(run_dir), "--format", "safetensors",
                        "--out", str(tmp_path / "st")]) == 0
    ours, _ = load_model(run_dir)
    tensors = load_file(tmp_path / "st" / "model.safetensors")
    assert tensors.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(tensors[key], value), key


# --------------------------------------------------------------------------- tokenizer
def random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = ["\x00", "Ā", "<|endoftext|>", "é", "日本語", "🙂", " ", "\n", "\t", "abc", "\r\n",
              "\ufffd", "\U0010FFFF", "Ä"]
    out = []
    for _ in range(count):
        s = "".join(rng.choice(pieces) if rng.random() < 0.5 else chr(rng.randrange(32, 0x3000))
                    for _ in range(rng.randrange(0, 12)))
        out.append(s)
    return out


def test_exported_byte_tokenizer_matches_moetrain(tmp_path):
    run_dir = trained_checkpoint(tmp_path, "mixtral")
    out = export_hf(run_dir, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = ByteTokenizer()
    assert hf_tok.eos_token_id == ours.eos_id
    file_tok = FileTokenizer(str(out))  # moetrain reading the exported file itself
    assert file_tok.eos_id == ours.eos_id
    for text in random_strings(300):
        ids = ours.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert file_tok.encode(text) == ids, repr(text)
        assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    rng = random.Random(1)
    for _ in range(300):  # arbitrary bytes, invalid UTF-8 and eos tokens included
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 16))]
        assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids), ids


def test_a_tokenizers_file_used_for_training_is_copied_as_is(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tok.json"))
    run_dir = trained_checkpoint(tmp_path, "mixtral")
    config = run_dir / "checkpoints" / "step_00000003" / "config.yaml"
    from omegaconf import OmegaConf
    yaml = OmegaConf.load(config)
    yaml.data.tokenizer = str(tmp_path / "tok.json")
    save_config_as_if_written(yaml, config)
    out = export_hf(run_dir, tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok.json").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == vocab["</s>"]



def test_the_built_in_bpe_exports_to_an_equal_transformers_tokenizer(tmp_path):
    from moetrain.hf.tokenizer import write_tokenizer
    eos = write_tokenizer("stdlib-bpe-2048", tmp_path, model_max_length=128)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = FileTokenizer("stdlib-bpe-2048")
    assert eos == hf_tok.eos_token_id == ours.eos_id == 0
    for text in random_strings(300) + ["def f(x):\n    return x  # <|endoftext|> is text"]:
        ids = ours.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert hf_tok.decode(ids) == ours.decode(ids) == text

# --------------------------------------------------------------------------- init_from
def test_init_from_hf_trains_from_the_transformers_weights(tmp_path):
    directory = hf_glm4_moe(tmp_path, vocab_size=256)  # the bytes tokenizer's 256 ids
    moe = MoEConfig(router="sigmoid", num_experts=4, top_k=1)  # replaced by the checkpoint's
    cfg = tiny_run(tmp_path, moe, BalanceConfig(aux_free=True), steps=2)
    cfg.init_from = f"hf:{directory}"
    cfg.data.seq_len = 16
    trainer = Trainer(cfg)
    assert trainer.cfg.model.moe.num_experts == 8 and trainer.cfg.model.balance.aux_free
    reference, _ = load_model(f"hf:{directory}")
    for key, value in reference.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key].cpu(), value.cpu()), key
    summary = trainer.fit()
    assert summary["step"] == 2 and summary["loss"] == summary["loss"]  # finite
    shutil.rmtree(directory)


def test_the_tools_read_a_short_context_transformers_model_in_blocks_it_can_take(tmp_path):
    from moetrain.specialisation import main as specialisation_main
    directory = hf_mixtral(tmp_path, vocab_size=256)  # max_position_embeddings 32
    _, cfg = load_model(f"hf:{directory}")
    assert cfg.data.seq_len == cfg.model.max_seq_len == 32
    assert specialisation_main([f"hf:{directory}", "--data", "synthetic", "--tokens",
                                "128"]) == 0


def test_init_from_a_moetrain_export_takes_the_runs_training_settings_and_resumes(tmp_path):
    """The architecture comes from the export; balancing, router freezing and capacity from
    the run's own config, not from the moetrain config the export carries. The same command
    with resume=auto continues the run (init_from only starts it)."""
    out = export_hf(trained_checkpoint(tmp_path, "deepseek"), tmp_path / "hf")
    moe = MoEConfig(num_experts=4, top_k=1, freeze_router=True, capacity_factor=1.0)
    cfg = tiny_run(tmp_path / "ft", moe, BalanceConfig(aux_loss="none"), steps=4)
    cfg.init_from, cfg.data.seq_len = f"hf:{out}", 16
    cfg.train.log_every, cfg.checkpoint.every, cfg.train.exit_at_step = 1, 2, 2
    cfg.monitor.on_collapse = "warn"  # nothing balances this run
    trainer = Trainer(copy.deepcopy(cfg))
    model_cfg = trainer.cfg.model
    assert model_cfg.moe.num_experts == 8 and model_cfg.moe.router == "sigmoid"  # the export's
    assert model_cfg.balance == BalanceConfig(aux_loss="none")  # the run's, not aux_free
    assert model_cfg.moe.freeze_router and model_cfg.moe.capacity_factor == 1.0
    routers = {k: v.clone() for k, v in trainer.model.state_dict().items() if "router" in k}
    trainer.fit()
    for key, value in routers.items():  # frozen, and no bias balancing moved them
        assert torch.equal(trainer.model.state_dict()[key], value), key
    cfg.resume = "auto"
    resumed = Trainer(copy.deepcopy(cfg))
    assert resumed.step == 2
    assert resumed.fit()["step"] == 4


@pytest.mark.parametrize("ships, run_setting, expected", [
    ("byte", "stdlib-bpe-2048", "byte"),  # data=local_text's default yields to the checkpoint's
    ("stdlib-bpe-2048", "byte", "DIR"),
    ("stdlib-bpe-2048", "stdlib-bpe-2048", "stdlib-bpe-2048"),  # the same file: kept, silent
    (None, "stdlib-bpe-2048", "stdlib-bpe-2048"),  # a checkpoint without one: the run's own
])
def test_init_from_hf_reads_text_with_the_checkpoints_tokenizer(tmp_path, capsys, ships,
                                                                run_setting, expected):
    from moetrain.hf.tokenizer import write_tokenizer
    from moetrain.train import apply_init_from_hf
    directory = hf_glm4_moe(tmp_path, vocab_size=2048)
    if ships:
        write_tokenizer(ships, directory, model_max_length=128)
    cfg = tiny_run(tmp_path, MoEConfig(router="sigmoid"), BalanceConfig(aux_free=True))
    cfg.data.tokenizer, cfg.init_from = run_setting, f"hf:{directory}"
    apply_init_from_hf(cfg)
    assert cfg.data.tokenizer == (str(directory) if expected == "DIR" else expected)
    out = capsys.readouterr().out
    if cfg.data.tokenizer == run_setting:
        assert "using its tokenizer" not in out
    else:
        assert f"using its tokenizer (data.tokenizer={cfg.data.tokenizer}), " \
               f"not data.tokenizer={run_setting}" in out


# --------------------------------------------------------------------------- LoRA export
def lora_run(tmp_path: Path, base: str, family: str) -> Path:
    from moetrain.config import FinetuneConfig, LoRAConfig
    moe = (MoEConfig(num_experts=4, top_k=2, expert_hidden=32) if family == "mixtral" else
           MoEConfig(router="sigmoid", num_experts=8, top_k=3, expert_hidden=16, n_groups=4,
                     topk_groups=2, n_shared_experts=2, route_scale=2.0))
    cfg = tiny_run(tmp_path / "lora", moe, steps=4)
    if not base.startswith("hf:"):
        from moetrain.checkpoint import load_run_config
        cfg.model = load_run_config(Path(base)).model
    cfg.init_from = base
    targets = ["experts", "attention"] + (["shared_experts", "dense_ffn"]
                                          if family == "deepseek" else [])
    cfg.finetune = FinetuneConfig(LoRAConfig(rank=4, alpha=8.0, targets=targets))
    cfg.optim.lr = 3e-2  # adapters far from zero, so merging is tested on real deltas
    trainer = Trainer(cfg)  # an hf: base sets the architecture itself
    trainer.fit()
    return tmp_path / "lora" / "run"


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_export_of_a_lora_run_merges_the_adapters(tmp_path, family):
    base_run = trained_checkpoint(tmp_path, family)
    run_dir = lora_run(tmp_path, str(base_run / "checkpoints" / "step_00000003"), family)
    unmerged, _ = load_model(run_dir, merge=False)
    base, _ = load_model(base_run)
    out = export_hf(run_dir, tmp_path / "hf")
    assert_same_logits(unmerged, out, 256)  # transformers runs the merged weights
    tokens = torch.randint(1, 256, (1, 9))
    with torch.no_grad():
        assert rel_err(base(tokens)[0], unmerged(tokens)[0]) > 1e-3  # the adapters matter
    # moetrain's own format: the merged tensors under the base's names
    from safetensors.torch import load_file
    assert export_main([str(run_dir), "--format", "safetensors",
                        "--out", str(tmp_path / "st")]) == 0
    tensors = load_file(tmp_path / "st" / "model.safetensors")
    merged, _ = load_model(run_dir)
    assert tensors.keys() == merged.state_dict().keys() == base.state_dict().keys()
    for key, value in merged.state_dict().items():
        assert torch.equal(tensors[key], value), key


def test_lora_on_a_transformers_base_exports_with_equal_logits(tmp_path):
    directory = hf_mixtral(tmp_path, vocab_size=256)  # the byte tokenizer's
    run_dir = lora_run(tmp_path, f"hf:{directory}", "mixtral")
    unmerged, cfg = load_model(run_dir, merge=False)
    assert cfg.init_from == f"hf:{directory.resolve()}"
    assert_same_logits(unmerged, export_hf(run_dir, tmp_path / "hf_out"), 256)
