"""Generation: the KV-cached forward against the full forward, greedy and sampled decoding,
top-k / top-p filtering against independent references, argument checks, and the CLI."""

import math
import random

import pytest
import torch

from moetrain.checkpoint import load_model
from moetrain.config import (DataConfig, LoggerConfig, LoopConfig, ModelConfig, MoEConfig,
                             OptimConfig, RunConfig, WandbConfig)
from moetrain.data.tokenizer import build_tokenizer
from moetrain.generate import filter_logits, generate, main, next_token
from moetrain.model import Transformer
from moetrain.presets import tiny_deepseek, tiny_mixtral

CONFIGS = {
    "mixtral": tiny_mixtral(max_seq_len=64, init_std=0.1),
    "deepseek": tiny_deepseek(max_seq_len=64, init_std=0.1),
    "dense": ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1,
                         ffn_hidden=64, max_seq_len=64, init_std=0.1, moe=None),
}


def build(name: str, dtype=torch.float64) -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIGS[name]).to(dtype).eval()


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------------------ the KV cache
# (start, end) of each call into one cache: a prefill, single decode steps, a chunk of several
# tokens into the non-empty cache, more single steps.
CHUNKS = [(0, 7), (7, 8), (8, 9), (9, 10), (10, 15), (15, 16), (16, 17)]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_forward_equals_full_forward(name, dtype, rtol):
    model = build(name, dtype)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full, _ = model(tokens)  # (2, 17, V), no cache
        cache = model.new_kv_cache(2, max_len=20)
        for start, end in CHUNKS:
            assert cache.pos == start
            logits, aux = model(tokens[:, start:end], cache)
            scale = full[:, start:end].abs().max()
            torch.testing.assert_close(logits, full[:, start:end], rtol=0, atol=rtol * scale)
            assert aux.item() == 0  # eval mode: no balancing losses
    assert cache.pos == 17


def test_cache_rejects_what_does_not_fit_and_stays_unchanged():
    model = build("mixtral")
    with pytest.raises(ValueError, match="max_len=65 must be between 1 and model.max_seq_len=64"):
        model.new_kv_cache(1, max_len=65)
    cache = model.new_kv_cache(1, max_len=8)
    with torch.inference_mode():
        model(torch.zeros(1, 6, dtype=torch.long), cache)
        with pytest.raises(ValueError, match=r"6 \+ 3 new tokens = 9 .*max_len=8"):
            model(torch.zeros(1, 3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="batch size 2 but the KV cache holds 1"):
            model(torch.zeros(2, 1, dtype=torch.long), cache)
        assert cache.pos == 6
        full = model.new_kv_cache(1)
        model(torch.zeros(1, 60, dtype=torch.long), full)
        with pytest.raises(ValueError, match=r"60 \+ 5 new tokens = 65 .*max_seq_len=64"):
            model(torch.zeros(1, 5, dtype=torch.long), full)


# ------------------------------------------------------------------------------ decoding
def naive_greedy(model: Transformer, prompt_ids: list[int], steps: int) -> list[int]:
    """The whole sequence through the uncached forward at every step, argmax of the last."""
    sequence = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(torch.tensor([sequence]))
            sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(prompt_ids):]


@pytest.mark.parametrize("name", ["mixtral", "deepseek"])
def test_greedy_generate_equals_the_uncached_argmax_loop(name):
    model = build(name)
    ids = prompt(5)
    expected = naive_greedy(model, ids, 30)
    assert len(set(expected)) > 3  # the check means something: not one repeated token
    assert generate(model, ids, 30, temperature=0) == expected


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy():
    model = build("mixtral")
    ids = prompt(5)
    first = generate(model, ids, 30, temperature=1.0, seed=3)
    assert len(first) == 30 and all(0 <= t < 64 for t in first)
    assert generate(model, ids, 30, temperature=1.0, seed=3) == first
    # 30 draws from ~64 plausible tokens: equal by chance with probability ~1e-40
    assert generate(model, ids, 30, temperature=1.0, seed=4) != first
    greedy = generate(model, ids, 30, temperature=0)
    assert generate(model, ids, 30, temperature=0.7, top_k=1, seed=5) == greedy
    # a tiny nucleus holds only the most likely token, too
    assert generate(model, ids, 30, temperature=0.7, top_p=1e-6, seed=5) == greedy


