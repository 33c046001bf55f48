"""Which data each expert serves: `python -m moetrain.specialisation CKPT --data NAME=SPEC ...`.

For every named data source the model reads up to --tokens tokens (blocks of --seq-len, by
default the checkpoint's data.seq_len, in order) and every MoE layer's router choices are
counted: assignments (top_k per token, before any capacity drop) per expert. Token-choice
routers only: expert choice gives every expert the same share of any batch. Per layer it
reports

  load[s, e]     the share of source s's assignments that expert e receives (each row sums to 1)
  NMI            the mutual information between the source and the chosen expert, over the
                 entropy of the source, with every source weighted equally (P(s) = 1/S):
                     I(S; E) = H(E) - sum_s P(s) H(E | s),  NMI = I(S; E) / log S  in [0, 1]
                 1: the chosen expert tells the source (sources use disjoint experts);
                 0: every source spreads over the experts alike (routing blind to the source).
                 Finite samples bias it up a little; an untrained model (--untrained) gives the
                 floor that comes from the sources' different tokens alone.
  top experts    each source's most used experts, with their share against the fair 1/E

and, over all sources' tokens together (token-choice routers): the most loaded experts and
the tokens that make their load; the most frequent tokens, on how many distinct expert sets
they are routed and which share takes the most used one; and the one-set floor, the MaxVio
that those tokens' most used sets force by themselves. A frequent token whose occurrences all
share one set (e.g. byte-level indentation spaces early in training) is a block of load that
a selection bias can move between experts but not split.

and writes OUT/specialisation.json and OUT/specialisation_layer{i}.png (sources x experts,
load / fair share on the trainer's load colour scale).

SPEC: `synthetic:DOMAIN` (one domain of the generated corpus: arithmetic, records, prose,
code), `synthetic` alone (all four, one source each, named after them), or a local file, glob
or directory of UTF-8 text files (each file one document).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moetrain.data.loader import _local_files, pack
from moetrain.data.synthetic import DOMAINS
from moetrain.data.tokenizer import build_tokenizer

TOP_EXPERTS = 3


@dataclass
class LayerReport:
    layer: int
    nmi: float
    mutual_information_nats: float
    load: dict[str, list[float]]  # source -> (E,) shares, summing to 1
    top_experts: dict[str, list[tuple[int, float]]]  # source -> [(expert, share), ...]


def source_texts(spec: str, seed: int = 0, synthetic_docs: int = 2000) -> list[str]:
    """The documents of one SPEC (see the module docstring)."""
    if spec.startswith("synthetic:"):
        domain = spec.split(":", 1)[1]
        if domain not in DOMAINS:
            raise ValueError(f"--data ...={spec}: unknown domain {domain!r}; valid: "
                             f"{', '.join(DOMAINS)}")
        rng = random.Random(f"{seed}/{domain}")
        return [DOMAINS[domain](rng) for _ in range(synthetic_docs)]
    texts = []
    for name in _local_files(spec, "--data ..."):
        try:
            texts.append(Path(name).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"--data {spec!r}: {name} is not UTF-8 text") from None
    return texts


def parse_sources(items: list[str]) -> dict[str, str]:
    """['NAME=SPEC' or 'synthetic', ...] -> {name: spec}, in order."""
    sources = {}
    for item in items:
        if item == "synthetic":
            for domain in DOMAINS:
                sources[domain] = f"synthetic:{domain}"
            continue
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--data {item!r}: expected NAME=SPEC (e.g. prose=books/*.txt or "
                             "code=synthetic:code), or 'synthetic'")
        if name in sources:
            raise ValueError(f"--data {item!r}: the source name {name!r} is used twice")
        domain = spec.split(":", 1)[1] if spec.startswith("synthetic:") else None
        if domain is not None and domain not in DOMAINS:
            raise ValueError(f"--data {item!r}: unknown domain {domain!r}; valid: "
                             f"{', '.join(DOMAINS)}")
        sources[name] = spec
    if len(sources) < 2:
        raise ValueError(f"--data: {len(sources)} source(s); the report compares at least 2")
    return sources


def source_blocks(texts: list[str], tokenizer, seq_len: int, max_tokens: int) -> torch.Tensor:
    """(n, seq_len) token blocks, the first max_tokens tokens of the documents packed."""
    blocks = pack([tokenizer.encode(t) for t in texts], tokenizer.eos_id, seq_len)
    return blocks[:max(1, max_tokens // seq_len)]


@torch.no_grad()
def route_blocks(model, blocks: torch.Tensor, batch_size: int = 8
                 ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Route `blocks` through the model: (L, E) assignments per expert of every MoE layer, and
    per layer the (N, k) experts each token chose, sorted (None for expert-choice routing,
    where a token has no fixed k)."""
    layers = model.moe_layers()
    E = layers[0].cfg.num_experts
    counts = torch.zeros(len(layers), E, dtype=torch.long)
    chosen: list[list[torch.Tensor]] = [[] for _ in layers]

    def recorder(index):
        def hook(module, args, route):
            counts[index] += torch.bincount(route.expert_ids.cpu(), minlength=E)
            if route.top_k > 0:  # token-choice: token_ids is arange(N) repeated k times
                order = route.token_ids.argsort(stable=True)
                sets = route.expert_ids[order].view(-1, route.top_k).sort(dim=-1).values
                chosen[index].append(sets.cpu())
        return hook

    handles = [layer.router.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for start in range(0, len(blocks), batch_size):
            model(blocks[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return counts, [torch.cat(c) if c else None for c in chosen]


@dataclass
class TokenReport:
    """What makes a layer's imbalance, over all sources' tokens together."""
    layer: int
    max_violation: float  # max load / mean load - 1 over these tokens
    # the most loaded experts: (expert, load / mean, [(token, share of its assignments), ...])
    loaded: list[tuple[int, float, list[tuple[str, float]]]]
    # the most frequent tokens: (token, share of all tokens, expert sets it uses, share of its
    # occurrences on its most used set)
    frequent: list[tuple[str, float, int, float]]
    # The load that the most frequent tokens' most used sets put on their experts by
    # themselves, as max load / mean - 1: the MaxVio no selection bias can go below while
    # those occurrences keep choosing one set together (the bias moves a set, it cannot split
    # tokens whose scores are alike).
    one_set_floor: float


def token_report(tokens: torch.Tensor, sets: torch.Tensor, num_experts: int, layer: int,
                 tokenizer, top: int = TOP_EXPERTS) -> TokenReport:
    """tokens (N,) token ids; sets (N, k) each token's chosen experts, sorted."""
    N, k = sets.shape
    loads = torch.bincount(sets.reshape(-1), minlength=num_experts).double()
    relative = loads / loads.mean()
    loaded = []
    for e in relative.topk(min(top, num_experts)).indices.tolist():
        served = tokens[(sets == e).any(-1)]
        values, counts = served.unique(return_counts=True)
        best = counts.topk(min(top, len(counts))).indices.tolist()
        shares = [(tokenizer.decode([values[i].item()]), round(counts[i].item() / len(served), 3))
                  for i in best]
        loaded.append((e, round(relative[e].item(), 3), shares))
    values, counts = tokens.unique(return_counts=True)
    frequent, floor_load = [], torch.zeros(num_experts, dtype=torch.float64)
    for i in counts.topk(min(top, len(counts))).indices.tolist():
        mine = sets[tokens == values[i]]
        unique_sets, set_counts = mine.unique(dim=0, return_counts=True)
        j = set_counts.argmax()
        frequent.append((tokenizer.decode([values[i].item()]), round(counts[i].item() / N, 4),
                         len(unique_sets), round(set_counts[j].item() / len(mine), 3)))
        floor_load[unique_sets[j]] += set_counts[j].item()
    mean = N * k / num_experts
    return TokenReport(layer, round(relative.max().item() - 1, 3), loaded, frequent,
                       round(max(floor_load.max().item() / mean - 1, 0.0), 3))


def specialisation(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """counts (S, L, E) assignments -> (load (S, L, E) rows summing to 1, mutual information
    (L,) in nats, NMI (L,)), every source weighted 1/S."""
    S = counts.shape[0]
    load = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    marginal = load.mean(0)  # (L, E): P(e) with P(s) = 1/S

    def entropy(p):
        return -(p * p.clamp(min=1e-300).log()).sum(-1)

    mutual = entropy(marginal) - entropy(load).mean(0)
    mutual = mutual.clamp(min=0)  # rounding of equal rows
    return load, mutual, mutual / math.log(S)


def report(model, sources: dict[str, str], seq_len: int, tokenizer, max_tokens: int,
           layer_ids: list[int]
           ) -> tuple[list[LayerReport], dict[str, int], list[TokenReport]]:
    counts, tokens, all_tokens = [], {}, []
    chosen: list[list[torch.Tensor | None]] = []
    for name, spec in sources.items():
        blocks = source_blocks(source_texts(spec), tokenizer, seq_len, max_tokens)
        if len(blocks) == 0:
            raise ValueError(f"--data {name}={spec}: fewer than {seq_len} tokens")
        tokens[name] = blocks.numel()
        source_counts, sets = route_blocks(model, blocks)
        counts.append(source_counts)
        chosen.append(sets)
        all_tokens.append(blocks.reshape(-1))
    load, mutual, nmi = specialisation(torch.stack(counts))
    E = load.shape[-1]
    layers, by_token = [], []
    for i, layer in enumerate(layer_ids):
        shares = {name: load[s, i].tolist() for s, name in enumerate(sources)}
        top = {name: [(e, round(shares[name][e], 4)) for e in
                      torch.tensor(shares[name]).topk(min(TOP_EXPERTS, E)).indices.tolist()]
               for name in sources}
        layers.append(LayerReport(layer, nmi[i].item(), mutual[i].item(), shares, top))
        if chosen[0][i] is not None:
            by_token.append(token_report(torch.cat(all_tokens),
                                         torch.cat([c[i] for c in chosen]), E, layer, tokenizer))
    return layers, tokens, by_token


def format_report(layers: list[LayerReport]) -> str:
    lines = []
    for rep in layers:
        E = len(next(iter(rep.load.values())))
        tops = "; ".join(f"{name}: " + ", ".join(f"{e} ({share * E:.1f}x)" for e, share in top)
                         for name, top in rep.top_experts.items())
        lines.append(f"layer {rep.layer}: NMI {rep.nmi:.3f} (I = {rep.mutual_information_nats:.3f}"
                     f" nats); top experts {tops}")
    mean = sum(r.nmi for r in layers) / len(layers)
    lines.append(f"mean NMI over {len(layers)} MoE layers: {mean:.3f}")
    return "\n".join(lines)


def format_token_report(reports: list[TokenReport]) -> str:
    lines = ["by token (all sources together):"]
    for rep in reports:
        loaded = "; ".join(f"{e} {rel:.2f}x (" + ", ".join(f"{t!r} {sh:.0%}" for t, sh in toks)
                           + ")" for e, rel, toks in rep.loaded)
        frequent = "; ".join(f"{t!r} {share:.1%} of tokens on {n} sets, {top:.0%} on one"
                             for t, share, n, top in rep.frequent)
        lines.append(f"layer {rep.layer}: MaxVio {rep.max_violation:.2f}, one-set floor "
                     f"{rep.one_set_floor:.2f}; most loaded experts {loaded}; most frequent "
                     f"tokens {frequent}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moetrain.specialisation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="CKPT_OR_RUN_DIR",
                        help="a checkpoint or run directory, or hf:DIR")
    parser.add_argument("--data", action="append", required=True, metavar="NAME=SPEC",
                        help="a data source (repeat); 'synthetic' adds its four domains")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON and heatmaps (default: none written)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens read per source")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per block (default: the checkpoint's data.seq_len, at "
                             "most its model.max_seq_len)")
    parser.add_argument("--untrained", action="store_true",
                        help="the checkpoint's architecture at its initial weights (baseline)")
    parser.add_argument("--seed", type=int, default=0, help="init seed for --untrained")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from moetrain.checkpoint import find_checkpoint, load_model, load_run_config
    from moetrain.model import Transformer
    from moetrain.plots import specialisation_figure
    if args.tokens < 1:
        raise ValueError(f"--tokens {args.tokens} must be >= 1")
    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len {args.seq_len} must be >= 1")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is a file, not a directory")
    sources = parse_sources(args.data)
    for name, spec in sources.items():  # every source readable before the model is loaded
        if not spec.startswith("synthetic:"):
            _local_files(spec, f"--data {name}")
    if args.untrained and not str(args.source).startswith("hf:"):
        # only the architecture is needed: the checkpoint's weights are never read
        cfg = load_run_config(find_checkpoint(args.source))
    else:
        model, cfg = load_model(args.source)
    if args.untrained:
        model = Transformer(cfg.model)
        model.init_weights(args.seed)
        model.eval()
    if not model.moe_layers():
        raise ValueError(f"{args.source} is a dense model: no experts to report on")
    if cfg.model.moe.router == "expert_choice":
        raise ValueError(f"{args.source} routes by expert choice: every expert takes the same "
                         "share of each batch, whatever its source, so the report needs a "
                         "token-choice router")
    max_len = cfg.model.max_seq_len
    seq_len = args.seq_len if args.seq_len is not None else min(cfg.data.seq_len, max_len)
    if seq_len > max_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {max_len}")
    layer_ids = [i for i, block in enumerate(model.layers) if block.is_moe]
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    layers, tokens, by_token = report(model, sources, seq_len, tokenizer, args.tokens,
                                      layer_ids)
    result = {"checkpoint": str(args.source), "untrained": args.untrained,
              "sources": {name: {"spec": spec, "tokens": tokens[name]}
                          for name, spec in sources.items()},
              "mean_nmi": sum(r.nmi for r in layers) / len(layers),
              "layers": [asdict(r) for r in layers],
              "by_token": [asdict(r) for r in by_token]}
    print(format_report(layers), flush=True)
    if by_token:
        print(format_token_report(by_token), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "specialisation.json").write_text(json.dumps(result, indent=1) + "\n")
        title = Path(args.source).name + (" at its initial weights" if args.untrained else "")
        for rep in layers:
            fig = specialisation_figure([rep.load[name] for name in sources], list(sources),
                                        rep.layer, rep.nmi, title)
            fig.savefig(args.out / f"specialisation_layer{rep.layer}.png", dpi=110)
        print(f"written: {args.out}", flush=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as error:
        print(f"moetrain.specialisation: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
