"""benchmarks/real_fusion.py's support specs: every kind it trains or reads, and a clear refusal otherwise."""

from __future__ import annotations

import pytest

from benchmarks.real_fusion import parse_supports


def test_support_specs_name_synthetic_real_asterisk_and_file_experts():
    assert parse_supports("sk:synth, nl:real,ru:asterisk,de=runs/de.safetensors,cs:synth-domain") == [
        ("sk", "synth", None), ("nl", "real", None), ("ru", "asterisk", None), ("de", "file", "runs/de.safetensors"),
        ("cs", "synth-domain", None)]
    with pytest.raises(SystemExit, match="'ru:phone' is not LANG:synth, LANG:synth-domain, LANG:real, "
                                         "LANG:asterisk or LANG=FILE"):
        parse_supports("ru:phone")


def _corpus(path):
    """A real-speech-shaped corpus: cs and nl training clips, cs validation and test clips of other lines."""
    import datasets
    import numpy as np

    from trainers.corpus.loading import make_row, rows_to_dataset

    tone = np.sin(np.arange(8000) * 0.1).astype(np.float32) * 0.3

    def split(rows):
        return rows_to_dataset([make_row(id=f"{lang}-{i}", audio=tone, text=text, language=lang, source="test")
                                for i, (lang, text) in enumerate(rows)])

    datasets.DatasetDict(
        train=split([("cs", "Ty amfory padají nelidsky pomalu."), ("nl", "Dat is een mooie vis."),
                     ("cs", "Konečně vidím nějakou novou lebku."), ("cs", "Vidíš toho koníka v té skříni?"),
                     ("cs", "Musíme odsud dostat tu velkou ocelovou trubku.")]),
        validation=split([("cs", "Tohle je věta jen z validační úrovně.")]),
        test=split([("cs", "Tohle je věta jen z testovací úrovně.")]),
    ).save_to_disk(str(path))


def test_the_in_domain_support_reads_only_the_training_levels_text(tmp_path):
    """``LANG:synth-domain``: espeak-ng reads LANG's transcripts of the real corpus's training split, never a
    validation or test level's line nor another language's; a language without training clips is refused by name."""
    from types import SimpleNamespace

    from benchmarks.support_corpora import domain_corpus, domain_size, domain_tag, domain_text
    from trainers.corpus.loading import load_corpus

    _corpus(tmp_path / "real")
    args = SimpleNamespace(data=str(tmp_path / "real"), synth_dir=str(tmp_path / "synth"), synth_per_language=700,
                           seed=1, domain_train_fraction=0.7)
    text = domain_text("cs", args).read_text(encoding="utf-8")
    assert text.splitlines() == ["Ty amfory padají nelidsky pomalu.", "Konečně vidím nějakou novou lebku.",
                                 "Vidíš toho koníka v té skříni?", "Musíme odsud dostat tu velkou ocelovou trubku."]
    assert domain_size("cs", args) == 3  # four usable lines less two in reserve, but at least one per split
    assert domain_tag("cs", args) == ""  # the defaults keep session 39's names
    args.synth_per_language = 3
    made = domain_corpus("cs", args)
    assert made.endswith("cs-espeak-domain-3")  # another size never reuses the 700-utterance corpus or its expert
    corpus = load_corpus(made)  # real espeak-ng
    said = [t for split in corpus.values() for t in split["text"]]
    assert len(said) == 3 and set(said) <= set(text.splitlines())
    with pytest.raises(SystemExit, match="has no de training clips to take the text from"):
        domain_text("de", args)
    args.domain_train_fraction = 0.85
    assert domain_tag("cs", args) == "-3-train85"


def test_the_in_domain_text_of_another_corpus_is_refused_not_reused(tmp_path):
    """The in-domain text is cached beside the synthetic corpora; a copy made from another corpus (or edited) is
    refused with the file and the fix named, and left as it was."""
    from types import SimpleNamespace

    from benchmarks.support_corpora import domain_text

    _corpus(tmp_path / "real")
    stale = tmp_path / "synth" / "cs-domain.txt"
    stale.parent.mkdir()
    stale.write_text("Věta z jiného korpusu.\n", encoding="utf-8")
    args = SimpleNamespace(data=str(tmp_path / "real"), synth_dir=str(tmp_path / "synth"), synth_per_language=700,
                           seed=1, domain_train_fraction=0.7)
    with pytest.raises(SystemExit, match=r"cs-domain.txt holds other text than the cs training transcripts of .*"
                                         r"give another --synth-dir, or delete"):
        domain_text("cs", args)
    assert stale.read_text(encoding="utf-8") == "Věta z jiného korpusu.\n"


def test_the_shrinkage_controls_are_on_unless_turned_off(capsys):
    from benchmarks.real_fusion import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--scaled-target, --no-scaled-target" in capsys.readouterr().out


