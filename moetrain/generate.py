"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p).

    python -m moetrain.generate RUN_OR_CHECKPOINT_DIR --prompt "Once upon" --temperature 0.8

The prompt is run once (prefill) into a `KVCache`; each further step runs one token. Sampling
follows Hugging Face transformers' `generate(do_sample=True)`: logits / temperature, then
top-k, then top-p, then one draw from the softmax; a seeded `torch.Generator` reproduces it.
Shapes: V vocabulary.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from moetrain.checkpoint import load_model
from moetrain.data.tokenizer import build_tokenizer
from moetrain.model.transformer import Transformer


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    """One-line ValueErrors for arguments no model is needed to reject."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not temperature >= 0:  # also catches nan
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1, or unset for no top-k filtering")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1], or unset for no top-p filtering")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> scaled logits with the filtered-out tokens at -inf (temperature > 0).

    The order and tie rules of transformers' Temperature, TopK and TopP warpers: top-k keeps
    every token tied with the k-th; top-p keeps the smallest set of most likely tokens whose
    probability sums to >= top_p, and always the most likely one."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        ascending, order = torch.sort(logits, descending=False)  # (..., V)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        # A token goes when the less likely ones alone reach 1 - top_p: the rest, more likely
        # ones, already hold >= top_p. The most likely token (last) always stays.
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
               top_p: float | None, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) of the last position -> token ids (B, 1)."""
    # At least fp32, as transformers does: bf16 logits tie and round in the softmax.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # ties: the lowest id
    # The largest logit becomes 0 first (the same distribution): a tiny temperature then
    # takes the others to -inf, not every logit to +-inf, whose softmax is NaN.
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def new_tokens_that_fit(max_seq_len: int, prompt_len: int) -> int:
    """The model sees the prompt and every new token but the last: a prompt of max_seq_len
    tokens still gets one."""
    return max_seq_len - prompt_len + 1


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = None) -> list[int]:
    """The new token ids (not the prompt) continuing `prompt_ids`: up to max_new_tokens, ending
    early with eos_id included. temperature 0 is greedy; seed None draws a fresh seed."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: generation needs at least one token to start from")
    limit, total = model.cfg.max_seq_len, len(prompt_ids) + max_new_tokens
    if len(prompt_ids) > limit or total - 1 > limit:  # the last new token is never fed back
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                         f"({max_new_tokens}) - 1 = {total - 1} positions exceed "
                         f"model.max_seq_len={limit}; at most "
                         f"{max(new_tokens_that_fit(limit, len(prompt_ids)), 0)} new tokens fit "
                         "this prompt")
    vocab = model.cfg.vocab_size
    bad = next((i for i in prompt_ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the model's vocabulary "
                         f"[0, {vocab}): is this the tokenizer the model was trained with?")
    if max_new_tokens == 0:
        return []
    device = model.output.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    # In training mode the MoE layers would add these tokens to the step's expert loads (and
    # jitter the router): decode in eval mode and hand the model back as it came.
    was_training = model.training
    model.eval()
    try:
        # total - 1 positions: the last new token is never fed back
        cache = model.new_kv_cache(1, max_len=total - 1, device=device)
        tokens = torch.tensor([prompt_ids], device=device)  # (1, T)
        new_tokens = []
        for _ in range(max_new_tokens):
            logits, _ = model(tokens, cache)  # (1, T, V): the prompt once, then one token
            tokens = next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (1, 1)
            new_tokens.append(tokens)
            # NOTE: a device-to-host sync per step, only when there is an eos to watch for
            if eos_id is not None and tokens.item() == eos_id:
                break
    finally:
        model.train(was_training)
    return torch.cat(new_tokens, dim=1)[0].tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="moetrain.generate",
        description="Continue a prompt with a trained model: prompt + continuation on stdout, "
                    "a one-line summary on stderr.")
    parser.add_argument("source", help="run directory (newest checkpoint), checkpoint "
                                       "directory, or hf:DIR")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: 200, or what the model's context leaves after the "
                             "prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        check_sampling(args.max_new_tokens or 0, args.temperature, args.top_k, args.top_p)
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu")
        with warnings.catch_warnings():
            # DCP's notice that it loads in one process: expected here, and noise on stderr
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            model, cfg = load_model(args.source, device=args.device)
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        prompt_ids = tokenizer.encode(args.prompt)
        max_new_tokens = args.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = min(200, max(new_tokens_that_fit(model.cfg.max_seq_len,
                                                              len(prompt_ids)), 1))
        start = time.perf_counter()
        new_ids = generate(model, prompt_ids, max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           eos_id=tokenizer.eos_id)
        seconds = time.perf_counter() - start
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    # Decoded together: a character split across the prompt's end stays whole.
    print(tokenizer.decode(prompt_ids + new_ids), flush=True)
    rate = len(new_ids) / max(seconds, 1e-9)
    print(f"{len(new_ids)} new tokens in {seconds:.2f} s ({rate:.1f} tokens/s; prompt "
          f"{len(prompt_ids)} tokens, {args.device})", file=sys.stderr)


if __name__ == "__main__":
    main()