def test_generate_stops_after_eos_and_leaves_a_training_model_as_it_was():
    model = build("mixtral")
    ids = prompt(5)
    greedy = generate(model, ids, 30, temperature=0)
    eos = greedy[9]
    stop = greedy.index(eos)  # its first appearance, at or before 9
    assert generate(model, ids, 30, temperature=0, eos_id=eos) == greedy[:stop + 1]

    model.train()
    loads = [moe.step_tokens_per_expert.clone() for moe in model.moe_layers()]
    assert generate(model, ids, 30, temperature=0) == greedy
    assert model.training  # restored
    assert all(torch.equal(moe.step_tokens_per_expert, before)  # no tokens counted for a step
               for moe, before in zip(model.moe_layers(), loads))


def test_zero_new_tokens_and_a_prompt_that_fills_the_model():
    model = build("dense")
    assert generate(model, prompt(5), 0) == []
    assert len(generate(model, prompt(63), 1, temperature=0)) == 1


@pytest.mark.parametrize("name", ["dense", "mixtral"])
def test_a_prompt_that_fills_the_context_still_gets_its_next_token(name):
    """The model sees every token but the last new one: a prompt of max_seq_len tokens (64)
    gets one more, the argmax of one full forward; 10 tokens get 55."""
    model = build(name)
    full = prompt(64)
    with torch.no_grad():
        expected = model(torch.tensor([full]))[0][0, -1].argmax().item()
    assert generate(model, full, 1, temperature=0) == [expected]
    assert len(generate(model, prompt(10), 55, temperature=0)) == 55


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), r"temperature=-0.5 must be >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan must be >= 0"),
    (dict(top_k=0), r"top_k=0 must be >= 1"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), r"max_new_tokens=-1 must be >= 0"),
    (dict(max_new_tokens=20, prompt_ids=prompt(50)),
     r"prompt \(50 tokens\) \+ max_new_tokens \(20\) - 1 = 69 positions exceed "
     r"model.max_seq_len=64; at most 15 new tokens fit"),
    (dict(max_new_tokens=0, prompt_ids=prompt(65)), r"prompt \(65 tokens\) .* at most 0 new"),
    (dict(prompt_ids=[]), r"the prompt is empty"),
    (dict(prompt_ids=[1, 64]), r"prompt token id 64 is outside the model's vocabulary \[0, 64\)"),
])
def test_bad_arguments_raise_one_line_value_errors(kwargs, message):
    model = build("dense")
    args = dict(prompt_ids=prompt(5), max_new_tokens=10) | kwargs
    with pytest.raises(ValueError, match=message) as err:
        generate(model, **args)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ filtering
def reference_filter(logits: list[float], temperature: float, top_k, top_p) -> set[int]:
    """The kept token ids, from the definitions in plain Python: the k largest scaled logits,
    then the fewest most-probable of those whose probabilities sum to >= top_p."""
    scaled = [x / temperature for x in logits]
    ranked = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = ranked[:top_k] if top_k is not None else ranked
    if top_p is None or top_p == 1:  # every token has probability > 0: all of them
        return set(kept)
    peak = max(scaled[i] for i in kept)
    weights = [math.exp(scaled[i] - peak) for i in kept]
    total, mass, nucleus = sum(weights), 0.0, []
    for token, weight in zip(kept, weights):
        nucleus.append(token)
        mass += weight / total
        if mass >= top_p:
            break
    return set(nucleus)


