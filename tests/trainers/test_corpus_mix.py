"""Several corpora in one training run (--data A --data B:0.5), and a tiny run with every augmentation on."""

from __future__ import annotations

from collections import Counter

import pytest

from trainers.corpus_mix import CorpusMix, CorpusSpec


def test_mix_draws_round_weight_times_rows_per_corpus():
    spans = [(0, 9, 1.0), (9, 19, 0.6), (19, 23, 2.0), (23, 27, 1.5)]
    mix = CorpusMix(spans, seed=0)
    assert len(mix) == 9 + 6 + 8 + 6
    epochs = [mix.rows(e) for e in range(3)]
    for rows in epochs:
        counts = Counter(rows)
        assert len(rows) == len(mix)
        assert all(counts[i] == 1 for i in range(9))  # weight 1: every row once
        b = [i for i in range(9, 19) if counts[i]]
        assert len(b) == 6 and all(counts[i] == 1 for i in b)  # 0.6: six distinct rows of ten
        assert all(counts[i] == 2 for i in range(19, 23))  # 2: every row twice
        assert sorted(counts[i] for i in range(23, 27)) == [1, 1, 2, 2]  # 1.5: once, and half of them again
    assert len({tuple(sorted(r)) for r in epochs}) > 1  # a fractional weight draws other rows each epoch
    assert CorpusMix(spans, seed=0).rows(1) == epochs[1]  # the same for a seed and epoch (every DDP rank)
    assert CorpusMix(spans, seed=1).rows(1) != epochs[1]


def test_corpus_specs_parse_weights_and_refuse_bad_ones(tmp_path):
    assert CorpusSpec.parse("data/uk") == CorpusSpec("data/uk", 1.0, "data/uk")
    assert CorpusSpec.parse("data/uk:0.5").weight == 0.5 and CorpusSpec.parse("data/uk:0.5").path == "data/uk"
    odd = tmp_path / "corpus:v2"
    odd.mkdir()
    assert CorpusSpec.parse(str(odd)).path == str(odd)  # a directory named with a colon is taken whole
    with pytest.raises(ValueError, match=r"--data data/uk:abc: weight 'abc' is not a number.*DIR:WEIGHT"):
        CorpusSpec.parse("data/uk:abc")
    for bad in ("data/uk:-1", "data/uk:0", "data/uk:nan"):
        with pytest.raises(ValueError, match=f"--data {bad}: weight .* must be a positive number"):
            CorpusSpec.parse(bad)
    with pytest.raises(ValueError, match=r"--data missing:0.5: no corpus directory missing;.*DIR:WEIGHT"):
        CorpusSpec.parse("missing:0.5").check()


def _args(*argv):
    from trainers.cli import build_parser
    from trainers.cli.train import _config_from_args

    return _config_from_args(build_parser().parse_args(["train", *argv, "--language", "uk", "--name", "x"]))


def test_train_flags_for_several_corpora_and_augmentation(tmp_path):
    cfg, _, _ = _args("--data", "data/uk")
    assert (cfg.data, cfg.data_weight, cfg.extra_data) == ("data/uk", 1.0, ())  # one --data: as before
    assert not cfg.spec_augment and cfg.speed_perturb == () and cfg.noise_snr_db is None  # augmentation off
    cfg, _, _ = _args("--data", "A:2", "--data", "B:0.5", "--data", "C", "--spec-augment", "--spec-time-masks", "3",
                      "--speed-perturb", "0.9,1.0,1.1", "--noise-snr-db", "20", "--noise-kind", "white")
    assert (cfg.data, cfg.data_weight, cfg.extra_data) == ("A", 2.0, ("B:0.5", "C"))
    assert cfg.spec_augment and cfg.spec_time_masks == 3 and cfg.speed_perturb == (0.9, 1.0, 1.1)
    assert (cfg.noise_snr_db, cfg.noise_kind) == (20.0, "white")
    assert cfg.augmentation().variants()[1].speed == 0.9
    # YAML: the same keys, `data` a list or a string
    (tmp_path / "c.yaml").write_text("data: [A, 'B:0.25']\nlanguage: uk\nname: x\nspec_augment: true\n"
                                     "speed_perturb: [0.9, 1.1]\nnoise_snr_db: 15\n")
    cfg, _, _ = _args("--config", str(tmp_path / "c.yaml"))
    assert (cfg.data, cfg.extra_data, cfg.speed_perturb, cfg.noise_snr_db) == ("A", ("B:0.25",), (0.9, 1.1), 15)
    with pytest.raises(ValueError, match="--data B:x: weight 'x' is not a number"):
        _args("--data", "A", "--data", "B:x")
    with pytest.raises(ValueError, match="--data B:-2: weight -2 must be a positive number"):
        _args("--data", "A", "--data", "B:-2")
    with pytest.raises(ValueError, match="--speed-perturb fast: expected comma-separated numbers"):
        _args("--data", "A", "--speed-perturb", "fast")


def test_help_says_validation_uses_the_first_corpus(capsys):
    from trainers.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "DIR[:WEIGHT]" in out and "validation and test use it alone" in out
    assert "--spec-augment" in out and "--speed-perturb" in out and "--noise-snr-db" in out


