"""Fusion weight search: candidates applied to one loaded model exactly, searches, the fused expert, the plot."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_experts.merge import merge
from lora_experts.model import attach_expert, remove_experts
from lora_experts.task_vectors import apply_task_vector, task_vector
from registry.expert_file import Expert, new_manifest
from tests.lora_experts.random_experts import linear_shapes, random_lora
from trainers.fusion import (
    DevScorer,
    FusionApplier,
    SearchResult,
    Trial,
    candidate_weights,
    first_changed_encoder_layer,
    fuse_for_target,
    merge_candidate,
    option_candidates,
    scale_candidates,
    search_weights,
    target_scaled,
)
from trainers.fusion_plots import plot_search, search_panels


@pytest.fixture(scope="module")
def base(tiny_whisper_dir):
    from registry.bases import load_base

    return load_base(str(tiny_whisper_dir), device="cpu")


def _expert(base, seed: int, rank: int, contains, language: str) -> Expert:
    shapes = linear_shapes(base.model, contains)
    hyper = {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": list(contains), "side": "decoder"}
    return Expert(random_lora(shapes, rank, seed, scale=0.3), new_manifest("lora", [language], base, hyper))


@pytest.fixture(scope="module")
def experts(base):
    # Different ranks and partly different modules: the target adapts q/v/fc1, the support v/fc1/fc2 (decoder).
    return [_expert(base, 1, 4, ("decoder.layers.0.self_attn.q_proj", "decoder.layers.1.fc1", "v_proj"), "uk"),
            _expert(base, 2, 8, ("decoder.layers.1.fc1", "decoder.layers.0.fc2", "v_proj"), "ru")]


def _logits(model) -> torch.Tensor:
    torch.manual_seed(0)
    feats = torch.randn(1, model.config.num_mel_bins, 3000)
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=torch.tensor([[50258, 50259, 50359, 50363]])).logits


def _reference(clean, tvs, weights, method="linear", **options) -> torch.Tensor:
    """The fusion applied the slow, obvious way: a copy of the plain model plus the dense merged deltas."""
    model = copy.deepcopy(clean)
    apply_task_vector(model, merge(tvs, weights, method, device="cpu", **options).task_vector)
    return _logits(model)


def test_low_rank_candidates_are_exact_and_reuse_the_attached_adapter(base, experts):
    tvs = [task_vector(e) for e in experts]
    clean = copy.deepcopy(base.model)
    plain = _logits(base.model)
    applier = FusionApplier(base.model, tvs, "linear")
    applier.apply([1.0, 0.0])
    attached_alone = copy.deepcopy(base.model)
    remove_experts(attached_alone)
    attach_expert(attached_alone, experts[0].tensors, experts[0].manifest["hyperparameters"])
    torch.testing.assert_close(_logits(base.model), _logits(attached_alone), rtol=1e-5, atol=1e-5)
    for w in ([1.0, 0.3], [1.0, 0.6], [0.8, -0.5]):  # same layout: matrices overwritten in place
        applier.apply(w)
        torch.testing.assert_close(_logits(base.model), _reference(clean, tvs, w), rtol=1e-4, atol=1e-4)
    applier.clear()
    assert torch.equal(_logits(base.model), plain)


def test_dense_candidates_are_exact_and_clear_restores_the_base_bit_exactly(base, experts):
    tvs = [task_vector(e) for e in experts]
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    clean = copy.deepcopy(base.model)
    applier = FusionApplier(base.model, tvs, "ties", {"density": 0.5})
    for w in ([1.0, 0.5], [1.0, 1.0]):
        applier.apply(w)
        torch.testing.assert_close(_logits(base.model), _reference(clean, tvs, w, "ties", density=0.5),
                                   rtol=1e-4, atol=1e-4)
    applier.method, applier.options = "linear", {}  # switching kinds of result on the same model
    applier.apply([1.0, 0.5])
    applier.clear()
    after = base.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_grid_starts_from_the_target_alone_and_scales_the_pooled_support():
    assert candidate_weights("grid", 3, 3) == [[1.0, 0.0, 0.0], [1.0, 0.25, 0.25], [1.0, 0.5, 0.5]]
    assert candidate_weights("grid", 1, 5) == [[1.0]]


def test_interpolate_starts_from_the_target_alone_and_keeps_the_weights_summing_to_one():
    weights = candidate_weights("interpolate", 3, 3)
    assert weights == [[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [0.0, 0.5, 0.5]]
    assert all(sum(w) == pytest.approx(1.0) for w in candidate_weights("interpolate", 2, 6))
    seen = []
    result = search_weights(lambda w: seen.append(w) or {"wer": 0.5 + (w[0] - 0.6) ** 2, "cer": 0.2}, 2,
                            "interpolate", 6, progress=False)
    assert seen[0] == [1.0, 0.0] and result.best.weights == pytest.approx([0.6, 0.4])
    with pytest.raises(ValueError, match="grid and interpolate"):
        candidate_weights("bayes", 2, 3)


def test_grid_search_picks_the_lowest_dev_wer():
    seen = []

    def score(w):
        seen.append(w)
        return {"wer": 0.5 + (w[1] - 0.4) ** 2, "cer": 0.2}

    result = search_weights(score, 2, "grid", 6, progress=False)
    assert seen[0] == [1.0, 0.0] and len(seen) == 6
    assert result.best.weights == pytest.approx([1.0, 0.4])
    assert [t.weights for t in result.trials] == seen


def test_bayes_search_never_ends_worse_than_the_target_alone():
    pytest.importorskip("optuna")

    def score(w):  # the target alone is already good; most of the box is worse
        return {"wer": 0.3 + 0.2 * abs(w[0] - 1.0) + 0.3 * abs(w[1] - 0.7) - 0.15 * (w[1] > 0.4), "cer": 0.1}

    result = search_weights(score, 2, "bayes", 10, seed=3, progress=False)
    first = result.trials[0]
    assert first.weights == [1.0, 0.0]
    assert result.best.wer <= first.wer and len(result.trials) <= 10
    assert all(-1.5 <= x <= 1.5 for t in result.trials for x in t.weights)
    again = search_weights(score, 2, "bayes", 10, seed=3, progress=False)
    assert [t.weights for t in again.trials] == [t.weights for t in result.trials]  # seeded


def test_fixed_weights_must_match_the_experts():
    with pytest.raises(ValueError, match="one weight per expert"):
        search_weights(lambda w: {"wer": 0, "cer": 0}, 2, "fixed", weights=[1.0], progress=False)


def test_fuse_for_target_stores_the_search_in_the_expert(base, experts, uk_corpus, tmp_path):
    from inference.evaluation import utterances_from_dataset
    from trainers.corpus.loading import load_corpus

    dev = utterances_from_dataset(load_corpus(str(uk_corpus))["test"], ["uk"])
    fused, result = fuse_for_target(base, experts, ["uk-small", "ru-espeak"], "uk", dev, method="linear",
                                    search="grid", trials=3, progress=False)
    assert fused.kind == "lora" and fused.languages == ["uk"]
    lineage = fused.manifest["lineage"]
    assert [p["expert"] for p in lineage["parents"]] == ["uk-small", "ru-espeak"]
    assert lineage["method"] == "linear" and lineage["search"] == "grid" and len(lineage["trials"]) == 3
    assert lineage["weights"] == result.best.weights
    assert fused.manifest["metrics"]["uk"]["validation"]["wer"] == result.best.wer
    assert result.best.wer <= result.trials[0].wer
    assert not any(n for n, m in base.model.named_modules() if "lora" in type(m).__name__.lower())  # base left clean
    png = plot_search(result, ["uk-small", "ru-espeak"], str(tmp_path / "search.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_dev_scorer_runs_only_the_encoder_layers_a_candidate_changes(base, uk_corpus):
    from inference.evaluation import utterances_from_dataset
    from trainers.corpus.loading import load_corpus
    from trainers.data import encode_from

    assert first_changed_encoder_layer([{"model.decoder.layers.0.fc1.weight": 0}], 2) == 2
    assert first_changed_encoder_layer([{"model.encoder.layer_norm.weight": 0}], 2) == 2
    assert first_changed_encoder_layer([{"model.decoder.layers.0.fc1.weight": 0},
                                        {"model.encoder.layers.1.fc2.weight": 0}], 2) == 1
    assert first_changed_encoder_layer([{"model.encoder.layers.1.fc1.weight": 0,
                                         "model.encoder.conv1.weight": 0}], 2) == 0
    # The target adapts encoder layer 1 and the decoder, the support encoder layer 1 only.
    experts = [_expert(base, 3, 4, ("encoder.layers.1.fc1", "decoder.layers.0.fc1"), "uk"),
               _expert(base, 4, 4, ("encoder.layers.1.fc2",), "ru")]
    tvs = [task_vector(e) for e in experts]
    start = first_changed_encoder_layer(tvs, base.model.config.encoder_layers)
    assert start == 1
    dev = utterances_from_dataset(load_corpus(str(uk_corpus))["test"], ["uk"])
    partial = DevScorer(base.model, base.processor, dev, encoder_start=start)  # built before any candidate
    whole = DevScorer(base.model, base.processor, dev, encoder_start=0)
    assert partial.batches[0]["features"] is None and whole.batches[0]["hidden"] is None
    encoder, feats = base.model.model.encoder, whole.batches[0]["features"]
    with torch.inference_mode():
        plain = encoder(feats).last_hidden_state
    applier = FusionApplier(base.model, tvs, "linear")
    try:
        applier.apply([1.0, 0.5])
        with torch.inference_mode():
            live = encoder(feats).last_hidden_state
            resumed = encode_from(encoder, partial.batches[0]["hidden"], start)
        assert not torch.allclose(live, plain, atol=1e-4)  # the candidate changes the encoder output
        torch.testing.assert_close(resumed, live, rtol=1e-5, atol=1e-5)
        assert partial()["hypotheses"] == whole()["hypotheses"]
    finally:
        applier.clear()


def test_decoder_support_scope_keeps_the_encoder_the_targets(base):
    from lora_experts.deltas import dense
    from trainers.fusion import scoped

    # Both adapt encoder layer 1 and the decoder; with scope "decoder" the support's encoder delta is left out.
    experts = [_expert(base, 5, 4, ("encoder.layers.1.fc1", "decoder.layers.0.fc1"), "cs"),
               _expert(base, 6, 4, ("encoder.layers.1.fc1", "encoder.layers.0.fc2", "decoder.layers.0.fc1"), "sk")]
    t, s = (task_vector(e) for e in experts)
    fused, result = fuse_for_target(base, experts, ["cs-real", "sk-espeak"], "cs", None, search="fixed",
                                    weights=[1.0, 0.5], progress=False, support_scope="decoder")
    merged = {k: dense(v) for k, v in result.merge.task_vector.items()}
    enc, dec = "model.encoder.layers.1.fc1.weight", "model.decoder.layers.0.fc1.weight"
    assert "model.encoder.layers.0.fc2.weight" not in merged  # only the support changed it: gone
    torch.testing.assert_close(merged[enc], dense(t[enc]))  # the target's encoder delta, untouched
    torch.testing.assert_close(merged[dec], dense(t[dec]) + 0.5 * dense(s[dec]))  # the decoders summed
    assert fused.manifest["lineage"]["support_scope"] == "decoder"
    full, _ = fuse_for_target(base, experts, ["cs-real", "sk-espeak"], "cs", None, search="fixed",
                              weights=[1.0, 0.5], progress=False)
    assert "support_scope" not in full.manifest["lineage"]
    with pytest.raises(ValueError, match="changes only the encoder.*support scope 'all'"):
        scoped({"model.encoder.layers.1.fc1.weight": t[enc]}, "decoder", "support sk-enc")
    with pytest.raises(ValueError, match="support scope 'attention'"):
        scoped(t, "attention", "support sk-espeak")


def test_a_multi_language_merge_needs_no_dev_set(base, experts):
    fused, result = fuse_for_target(base, experts, ["uk-small", "ru-espeak"], None, None, method="ties",
                                    options={"density": 0.5}, search="fixed", weights=[0.5, 0.5], progress=False)
    assert fused.kind == "task_vector" and sorted(fused.languages) == ["ru", "uk"]
    with pytest.raises(ValueError, match="needs a dev set"):
        fuse_for_target(base, experts, ["a", "b"], "uk", None, search="grid")


def test_fuse_command_searches_stores_and_plots(base, experts, tiny_whisper_dir, uk_corpus, tmp_path, capsys):
    from registry.store import Registry
    from trainers.cli import main

    reg = tmp_path / "registry"
    registry = Registry(str(reg))
    registry.add(experts[0], "uk-small")
    registry.add(experts[1], "ru-espeak")
    common = ["--base", str(tiny_whisper_dir), "--registry", str(reg), "--quiet"]
    assert main(["fuse", "--target", "uk", "--experts", "uk-small,ru-espeak", "--dev", str(uk_corpus),
                 "--dev-split", "test", "--trials", "3", "--name", "uk-fused", "--run-dir", str(tmp_path / "run"),
                 *common]) == 0
    out = capsys.readouterr().out
    assert "stored uk-fused@1" in out and "| uk-small alone | 1,0 |" in out
    assert (tmp_path / "run" / "search.png").is_file() and (tmp_path / "run" / "search.json").is_file()
    # Each support's cosine with the target is said before the search, and kept with it.
    from lora_experts.similarity import expert_similarity

    cos = expert_similarity(experts[:2], ["uk-small", "ru-espeak"]).cosine["all"][0][1]
    assert f"support ru-espeak: cosine {cos:+.3f} with uk-small (all deltas)" in out
    saved = json.loads((tmp_path / "run" / "search.json").read_text())
    assert saved["support_cosines"] == {"ru-espeak": pytest.approx(cos)}
    fused = registry.get("uk-fused@latest")
    assert fused.manifest["lineage"]["search"] == "grid" and len(fused.manifest["lineage"]["trials"]) == 3
    # Fixed weights scored on dev: one row, not called the target alone.
    assert main(["fuse", "--target", "uk", "--experts", "uk-small,ru-espeak", "--weights", "0.6,0", "--dev",
                 str(uk_corpus), "--dev-split", "test", "--name", "uk-shrunk", "--run-dir", str(tmp_path / "run1"),
                 *common]) == 0
    out = capsys.readouterr().out
    assert "| fixed weights | 0.6,0 |" in out and "alone" not in out
    # A multi-language merge with the method's default weights, and a method option.
    assert main(["fuse", "--experts", "uk-small,ru-espeak", "--method", "ties", "--option", "density=0.3",
                 "--name", "multi2", "--run-dir", str(tmp_path / "run2"), *common]) == 0
    merged = registry.get("multi2@latest")
    assert merged.kind == "task_vector" and merged.manifest["lineage"]["options"] == {"density": 0.3}
    # Bad input is named before anything runs.
    assert main(["fuse", "--experts", "uk-small,ru-espeak", "--weights", "1", "--name", "x", *common]) == 2
    assert "2 experts" in capsys.readouterr().err
    # Searched option values: each trial's options kept in search.json, the chosen ones printed.
    assert main(["fuse", "--target", "uk", "--experts", "uk-small,ru-espeak", "--dev", str(uk_corpus),
                 "--dev-split", "test", "--trials", "2", "--method", "ties", "--option", "density=0.3,1.0",
                 "--name", "uk-ties", "--run-dir", str(tmp_path / "run3"), *common]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "run3" / "search.json").read_text())
    assert saved["options"] == {"density": [0.3, 1.0]}
    assert [t["options"] for t in saved["trials"]] == [{"density": 0.3}] * 2 + [{"density": 1.0}] * 2
    assert "| uk-small alone | 1,0 |" in out and "| chosen (grid, 4 trials" in out
    assert (tmp_path / "run3" / "search.png").is_file()
    assert main(["fuse", "--experts", "uk-small", "--option", "density", "--name", "y", *common]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert main(["fuse", "--experts", "uk-small,ru-espeak", "--support-scope", "decoder", "--name", "z", *common]) == 2
    assert "--support-scope decoder applies to a target fusion" in capsys.readouterr().err


def test_option_values_given_as_a_list_are_searched_in_every_combination():
    assert option_candidates(None) == [{}]
    assert option_candidates({"density": 0.2}) == [{"density": 0.2}]
    assert option_candidates({"density": [0.2, 0.5], "lam": 1.0, "sign": ["mass", "count"]}) == [
        {"density": 0.2, "lam": 1.0, "sign": "mass"}, {"density": 0.2, "lam": 1.0, "sign": "count"},
        {"density": 0.5, "lam": 1.0, "sign": "mass"}, {"density": 0.5, "lam": 1.0, "sign": "count"}]
    with pytest.raises(ValueError, match="option density: an empty list"):
        option_candidates({"density": []})
    from trainers.cli.fuse import parse_options

    assert parse_options(["density=0.2,0.5, 1.0", "variant=prune,residual", "lam=1"]) == {
        "density": [0.2, 0.5, 1.0], "variant": ["prune", "residual"], "lam": 1}
    assert parse_options(["density=[0.2,0.5]", "variant=residual"]) == {"density": [0.2, 0.5], "variant": "residual"}
    with pytest.raises(ValueError, match="an empty value in the list"):
        parse_options(["density=0.2,,0.5"])


def test_the_target_alone_is_the_target_itself_under_any_method(experts):
    from lora_experts.deltas import dense

    tvs = [task_vector(e) for e in experts]
    for method, options in [("ties", {"density": 0.3}), ("dare_linear", {"drop_rate": 0.5}),
                            ("magnitude_prune", {"density": 0.2})]:
        alone = merge_candidate(tvs, [1.0, 0.0], method, options)
        assert alone.method == "linear" and sorted(alone.task_vector) == sorted(tvs[0])
        for name, delta in tvs[0].items():
            torch.testing.assert_close(dense(alone.task_vector[name]), dense(delta))
        trimmed = merge_candidate(tvs, [1.0, 0.5], method, options)  # with a support: the method as asked
        assert trimmed.method == method and trimmed.options.items() >= options.items()


def test_method_options_are_searched_with_the_weights(base, experts, uk_corpus, tmp_path, monkeypatch):
    from inference.evaluation import utterances_from_dataset
    from trainers import fusion
    from trainers.corpus.loading import load_corpus

    dev = utterances_from_dataset(load_corpus(str(uk_corpus))["test"], ["uk"])
    calls = []
    real_call = fusion.DevScorer.__call__
    monkeypatch.setattr(fusion.DevScorer, "__call__", lambda self: calls.append(1) or real_call(self))
    fused, result = fuse_for_target(base, experts, ["uk-small", "ru-espeak"], "uk", dev, method="ties",
                                    options={"density": [0.3, 1.0], "lam": 1.0}, search="grid", trials=3,
                                    progress=False)
    # One grid per density, the target alone first in each; scored once (it is the same expert in both).
    assert [t.options for t in result.trials] == [{"density": 0.3, "lam": 1.0}] * 3 + [{"density": 1.0, "lam": 1.0}] * 3
    assert [t.weights for t in result.trials] == [[1.0, 0.0], [1.0, 0.5], [1.0, 1.0]] * 2
    assert len(calls) == 5 and result.trials[0].wer == result.trials[3].wer
    assert result.best.wer == min(t.wer for t in result.trials)
    lineage = fused.manifest["lineage"]
    assert [t["options"] for t in lineage["trials"]] == [t.options for t in result.trials]
    if result.best.weights == [1.0, 0.0]:  # the target kept: its exact delta, said so
        assert lineage["method"] == "linear" and lineage["searched_method"] == "ties"
    else:
        assert lineage["method"] == "ties" and lineage["options"] == result.best.options
    png = plot_search(result, ["uk-small", "ru-espeak"], str(tmp_path / "search.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="a list of values is searched on the target's dev set"):
        fuse_for_target(base, experts, ["a", "b"], "uk", None, method="ties", options={"density": [0.3, 1.0]},
                        search="fixed", weights=[1.0, 0.5], progress=False)


def test_the_search_plot_gives_one_panel_per_weight_that_moved():
    def trial(*w):
        return Trial(list(w), 0.5, 0.2, 0.5, 1.0)

    grid = [trial(1.0, 0.0, 0.0), trial(1.0, 0.1, 0.1), trial(1.0, 0.2, 0.2)]
    assert search_panels(SearchResult(grid, grid[1]), ["t", "a", "b"]) == ([[1, 2]], ["t fixed at 1"])
    soup = [trial(1.0, 0.0), trial(0.6, 0.4), trial(0.2, 0.8)]
    assert search_panels(SearchResult(soup, soup[1]), ["t", "s"]) == ([[1]], ["t at 1 - the supports' weight"])
    free = [trial(1.0, 0.0), trial(0.5, 0.3)]
    assert search_panels(SearchResult(free, free[0]), ["t", "a"]) == ([[0], [1]], [])
    one = [trial(1.0, 0.0)]
    assert search_panels(SearchResult(one, one[0]), ["t", "a"]) == ([[0]], ["a fixed at 0"])


def test_the_shrinkage_control_scores_the_target_alone_scaled(base, experts, uk_corpus, tmp_path, monkeypatch):
    from inference.evaluation import utterances_from_dataset
    from lora_experts.deltas import dense
    from trainers import fusion
    from trainers.corpus.loading import load_corpus

    assert scale_candidates(6) == [0.2, 0.4, 0.6, 0.8, 1.0] and scale_candidates(2) == [0.5, 1.0]
    assert target_scaled([0.6, 0.0, 0.0]) and target_scaled([1.0, 0.0]) and not target_scaled([0.6, 0.1])
    assert not target_scaled([0.0, 0.0])
    tvs = [task_vector(e) for e in experts]
    shrunk = merge_candidate(tvs, [0.6, 0.0], "ties", {"density": 0.3})  # never trimmed: the target times 0.6
    assert shrunk.method == "linear"
    for name, delta in tvs[0].items():
        torch.testing.assert_close(dense(shrunk.task_vector[name]), 0.6 * dense(delta))

    dev = utterances_from_dataset(load_corpus(str(uk_corpus))["test"], ["uk"])
    calls = []
    real_call = fusion.DevScorer.__call__
    monkeypatch.setattr(fusion.DevScorer, "__call__", lambda self: calls.append(1) or real_call(self))
    fused, result = fuse_for_target(base, experts, ["uk-small", "ru-espeak"], "uk", dev, method="ties",
                                    options={"density": 1.0}, search="grid", trials=3, progress=False,
                                    scaled_target=True)
    # Control: scales 0.5 and 1; the target alone (scale 1) is not decoded twice. 3 grid trials + 1 new scale.
    assert [t.weights for t in result.control] == [[0.5, 0.0], [1.0, 0.0]] and len(calls) == 4
    assert result.control[1].wer == result.trials[0].wer
    assert result.best in result.trials  # reported, never chosen from
    assert result.control_best.wer == min(t.wer for t in result.control)
    assert [t["weights"] for t in fused.manifest["lineage"]["scaled_target_control"]] == [[0.5, 0.0], [1.0, 0.0]]
    # The scaled candidate is applied as the target's delta times 0.5: the same logits as the slow reference.
    clean = copy.deepcopy(base.model)
    applier = FusionApplier(base.model, tvs, "ties", {"density": 0.3})
    try:
        applier.apply([0.5, 0.0])
        torch.testing.assert_close(_logits(base.model), _reference(clean, tvs, [0.5, 0.0]))
    finally:
        applier.clear()
    png = plot_search(result, ["uk-small", "ru-espeak"], str(tmp_path / "search.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="scaled-target control is scored on the target's dev set"):
        fuse_for_target(base, experts, ["a", "b"], "uk", None, search="fixed", weights=[1.0, 0.5], progress=False,
                        scaled_target=True)


def test_fuse_command_reports_the_shrinkage_control(base, experts, tiny_whisper_dir, uk_corpus, tmp_path, capsys):
    from registry.store import Registry
    from trainers.cli import main
    from trainers.cli.fuse import shrinkage_verdict

    reg = tmp_path / "registry"
    registry = Registry(str(reg))
    registry.add(experts[0], "uk-small")
    registry.add(experts[1], "ru-espeak")
    assert main(["fuse", "--target", "uk", "--experts", "uk-small,ru-espeak", "--dev", str(uk_corpus),
                 "--dev-split", "test", "--trials", "3", "--scaled-target", "--name", "uk-ctl", "--run-dir",
                 str(tmp_path / "run"), "--base", str(tiny_whisper_dir), "--registry", str(reg), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| control: uk-small alone, best scale of 2 |" in out
    assert "beat uk-small" in out  # one of the three verdicts (below)
    saved = json.loads((tmp_path / "run" / "search.json").read_text())
    assert [t["weights"] for t in saved["scaled_target"]] == [[0.5, 0.0], [1.0, 0.0]]
    if saved["best"]["weights"] == [1.0, 0.0]:  # the target kept: no fused step to speak of
        assert "fused_step" not in saved and "the fused delta is" not in out
    else:
        assert saved["fused_step"]["orthogonal"] > 0 and "the fused delta is " in out
    # Fixed weights with a support: the step is said (the support's own part is orthogonal to the target).
    assert main(["fuse", "--target", "uk", "--experts", "uk-small,ru-espeak", "--weights", "1,0.5", "--dev",
                 str(uk_corpus), "--dev-split", "test", "--name", "uk-fixed", "--run-dir", str(tmp_path / "run2"),
                 "--base", str(tiny_whisper_dir), "--registry", str(reg), "--quiet"]) == 0
    out = capsys.readouterr().out
    step = json.loads((tmp_path / "run2" / "search.json").read_text())["fused_step"]
    assert f"the fused delta is {step['along_target']:.2f} x uk-small's" in out and step["orthogonal"] > 0
    # The verdict's two readings, and the fix it names.
    control = Trial([0.6, 0.0], 0.40, 0.2, 0.40, 1.0)
    worse = shrinkage_verdict(Trial([1.0, 0.4], 0.41, 0.2, 0.41, 1.0), control, "cs-100")
    assert "do not beat cs-100 alone scaled by 0.6" in worse and "--weights 0.6,0" in worse
    better = shrinkage_verdict(Trial([1.0, 0.4], 0.37, 0.2, 0.37, 1.0), control, "cs-100")
    assert "beat cs-100 alone at its best scale (0.6) by 3.0 WER points" in better
    unscaled = Trial([1.0, 0.0], 0.40, 0.2, 0.40, 1.0)
    assert "neither the supports nor a smaller step of cs-100 beat cs-100 alone on dev (40.0% WER)" == \
        shrinkage_verdict(Trial([1.0, 0.0], 0.40, 0.2, 0.40, 1.0), unscaled, "cs-100")
    alone = shrinkage_verdict(Trial([1.0], 0.42, 0.2, 0.42, 1.0), Trial([0.6], 0.40, 0.2, 0.40, 1.0), "cs-100",
                              supports=False)
    assert alone.startswith("cs-100 scaled by 0.6 scores 40.0% WER on dev against 42.0") and "--weights 0.6" in alone
    # One expert: --scaled-target calibrates its scale on dev (a search of one trial, a plotted control).
    assert main(["fuse", "--target", "uk", "--experts", "uk-small", "--dev", str(uk_corpus), "--dev-split", "test",
                 "--trials", "3", "--scaled-target", "--name", "uk-cal", "--run-dir", str(tmp_path / "run3"),
                 "--base", str(tiny_whisper_dir), "--registry", str(reg), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| control: uk-small alone, best scale of 2 |" in out and (tmp_path / "run3" / "search.png").is_file()
    assert "uk-small scaled by 0.5 scores" in out or "no smaller step of uk-small does better" in out