def test_an_in_domain_train_share_that_leaves_no_validation_is_refused(capsys, tmp_path):
    from benchmarks.real_fusion import main

    with pytest.raises(SystemExit):
        main(["--supports", "cs:synth-domain", "--domain-train-fraction", "0.95", "--out", str(tmp_path),
              "--runs", str(tmp_path / "runs")])
    assert "--domain-train-fraction 0.95: give 0.1 to 0.85" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_fixed_weights_go_with_search_fixed_one_per_expert(capsys, tmp_path):
    """``--search fixed`` and ``--weights`` are refused apart, and a weight count that is not one per expert (the
    target first) is refused by name, before anything is trained."""
    from benchmarks.real_fusion import main

    out = ["--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    with pytest.raises(SystemExit):
        main(["--supports", "sk:synth", "--search", "fixed", *out])
    assert "--search fixed and --weights go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--supports", "sk:synth", "--weights", "0.6,0.4", *out])
    assert "--search fixed and --weights go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--supports", "sk:synth,pl:synth", "--search", "fixed", "--weights", "0.6,0.4", *out])
    assert "--weights: 2 given, one per expert needed (3: the target first)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_fixed_weights_table_says_the_weights_were_not_searched():
    """With weights fixed beforehand there is no target-alone validation trial: the table says so instead."""
    from benchmarks.real_fusion import table

    def row(label, errors):
        utts = [{"id": f"u{i}", "language": "cs", "word_errors": e, "words": 10} for i, e in enumerate(errors)]
        return {"label": label, "wer": sum(errors) / (10 * len(errors)), "cer": 0.2, "n": len(errors),
                "wer_ci95": [0.3, 0.6], "utterances": utts}

    results = {"command": "python benchmarks/real_fusion.py --search fixed --weights 0.6,0.4", "target": "cs",
               "base": "whisper-base", "target_expert": "cs-real-100-seed1", "dev_n": 151,
               "dev_wer": {"target_only": None, "fused": 0.61},
               "rows": {"cs-real-100-seed1": row("cs-real-100-seed1 alone (the target)", [5, 4, 6, 5]),
                        "fused": {**row("fused (linear, weights fixed beforehand)", [4, 4, 5, 4]),
                                  "weights": {"cs-real-100-seed1": 0.6, "cs-cs-rest-100": 0.4},
                                  "search_minutes": 3.0}}}
    md = table(results)
    assert "Weights fixed beforehand; validation WER of the fused expert on 151 real validation clips 61.0" in md
    assert "| fused (linear, weights fixed beforehand) |" in md and "+0.60 |" in md
    assert "in-domain" not in md
    md = table({**results, "domain_sizes": {"cs": 1016}, "domain_train_fraction": 0.85})
    assert "Synthetic in-domain cs: 1016 espeak-ng utterances of the training levels' transcripts (85% trained " \
           "on)" in md
    assert "(70% trained on)" in table({**results, "domain_sizes": {"cs": 700}})  # session 39's runs: the default


def test_the_shrinkage_controls_have_their_rows_and_the_fused_row_is_compared_with_each(tmp_path):
    """``--scaled-target``: the controls' test rows, the fused row's paired change against each, the validation
    curve and the fused step in the note, and the plot's extra panel (drawn from the JSON, as ``--table-only``)."""
    from benchmarks.real_fusion import plot, searched, table

    def row(label, errors, **extra):
        utts = [{"id": f"u{i}", "language": "cs", "word_errors": e, "words": 10} for i, e in enumerate(errors)]
        return {"label": label, "wer": sum(errors) / (10 * len(errors)), "cer": 0.2, "n": len(errors),
                "wer_ci95": [0.3, 0.6], "utterances": utts, **extra}

    def trial(w, wer):
        return {"weights": w, "wer": wer, "cer": 0.2, "objective": wer, "seconds": 1.0, "options": None}

    control = [trial([0.5, 0.0], 0.63), trial([1.0, 0.0], 0.62)]
    results = {"command": "python benchmarks/real_fusion.py --fixed --scaled-target", "target": "cs",
               "target_train": 100, "base": "whisper-base", "target_expert": "cs-real-100", "dev_n": 151,
               "dev_wer": {"target_only": None, "fused": 0.61}, "names": ["cs-real-100", "cs-espeak"],
               "trials": [trial([1.0, 0.2], 0.61)], "scaled_target": control,
               "fused_step": {"along_target": 0.506, "orthogonal": 0.343},
               "rows": {"cs-real-100": row("cs-real-100 alone (the target)", [5, 4, 6, 5]),
                        "fused": {**row("fused (ties)", [4, 4, 5, 4]), "weights": {"cs-real-100": 1.0,
                                                                                 "cs-espeak": 0.2}},
                        "scaled": row("control: cs-real-100 alone scaled by 0.5 (scale chosen on validation)",
                                      [4, 4, 5, 5], scale=0.5),
                        "matched": row("control: cs-real-100 alone scaled by 0.506 (the fused expert's step)",
                                       [4, 4, 5, 4], scale=0.506)}}
    md = table(results)
    assert "| control: cs-real-100 alone scaled by 0.5 (scale chosen on validation) |" in md
    assert "validation WER by scale: 0.5: 63.0, 1: 62.0" in md
    assert "own step along the target (0.51; " in md and "orthogonal to it of 0.34 times" in md
    # 17 word errors against 18 and against 17, on the same clips
    assert "Fused: -6% (-2.5 [" in md and "against the target scaled by 0.5; +0% (+0.0 [+0.0, +0.0]) against " \
        "the target scaled by 0.506 (paired, same clips)" in md
    assert searched(results)  # one fixed trial, but the control is a curve
    plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