def test_missing_extra_corpus_fails_before_the_base_loads(uk_corpus, tmp_path, capsys):
    from trainers.cli import main

    code = main(["train", "--base", str(tmp_path / "no-such-base"), "--data", str(uk_corpus), "--data",
                 f"{tmp_path}/missing:0.5", "--language", "uk", "--name", "x", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"--data {tmp_path}/missing:0.5: no corpus directory" in err and "no-such-base" not in err


def test_data_module_mixes_corpora_and_validates_on_the_first(uk_corpus, uk_pt_corpus, tiny_whisper):
    from trainers.data import ExpertDataModule

    dm = ExpertDataModule(str(uk_corpus), tiny_whisper[1], ["uk"], 4, progress=False,
                          extra_data=(f"{uk_pt_corpus}:0.6",))
    dm.setup()
    n_a, n_b = 9, 5  # uk_corpus's training rows; uk_pt_corpus's Ukrainian ones (its Portuguese are left out)
    assert len(dm.datasets["train"]) == n_a + n_b
    loader = dm.train_dataloader()
    per_epoch = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        rows = [i for batch in loader for i in batch["index"].tolist()]
        assert len(rows) == n_a + 3  # 9 x 1 + round(5 x 0.6)
        assert sorted(i for i in rows if i < n_a) == list(range(n_a))
        assert len({i for i in rows if i >= n_a}) == 3
        per_epoch.append(rows)
    assert len(loader) == 3  # ceil(12 / 4) batches
    assert len(dm.datasets["validation"]) == 1 and set(dm.datasets["validation"].rows["language"]) == {"uk"}
    assert dm.summary["validation"]["utterances"] == 1  # the first corpus's alone (uk_pt_corpus has 1 uk too)
    assert [(c["corpus"], c["weight"], c["utterances"], c["per_epoch"]) for c in dm.corpora_summary] == [
        (str(uk_corpus), 1.0, n_a, n_a), (str(uk_pt_corpus), 0.6, n_b, 3)]
    assert dm.summary["train"]["utterances"] == n_a + n_b


def test_max_train_caps_the_target_corpus_only(uk_corpus, uk_pt_corpus, tiny_whisper):
    """A few real clips plus a whole synthetic corpus: --max-train counts the first --data's clips alone."""
    from trainers.data import ExpertDataModule

    dm = ExpertDataModule(str(uk_corpus), tiny_whisper[1], ["uk"], 4, max_train=3, progress=False,
                          extra_data=(str(uk_pt_corpus),))
    dm.setup()
    assert [(c["corpus"], c["utterances"]) for c in dm.corpora_summary] == [(str(uk_corpus), 3), (str(uk_pt_corpus), 5)]
    assert len(dm.datasets["train"]) == 8 and dm.summary["train"]["utterances"] == 8


def test_a_further_corpus_needs_one_of_the_languages(uk_corpus, uk_pt_corpus, tiny_whisper):
    from trainers.data import ExpertDataModule

    dm = ExpertDataModule(str(uk_pt_corpus), tiny_whisper[1], ["pt"], 4, progress=False,
                          extra_data=(str(uk_corpus),))
    with pytest.raises(ValueError, match=f"{uk_corpus} .train. has no utterances in pt"):
        dm.setup()


def test_tiny_run_with_every_augmentation_and_two_corpora(uk_corpus, uk_pt_corpus, tiny_whisper_dir, tmp_path,
                                                          monkeypatch):
    """End to end: a top-encoder expert (encoder layer 0 cached) with SpecAugment on the cached layer inputs,
    speed and noise copies and a second corpus; the manifest records all of it."""
    import trainers.augment
    from trainers.train_lora import TrainConfig, train_lora_expert

    masked = []  # the input each masked batch carried: training steps only, never validation
    original = trainers.augment.spec_augment_batch

    def spy(batch, *args, **kwargs):
        masked.append(next(k for k in trainers.augment.INPUT_KEYS if k in batch))
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(trainers.augment, "spec_augment_batch", spy)

    cfg = TrainConfig(data=str(uk_corpus), languages=("uk",), base=str(tiny_whisper_dir), rank=2, epochs=1,
                      max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, run_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), progress=False, test=False, side="both", encoder_start=1,
                      dropout=0.0, extra_data=(f"{uk_pt_corpus}:0.5",), spec_augment=True, speed_perturb=(0.9, 1.1),
                      noise_snr_db=20.0, seed=1)
    expert, report = train_lora_expert(cfg)
    assert masked == ["encoder_layer_input"] * 3 and report["history"]  # 3 steps masked; validation ran unmasked
    m = expert.manifest
    aug = m["hyperparameters"]["augmentation"]
    assert aug["spec_augment"] and aug["speed_perturb"] == [0.9, 1.1] and aug["noise_snr_db"] == 20.0
    assert (aug["spec_freq_masks"], aug["spec_freq_width"], aug["noise_kind"]) == (2, 27, "pink")
    corpora = m["data"]["corpora"]
    assert [(c["corpus"], c["weight"], c["utterances"], c["copies"]) for c in corpora] == [
        (str(uk_corpus), 1.0, 9, 4), (str(uk_pt_corpus), 0.5, 5, 4)]
    assert corpora[1]["per_epoch"] == 10 and m["data"]["corpus"] == str(uk_corpus)
    assert m["data"]["utterances"] == 14 and m["data"]["validation_utterances"] == 1
    # 4 copies of each corpus's training rows (originals, 0.9, 1.1, noise) + the validation rows, all cached
    assert len(list((tmp_path / "cache").glob("*-layer1.npy"))) == 4 + 4 + 1
    assert any(k.startswith("model.encoder.layers.1.") for k in expert.tensors)
    assert all(t.abs().sum() > 0 for k, t in expert.tensors.items() if "lora_B" in k)
