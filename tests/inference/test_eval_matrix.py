"""The language x expert WER matrix of ``eval --experts``: the base restored bit-exactly after each expert, rows
equal to single-expert evals, the report, the plot and the errors; a CLSR expert evaluated alone and as a row."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from inference.evaluation import DecodeOptions, utterances_from_dataset
from inference.language_matrix import expert_applied, language_matrix
from lora_experts.merge import fuse_experts
from registry.expert_file import Expert, new_manifest, save_expert
from tests.lora_experts.random_experts import linear_shapes, random_lora
from trainers.cli import main

OPTS = DecodeOptions(max_new_tokens=4)


@pytest.fixture(scope="module")
def base(tiny_whisper_dir):
    from registry.bases import load_base

    return load_base(str(tiny_whisper_dir), device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 synthesized utterances each of uk and de (the test split holds one or two of each)."""
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    out = tmp_path_factory.mktemp("uk-de") / "corpus"
    synthesize_corpus(SynthConfig(languages=("uk", "de"), per_language=6, seed=0), out, progress=False)
    return out


def _expert(base, seed: int, language: str) -> Expert:
    contains = ("q_proj", "v_proj", "fc1")
    hyper = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": list(contains), "side": "decoder"}
    return Expert(random_lora(linear_shapes(base.model, contains), 4, seed, scale=0.5),
                  new_manifest("lora", [language], base, hyper))


@pytest.fixture(scope="module")
def experts(base):
    """A uk and a de LoRA expert, and their TIES merge (a dense task_vector expert)."""
    uk, de = _expert(base, 1, "uk"), _expert(base, 2, "de")
    merged, _ = fuse_experts([uk, de], [1.0, 1.0], "ties", names=["uk-a", "de-b"], density=0.5)
    assert merged.kind == "task_vector" and merged.languages == ["uk", "de"]
    return {"uk-a": uk, "de-b": de, "multi2": merged}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_plain_and_equal(model, before: dict) -> None:
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit for bit


def _logits(model) -> torch.Tensor:
    feats = torch.randn(1, model.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=torch.tensor([[50258, 50259, 50359, 50363]])).logits


@pytest.fixture(scope="module")
def clsr_expert(base):
    """A low-rank CLSR expert for uk (paths and gates moved off their init), and the CLSR model it came from."""
    from distill.clsr import add_language, convert_to_clsr, make_clsr_expert
    from tests.distill.clsr_helpers import randomize_language

    model = convert_to_clsr(copy.deepcopy(base.model))
    add_language(model, "uk", kind="lowrank", rank=4, alpha=8.0)
    randomize_language(model, "uk", seed=5, scale=0.5)
    return make_clsr_expert(model, "uk", base), model


@pytest.mark.parametrize("name", ["uk-a", "multi2"])
def test_an_applied_expert_changes_the_model_and_leaves_it_bit_exact(base, experts, name):
    before, plain = _state(base.model), _logits(base.model)
    with expert_applied(base.model, experts[name]):
        assert not torch.allclose(_logits(base.model), plain, atol=1e-4)
    _assert_plain_and_equal(base.model, before)
    with pytest.raises(RuntimeError, match="boom"), expert_applied(base.model, experts[name]):
        raise RuntimeError("boom")  # restored on an error too
    _assert_plain_and_equal(base.model, before)


def test_a_clsr_expert_takes_every_utterance_through_its_path_and_leaves_the_base_bit_exact(base, clsr_expert):
    from distill.clsr import is_clsr, set_language

    expert, trained = clsr_expert
    set_language(trained.eval(), "uk")
    before, plain = _state(base.model), _logits(base.model)
    grads = {n: p.requires_grad for n, p in base.model.named_parameters()}
    with expert_applied(base.model, expert):
        assert is_clsr(base.model)
        torch.testing.assert_close(_logits(base.model), _logits(trained), rtol=0, atol=0)
        assert not torch.allclose(_logits(base.model), plain, atol=1e-4)
    assert not is_clsr(base.model)
    _assert_plain_and_equal(base.model, before)
    assert {n: p.requires_grad for n, p in base.model.named_parameters()} == grads


def test_a_model_carrying_an_expert_or_a_misfit_expert_is_refused(base, experts):
    from lora_experts.model import attach_expert, remove_experts

    before = _state(base.model)
    attach_expert(base.model, experts["uk-a"].tensors, experts["uk-a"].manifest["hyperparameters"])
    try:
        with pytest.raises(ValueError, match="already carries an expert"), expert_applied(base.model, experts["de-b"]):
            pass
    finally:
        remove_experts(base.model)
    misfit = Expert({**experts["multi2"].tensors, "model.decoder.layers.0.fc1.weight": torch.ones(3, 3)},
                    experts["multi2"].manifest)
    with pytest.raises(ValueError, match="does not fit this model"), expert_applied(base.model, misfit):
        pass
    _assert_plain_and_equal(base.model, before)  # the entries added before the misfit one were taken out again