SETTINGS = [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.9), (0.8, 10, 0.5),
            (1.0, 1, 0.9), (2.0, 100, 0.95), (0.5, None, 1.0), (1.0, 3, 0.999)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filtering_keeps_the_tokens_the_definitions_keep(temperature, top_k, top_p):
    rng = random.Random(0)
    for _ in range(20):
        logits = [rng.gauss(0, 3) for _ in range(50)]
        out = filter_logits(torch.tensor(logits, dtype=torch.float64), temperature, top_k,
                            top_p)
        kept = {i for i, x in enumerate(out.tolist()) if x != float("-inf")}
        assert kept == reference_filter(logits, temperature, top_k, top_p)
        for i in kept:  # scaled, otherwise untouched
            assert out[i].item() == pytest.approx(logits[i] / temperature, rel=1e-12)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filtering_equals_transformers_warpers(temperature, top_k, top_p):
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = warpers.TemperatureLogitsWarper(temperature)(None, logits)
    if top_k is not None:
        expected = warpers.TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None and top_p < 1:
        expected = warpers.TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(filter_logits(logits, temperature, top_k, top_p), expected)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_a_tiny_temperature_samples_the_most_likely_tokens(temperature):
    """As the temperature goes to 0 sampling becomes greedy, ties shared: never NaN (logits
    divided by 1e-40 overflow to +-inf, and a softmax of infinities is NaN)."""
    logits = torch.tensor([[2.0, 7.5, -3.0, 7.5, 1.0], [0.5, -1.0, 4.0, 3.99, 2.0]])
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([next_token(logits, temperature, None, None, generator)
                       for _ in range(200)], dim=1)
    assert set(drawn[0].tolist()) == {1, 3}  # the two tied maxima, both drawn
    assert set(drawn[1].tolist()) == {2}


# ------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A run directory with a checkpoint after 2 steps of a tiny MoE model, byte tokenizer."""
    from moetrain.train import Trainer
    run_dir = tmp_path_factory.mktemp("generate") / "run"
    cfg = RunConfig(
        run_dir=str(run_dir),
        model=ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, ffn_hidden=64,
                          max_seq_len=48, moe=MoEConfig(num_experts=4, top_k=2,
                                                        expert_hidden=32)),
        data=DataConfig(synthetic_docs=200, synthetic_val_docs=20, seq_len=32),
        optim=OptimConfig(warmup_steps=1),
        train=LoopConfig(steps=2, micro_batch_size=2, log_every=1, val_every=0),
        logger=LoggerConfig(wandb=WandbConfig(mode="disabled"), progress_bar=False))
    cfg.checkpoint.at_end = True
    Trainer(cfg).fit()
    return run_dir


def test_cli_prints_prompt_and_greedy_continuation(tiny_checkpoint, capsys):
    main([str(tiny_checkpoint), "--prompt", "The heron", "--max-new-tokens", "20",
          "--temperature", "0"])
    out, err = capsys.readouterr()
    model, cfg = load_model(tiny_checkpoint)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    ids = tokenizer.encode("The heron")
    new_ids = generate(model, ids, 20, temperature=0, eos_id=tokenizer.eos_id)
    assert out == tokenizer.decode(ids + new_ids) + "\n"
    assert out.startswith("The heron")
    assert f"{len(new_ids)} new tokens in" in err and "tokens/s" in err


def test_cli_default_length_is_what_the_context_leaves(tiny_checkpoint, capsys):
    main([str(tiny_checkpoint), "--prompt", "The heron", "--temperature", "0"])  # 9 tokens
    out, err = capsys.readouterr()
    model, cfg = load_model(tiny_checkpoint)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    new_ids = generate(model, tokenizer.encode("The heron"), 48 - 9 + 1, temperature=0,
                       eos_id=tokenizer.eos_id)
    assert f"{len(new_ids)} new tokens in" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu_is_one_error_line(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_checkpoint), "--prompt", "x", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("moetrain.generate: error: --device cuda: no CUDA "
                                       "device here; use --device cpu\n")


@pytest.mark.parametrize("args,message", [
    (["--top-p", "2"], "top_p=2.0 must be in (0, 1]"),
    (["--max-new-tokens", "60"], "prompt (9 tokens) + max_new_tokens (60) - 1 = 68 "
                                 "positions exceed model.max_seq_len=48; at most 40 new"),
])
def test_cli_bad_input_is_one_error_line_and_exit_2(tiny_checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_checkpoint), "--prompt", "The heron", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("moetrain.generate: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
