"""The expert specialisation report: NMI at its two ends on crafted routers, the formula on
known loads, and the command's files and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moetrain.config import ModelConfig, MoEConfig
from moetrain.data.tokenizer import ByteTokenizer
from moetrain.model import Transformer
from moetrain.specialisation import main, report, specialisation


def one_layer_moe() -> Transformer:
    cfg = ModelConfig(vocab_size=256, dim=8, n_layers=1, n_heads=2, max_seq_len=32,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8))
    model = Transformer(cfg)
    model.init_weights(0)
    return model.eval()


def a_and_b_on_their_own_experts() -> Transformer:
    """A crafted router: every 'a' goes to experts 0 and 1, every 'b' to experts 2 and 3."""
    model = one_layer_moe()
    with torch.no_grad():
        model.layers[0].attn.wo.weight.zero_()  # the router sees the token's own embedding
        emb = model.tok_embeddings.weight
        emb[ord("a")] = 0
        emb[ord("a"), 0] = 10.0
        emb[ord("b")] = 0
        emb[ord("b"), 1] = 10.0
        router = model.layers[0].ffn.router.weight
        router.zero_()
        router[0, 0] = router[1, 0] = 5.0  # 'a' -> experts 0 and 1
        router[2, 1] = router[3, 1] = 5.0  # 'b' -> experts 2 and 3
    return model


def write_sources(tmp_path) -> dict[str, str]:
    (tmp_path / "a.txt").write_text("a" * 2000)
    (tmp_path / "b.txt").write_text("b" * 2000)
    return {"as": str(tmp_path / "a.txt"), "bs": str(tmp_path / "b.txt")}


def test_a_router_that_sends_each_source_to_its_own_experts_has_nmi_one(tmp_path):
    model = a_and_b_on_their_own_experts()
    layers, tokens, _ = report(model, write_sources(tmp_path), 16, ByteTokenizer(), 512, [0])
    assert tokens == {"as": 512, "bs": 512}
    rep = layers[0]
    assert rep.nmi == pytest.approx(1.0, abs=1e-12)
    assert rep.mutual_information_nats == pytest.approx(math.log(2), abs=1e-12)
    assert rep.load["as"] == [0.5, 0.5, 0.0, 0.0] and rep.load["bs"] == [0.0, 0.0, 0.5, 0.5]
    assert {e for e, _ in rep.top_experts["as"][:2]} == {0, 1}


def test_a_router_that_ignores_its_input_has_nmi_zero(tmp_path):
    model = one_layer_moe()
    with torch.no_grad():
        model.layers[0].ffn.router.weight.zero_()  # equal logits: the same experts for all
    layers, _, _ = report(model, write_sources(tmp_path), 16, ByteTokenizer(), 512, [0])
    assert layers[0].nmi == 0.0
    assert layers[0].load["as"] == layers[0].load["bs"]


def test_by_token_names_the_tokens_that_load_the_experts_and_the_floor_they_force(tmp_path):
    """'a' is 3/4 of the tokens and always goes to experts {0, 1}: those two carry 1.5x the
    mean load, all of it 'a', and no bias could bring MaxVio below 0.5 while 'a' stays on
    one set."""
    model = a_and_b_on_their_own_experts()
    (tmp_path / "a.txt").write_text("a" * 2000)
    (tmp_path / "ba.txt").write_text("ba" * 1000)
    sources = {"as": str(tmp_path / "a.txt"), "mixed": str(tmp_path / "ba.txt")}
    _, _, by_token = report(model, sources, 16, ByteTokenizer(), 512, [0])
    rep = by_token[0]
    assert rep.max_violation == pytest.approx(0.5)
    assert rep.one_set_floor == pytest.approx(0.5)
    assert sorted(e for e, _, _ in rep.loaded[:2]) == [0, 1]
    assert rep.loaded[0][1:] == (1.5, [("a", 1.0)])
    assert rep.frequent[:2] == [("a", 0.75, 1, 1.0), ("b", 0.25, 1, 1.0)]


def test_loads_sum_to_one_and_nmi_follows_its_formula():
    counts = torch.tensor([[[30, 10, 0]], [[10, 30, 0]], [[5, 5, 30]]])  # (S, L, E)
    load, mutual, nmi = specialisation(counts)
    torch.testing.assert_close(load.sum(-1), torch.ones(3, 1, dtype=torch.float64))
    rows = [[0.75, 0.25, 0.0], [0.25, 0.75, 0.0], [0.125, 0.125, 0.75]]
    marginal = [sum(r[e] for r in rows) / 3 for e in range(3)]

    def h(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    want = h(marginal) - sum(h(r) for r in rows) / 3
    assert mutual.item() == pytest.approx(want, rel=1e-12)
    assert nmi.item() == pytest.approx(want / math.log(3), rel=1e-12)
    assert 0 < nmi.item() < 1


def test_command_writes_json_and_a_heatmap_per_layer(tmp_path, capsys):
    from tests.unit.test_trainer import tiny_run
    from moetrain.train import Trainer
    cfg = tiny_run(tmp_path, MoEConfig(num_experts=4, top_k=2, expert_hidden=16), steps=2)
    Trainer(cfg).fit()
    out = tmp_path / "report"
    assert main([str(tmp_path / "run"), "--data", "synthetic", "--data",
                 f"mine={tmp_path / 'a.txt'}", "--tokens", "256", "--out", str(out)]) == 2
    assert "mine" in capsys.readouterr().err  # a missing file: one line, before any work
    (tmp_path / "a.txt").write_text("some text of my own, " * 40)
    assert main([str(tmp_path / "run"), "--data", "synthetic", "--data",
                 f"mine={tmp_path / 'a.txt'}", "--tokens", "256", "--out", str(out)]) == 0
    result = json.loads((out / "specialisation.json").read_text())
    assert list(result["sources"]) == ["arithmetic", "records", "prose", "code", "mine"]
    assert [r["layer"] for r in result["layers"]] == [0, 1]
    for layer in result["layers"]:
        assert 0 <= layer["nmi"] <= 1
        for shares in layer["load"].values():
            assert sum(shares) == pytest.approx(1.0)
        assert (out / f"specialisation_layer{layer['layer']}.png").stat().st_size > 1000
    # the baseline: the same architecture at its initial weights, routing differently
    assert main([str(tmp_path / "run"), "--data", "synthetic", "--tokens", "256", "--untrained",
                 "--out", str(tmp_path / "untrained")]) == 0
    untrained = json.loads((tmp_path / "untrained" / "specialisation.json").read_text())
    assert untrained["untrained"] is True
    assert any(untrained["layers"][i]["load"][domain] != result["layers"][i]["load"][domain]
               for i in range(2) for domain in ("arithmetic", "records", "prose", "code"))


def test_seq_len_option_and_expert_choice_refused(tmp_path, capsys):
    from moetrain.config import BalanceConfig
    from tests.unit.test_trainer import tiny_run
    from moetrain.train import Trainer
    cfg = tiny_run(tmp_path, MoEConfig(num_experts=4, top_k=2, expert_hidden=16), steps=1)
    Trainer(cfg).fit()  # data.seq_len = model.max_seq_len = 32
    report = tmp_path / "report"
    assert main([str(tmp_path / "run"), "--data", "synthetic", "--tokens", "200",
                 "--seq-len", "16", "--out", str(report)]) == 0
    result = json.loads((report / "specialisation.json").read_text())
    assert {s["tokens"] for s in result["sources"].values()} == {192}  # 12 blocks of 16
    assert main([str(tmp_path / "run"), "--data", "synthetic", "--seq-len", "64"]) == 2
    assert "--seq-len 64 exceeds the model's max_seq_len 32" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("mine")
    assert main([str(tmp_path / "run"), "--data", "synthetic", "--out",
                 str(tmp_path / "a-file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"
    choice = tiny_run(tmp_path / "ec", MoEConfig(router="expert_choice", num_experts=4,
                                                 expert_hidden=16, capacity_factor=1.0),
                      BalanceConfig(aux_loss="none"), steps=1)
    Trainer(choice).fit()
    assert main([str(tmp_path / "ec" / "run"), "--data", "synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "routes by expert choice" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("data,message", [
    (["poem=synthetic:poetry", "code=synthetic:code"], "unknown domain 'poetry'; valid: arith"),
    (["prose=synthetic:prose"], "1 source(s); the report compares at least 2"),
    (["justapath"], "expected NAME=SPEC"),
])
def test_bad_sources_fail_in_one_line(tmp_path, capsys, data, message):
    argv = [str(tmp_path)]
    for item in data:
        argv += ["--data", item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