def test_matrix_decodes_every_row_and_restores_the_base_bit_exactly(base, experts, corpus):
    from trainers.corpus.loading import load_corpus

    utterances = utterances_from_dataset(load_corpus(corpus)["test"])
    before = _state(base.model)
    matrix = language_matrix(base.model, base.processor, utterances, list(experts.items()), OPTS, progress=False)
    _assert_plain_and_equal(base.model, before)
    assert matrix.labels == ["base", "uk-a", "de-b", "multi2"] and matrix.languages == ["de", "uk"]
    assert matrix.own == [[], ["uk"], ["de"], ["uk", "de"]]
    assert matrix.reports[1].hypotheses != matrix.reports[0].hypotheses  # the expert does change the output
    cells = matrix.as_dict()
    assert len(cells["wer"]) == 4 and all(len(row) == 2 for row in cells["wer"])
    assert cells["wer"][2][1] == pytest.approx(100 * matrix.reports[2].languages["uk"].wer)
    table = matrix.markdown()
    assert table.startswith("| WER % | de | uk | mean |") and table.count("**") == 2 * 4


def test_a_routed_row_serves_each_language_with_its_own_expert(base, experts, corpus):
    from trainers.corpus.loading import load_corpus

    utterances = utterances_from_dataset(load_corpus(str(corpus))["test"])
    matrix = language_matrix(base.model, base.processor, utterances, list(experts.items()), OPTS, progress=False)
    routed = matrix.routed()
    assert routed.labels == [*matrix.labels, "routed: own expert"] and routed.own[-1] == ["de", "uk"]
    report, rows = routed.reports[-1], dict(zip(matrix.labels, matrix.reports))
    assert report.languages["uk"] is rows["uk-a"].languages["uk"]
    assert report.languages["de"] is rows["de-b"].languages["de"]
    served = {(u["language"], u["id"]): u["hypothesis"] for u in report.hypotheses}
    assert len(served) == len(utterances)
    assert all(served[(u["language"], u["id"])] == u["hypothesis"] for name in ("uk-a", "de-b")
               for u in rows[name].hypotheses if u["language"] in experts[name].languages)
    assert report.meta["routed"] == {"de": "de-b", "uk": "uk-a"}
    without_de = language_matrix(base.model, base.processor, utterances, [("uk-a", experts["uk-a"])], OPTS,
                                 progress=False)
    with pytest.raises(ValueError, match="single-language expert row for 'de', found 0"):
        without_de.routed()


def test_eval_experts_command_prints_writes_and_plots_the_matrix(base, experts, corpus, tiny_whisper_dir, tmp_path,
                                                                 capsys):
    from registry.store import Registry

    reg = tmp_path / "registry"
    registry = Registry(str(reg))
    registry.add(experts["uk-a"], "uk-a")
    registry.add(experts["multi2"], "multi2")
    de_file = save_expert(experts["de-b"], tmp_path / "de-b.safetensors")  # a file spec works as well
    common = ["eval", "--base", str(tiny_whisper_dir), "--data", str(corpus), "--registry", str(reg),
              "--max-new-tokens", "4", "--batch-size", "4"]
    out, png = tmp_path / "reports" / "matrix.json", tmp_path / "plots" / "matrix.png"
    assert main([*common, "--experts", f"uk-a@latest,{de_file},multi2", "--out", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| WER % | de | uk | mean |" in printed and "| de-b.safetensors |" in printed and "| multi2 |" in printed
    assert png.is_file() and png.stat().st_size > 1000
    report = json.loads(out.read_text())
    matrix = report["matrix"]
    assert matrix["rows"] == ["base", "uk-a@latest", "de-b.safetensors", "multi2"]
    assert matrix["languages"] == ["de", "uk"] and len(matrix["wer"]) == 4
    assert [e["expert"].get("ref") or e["expert"]["file"] for e in report["experts"]] == [
        "uk-a@1", str(de_file), "multi2@1"]
    assert report["experts"][2]["expert"]["kind"] == "task_vector" and report["experts"][2]["utterances"]
    # The base row is the plain eval report, so a matrix report reads like one.
    assert report["meta"]["base_fingerprint"] == base.fingerprint and set(report["languages"]) == {"de", "uk"}
    assert [100 * report["languages"][lang]["wer"] for lang in ("de", "uk")] == pytest.approx(matrix["wer"][0])
    # A row is what decoding with that expert alone gives: --expert, on a freshly loaded base.
    single = tmp_path / "single.json"
    assert main([*common, "--expert", "multi2", "--out", str(single)]) == 0
    alone = json.loads(single.read_text())
    assert [100 * alone["languages"][lang]["wer"] for lang in ("de", "uk")] == pytest.approx(matrix["wer"][3])
    assert alone["utterances"] == report["experts"][2]["utterances"]


def test_eval_takes_a_clsr_expert_alone_and_as_a_matrix_row(base, experts, clsr_expert, corpus, tiny_whisper_dir,
                                                           tmp_path, capsys):
    from registry.store import Registry

    reg = tmp_path / "registry"
    Registry(str(reg)).add(clsr_expert[0], "uk-clsr")
    Registry(str(reg)).add(experts["uk-a"], "uk-a")
    common = ["eval", "--base", str(tiny_whisper_dir), "--data", str(corpus), "--registry", str(reg),
              "--max-new-tokens", "4", "--batch-size", "4"]
    single, out = tmp_path / "single.json", tmp_path / "matrix.json"
    assert main([*common, "--expert", "uk-clsr@latest", "--out", str(single)]) == 0
    assert "expert: uk-clsr@1 (uk)" in capsys.readouterr().out
    alone = json.loads(single.read_text())
    assert alone["meta"]["expert"]["kind"] == "clsr" and alone["meta"]["expert"]["ref"] == "uk-clsr@1"
    assert alone["meta"]["expert"]["gate_inference"] == "hard"  # as the expert records
    soft = tmp_path / "soft.json"
    assert main([*common, "--expert", "uk-clsr@latest", "--clsr-gates", "soft", "--out", str(soft)]) == 0
    assert json.loads(soft.read_text())["meta"]["expert"]["gate_inference"] == "soft"
    assert main([*common, "--experts", "uk-a,uk-clsr@latest", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["matrix"]["rows"] == ["base", "uk-a", "uk-clsr@latest"]
    assert report["experts"][1]["expert"]["kind"] == "clsr"
    # The matrix row is the single-expert eval, and the expert changed what was decoded.
    assert alone["utterances"] == report["experts"][1]["utterances"] != report["utterances"]
    assert [100 * alone["languages"][lang]["wer"] for lang in ("de", "uk")] == pytest.approx(
        report["matrix"]["wer"][2])


def test_eval_experts_errors_are_named_before_decoding(tiny_whisper_dir, corpus, tmp_path, capsys):
    common = ["eval", "--base", str(tiny_whisper_dir), "--data", str(corpus), "--registry", str(tmp_path / "reg")]
    assert main([*common, "--expert", "a", "--experts", "a,b"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*common, "--plot", str(tmp_path / "m.png")]) == 2
    assert "give --experts" in capsys.readouterr().err
    assert main([*common, "--experts", "a,a"]) == 2
    assert "twice" in capsys.readouterr().err
    assert main([*common, "--experts", "nobody@latest"]) == 2
    assert "nobody" in capsys.readouterr().err


def test_stored_rows_read_back_equal_and_only_changed_rows_decode(base, corpus, experts, tmp_path, monkeypatch):
    import benchmarks.scores as scores
    from inference.evaluation import EvalReport, evaluate
    from trainers.corpus.loading import load_corpus

    utts = utterances_from_dataset(load_corpus(str(corpus))["test"])
    rows = [("uk-a", experts["uk-a"]), ("de-b", experts["de-b"])]
    decoded = []

    def counting(*args, **kwargs):
        decoded.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr("inference.evaluation.evaluate", counting)

    def matrix(rows):
        return language_matrix(base.model, base.processor, utts, rows, OPTS,
                               decode=lambda e: scores.cached_report(base, e, utts, OPTS, tmp_path))

    first = matrix(rows)
    assert len(decoded) == 3 and len(list(tmp_path.glob("*.report.json"))) == 3
    plain = language_matrix(base.model, base.processor, utts, rows, OPTS, progress=False)
    assert first.as_dict() == plain.as_dict()  # the hook decodes what the default does
    again = matrix(rows)
    assert len(decoded) == 3  # (counted: decodes through the stored rows) the second run read all three back
    assert again.as_dict() == first.as_dict()
    assert [r.hypotheses for r in again.reports] == [r.hypotheses for r in first.reports]
    changed = [("uk-a", experts["uk-a"]), ("de-b", _expert(base, 3, "de"))]
    matrix(changed)
    assert len(decoded) == 4 and len(list(tmp_path.glob("*.report.json"))) == 4  # only the new expert
    # A report survives its file: every field of every language, the intervals as tuples.
    report = first.reports[1]
    back = EvalReport.from_dict(json.loads(json.dumps(report.as_dict())))
    assert back.languages == report.languages and back.guard == report.guard and back.meta == report.meta
    # Other decoding options are another row.
    assert scores.score_key(base, None, utts, OPTS) != scores.score_key(base, None, utts, DecodeOptions())
