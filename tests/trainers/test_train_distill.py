"""`whisper-experts distill` on the tiny Whisper: CLSR + cached KD, a LoRA student of per-language teachers,
the LightningCLI example, and a refused teacher."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from trainers.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_distill_clsr.yaml"
TINY_RUN = ["--batch-size", "4", "--lr", "0.01", "--warmup-steps", "0", "--val-max-new-tokens", "4", "--quiet"]


@pytest.fixture(scope="module")
def clsr_run(uk_pt_corpus, tiny_whisper_dir, tmp_path_factory):
    """A 2-step (one epoch) CLSR + KD run: the tiny Whisper teaches itself through a top-8 cache."""
    tmp = tmp_path_factory.mktemp("distill")
    code = main(["distill", "--base", str(tiny_whisper_dir), "--teacher", str(tiny_whisper_dir),
                 "--teacher-cache", str(tmp / "teacher-cache"), "--top-k", "8", "--data", str(uk_pt_corpus),
                 "--languages", "uk,pt", "--kind", "clsr", "--path", "lowrank", "--rank", "2", "--name", "tiny-clsr",
                 "--max-steps", "2", "--max-train", "3", "--registry", str(tmp / "registry"),
                 "--run-dir", str(tmp / "run"), "--test-limit", "1", *TINY_RUN])
    assert code == 0
    return tmp


def test_distill_stores_one_clsr_expert_per_language_with_a_complete_manifest(clsr_run, tiny_whisper_dir):
    from registry.store import Registry
    from trainers.configs import default_precision

    registry = Registry(clsr_run / "registry")
    assert sorted(registry.names()) == ["tiny-clsr-pt", "tiny-clsr-uk"]
    for lang in ("uk", "pt"):
        expert = registry.get(f"tiny-clsr-{lang}")
        m = expert.manifest
        assert m["kind"] == "clsr" and m["languages"] == [lang] and m["base"]["name"] == str(tiny_whisper_dir)
        assert m["hyperparameters"]["path"] == "lowrank" and m["hyperparameters"]["rank"] == 2
        assert m["hyperparameters"]["kd"] == "js" and m["hyperparameters"]["kd_weight"] == 0.5
        assert m["hyperparameters"]["precision"] == default_precision()  # bf16 and float32 train other weights
        assert m["data"]["utterances"] == 3 and m["data"]["trained_with"] == ["uk", "pt"] and m["data"]["hours"] > 0
        assert set(m["metrics"][lang]) == {"validation", "test", "base_test"}
        lineage = m["lineage"]
        assert lineage["method"] == "distillation" and lineage["teacher"]["source"] == "cached"
        teacher = lineage["teacher"]["teachers"][0]
        assert teacher["base"]["fingerprint"] == m["base"]["fingerprint"] and teacher["teaches"] == "other languages"
        assert 0 < lineage["teacher"]["mass_kept"]["mean"] <= 1 and lineage["teacher"]["k"] == 8
        # the one-time teacher pass runs in the precision training would use on this machine, and says so
        assert lineage["teacher"]["precision"] == ("bf16" if default_precision().startswith("bf16") else "32")
        assert all(k.startswith("model.") and (".expert." in k or ".gate." in k) for k in expert.tensors)
        assert any(v.abs().sum() > 0 for k, v in expert.tensors.items() if k.endswith("lora_B"))  # it trained
    report = json.loads((clsr_run / "run" / "report.json").read_text())
    assert report["teacher"]["computed"] == 6 and set(report["best"]) == {"uk", "pt"}


def test_gate_kd_and_per_language_metrics_are_logged_and_checkpoints_hold_experts_only(clsr_run):
    run = clsr_run / "run"
    rows = list(csv.DictReader(open(next(run.glob("logs/*/metrics.csv")))))
    columns = set(rows[0])
    assert {"train_ce", "train_kd", "train_gate", "gate_open", "noise_scale", "val_wer_uk", "val_wer_pt"} <= columns
    assert {"gate_open/enc.0", "gate_open/dec.1", "val_gate_open/enc.0"} <= columns
    assert any(float(r["train_kd"]) > 0 for r in rows if r.get("train_kd"))
    noise = [float(r["noise_scale"]) for r in rows if r.get("noise_scale")]
    assert noise[0] == 0.0 and noise == sorted(noise) and noise[-1] < 5.0
    checkpoint = next(run.glob("logs/version_*/checkpoints/*.ckpt"))  # in its run's own version folder
    state = torch.load(checkpoint, weights_only=False, map_location="cpu")["state_dict"]
    assert state and all(".experts." in k or ".gates." in k for k in state)


def test_a_decoder_only_clsr_student_trains_on_cached_encoder_outputs(uk_pt_corpus, tiny_whisper_dir, tmp_path):
    from registry.store import Registry

    code = main(["distill", "--base", str(tiny_whisper_dir), "--teacher", str(tiny_whisper_dir), "--teacher-cache",
                 str(tmp_path / "teacher-cache"), "--top-k", "4", "--data", str(uk_pt_corpus), "--languages", "uk,pt",
                 "--side", "decoder", "--path", "lowrank", "--rank", "2", "--name", "dec", "--max-steps", "2",
                 "--max-train", "2", "--registry", str(tmp_path / "registry"), "--run-dir", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "encoder-cache"), "--gate-lr", "0.05", "--decoder-lr", "0.002",
                 "--path-dropout", "0", "--gate-warmup", "0.5", "--path-dropout-ramp", "1", "--no-test", *TINY_RUN])
    assert code == 0
    assert sorted(p.suffix for p in (tmp_path / "encoder-cache").iterdir()) == [".done", ".done", ".npy", ".npy"]
    expert = Registry(tmp_path / "registry").get("dec-uk")
    hp = expert.manifest["hyperparameters"]
    assert hp["side"] == "decoder" and hp["encoder_start"] == 0 and hp["layers"] == 2
    assert hp["lr"] == 0.01 and hp["gate_lr"] == 0.05 and hp["path_dropout"] == 0.0 and hp["shared_only_prob"] == 0.2
    assert hp["decoder_lr"] == 0.002 and hp["gate_warmup"] == 0.5 and hp["path_dropout_ramp"] == 1.0
    rows = list(csv.DictReader(open(next((tmp_path / "run").glob("logs/*/metrics.csv")))))
    floors = [float(r["gate_floor"]) for r in rows if r.get("gate_floor")]
    assert floors[0] == 1.0 and floors == sorted(floors, reverse=True)  # held open at step 0, then released
    assert expert.tensors and all(k.startswith("model.decoder.") for k in expert.tensors)


def test_a_clsr_student_with_attention_paths_delta_dropout_and_soft_gates_trains_and_stores_them(
        uk_pt_corpus, tiny_whisper_dir, tmp_path):
    from registry.store import Registry

    code = main(["distill", "--base", str(tiny_whisper_dir), "--data", str(uk_pt_corpus), "--languages", "uk",
                 "--side", "decoder", "--attention", "--path", "lowrank", "--rank", "2", "--name", "att",
                 "--max-steps", "2", "--max-train", "2", "--registry", str(tmp_path / "registry"), "--run-dir",
                 str(tmp_path / "run"), "--cache-dir", str(tmp_path / "encoder-cache"), "--shared-only-prob", "0",
                 "--path-dropout-on", "delta", "--gate-inference", "soft", "--no-test", *TINY_RUN])
    assert code == 0
    expert = Registry(tmp_path / "registry").get("att")
    hp = expert.manifest["hyperparameters"]
    assert hp["attention"] is True and hp["path_dropout_on"] == "delta" and hp["gate_inference"] == "soft"
    trained = {k for k, v in expert.tensors.items() if k.endswith("lora_B") and v.abs().sum() > 0}
    for slot in ("self_attn.q_proj", "self_attn.out_proj", "encoder_attn.q_proj", "fc1"):
        assert f"model.decoder.layers.0.{slot}.expert.lora_B" in trained  # every kind of path learned something
    rows = list(csv.DictReader(open(next((tmp_path / "run").glob("logs/*/metrics.csv")))))
    assert {"gate_open/dec.0", "gate_open/dec.0.self_attn.q_proj", "val_gate_open/dec.1.encoder_attn.out_proj"} \
        <= set(rows[0])


def test_lora_student_learns_from_one_teacher_per_language(uk_pt_corpus, tiny_whisper_dir, tmp_path):
    from registry.bases import load_base
    from registry.store import Registry
    from tests.tiny import random_lora_expert

    base = load_base(str(tiny_whisper_dir), device="cpu")
    registry = Registry(tmp_path / "registry")
    for lang, seed in (("uk", 1), ("pt", 2)):
        registry.add(random_lora_expert(base.model, base, lang, seed), f"{lang}-teacher")
    code = main(["distill", "--base", str(tiny_whisper_dir), "--teachers", "uk-teacher,pt-teacher", "--kind", "lora",
                 "--rank", "2", "--data", str(uk_pt_corpus), "--max-steps", "2", "--max-train", "2",
                 "--registry", str(tmp_path / "registry"), "--run-dir", str(tmp_path / "run"), "--no-test", *TINY_RUN])
    assert code == 0
    student = registry.get("uk-pt-distilled")
    m = student.manifest
    assert m["kind"] == "lora" and m["languages"] == ["uk", "pt"]  # the teachers' languages
    assert [p["expert"] for p in m["lineage"]["parents"]] == ["uk-teacher", "pt-teacher"]
    assert m["lineage"]["teacher"]["source"] == "online" and m["hyperparameters"]["kd"] == "js"
    assert all(k.startswith("model.decoder.") for k in student.tensors)


def test_a_full_student_cut_from_the_base_relearns_its_decoder_from_the_teachers(uk_pt_corpus, tiny_whisper_dir,
                                                                                  tmp_path):
    """distil-whisper's regime: a student with fewer decoder layers, its decoder weights trained against the full
    base plus a teacher expert per language; the result is a task vector of the student, not of the teacher."""
    from inference.language_matrix import expert_applied
    from registry.bases import load_base
    from registry.store import Registry
    from tests.tiny import random_lora_expert

    base = load_base(str(tiny_whisper_dir), device="cpu")
    registry = Registry(tmp_path / "registry")
    for lang, seed in (("uk", 1), ("pt", 2)):
        registry.add(random_lora_expert(base.model, base, lang, seed), f"{lang}-teacher")
    assert main(["base", "shrink", str(tiny_whisper_dir), "--decoder-layers", "1", "--name", "tiny-dec1-kd"]) == 0
    code = main(["distill", "--base", "tiny-dec1-kd", "--teacher-base", str(tiny_whisper_dir),
                 "--teachers", "uk-teacher,pt-teacher", "--teacher-cache", str(tmp_path / "cache"), "--kind", "full",
                 "--data", str(uk_pt_corpus), "--max-steps", "2", "--max-train", "2", "--name", "cut-student",
                 "--registry", str(tmp_path / "registry"), "--run-dir", str(tmp_path / "run"), "--no-test",
                 *TINY_RUN])
    assert code == 0
    expert = registry.get("cut-student")
    m = expert.manifest
    student = load_base("tiny-dec1-kd", device="cpu")
    assert m["kind"] == "task_vector" and m["languages"] == ["uk", "pt"]
    assert m["base"]["fingerprint"] == student.fingerprint != base.fingerprint
    assert [p["expert"] for p in m["lineage"]["parents"]] == ["uk-teacher", "pt-teacher"]
    assert m["hyperparameters"]["mode"] == "distilled" and m["hyperparameters"]["kd"] == "js"
    assert m["hyperparameters"]["lr"] == 0.01  # TINY_RUN's; the default for a full student is 1e-4
    # the student's whole decoder (one layer) was trained, and nothing else
    layers = {k.split(".")[3] for k in expert.tensors if k.startswith("model.decoder.layers.")}
    assert layers == {"0"} and all(k.startswith("model.decoder.") for k in expert.tensors)
    assert any(t.abs().sum() > 0 for t in expert.tensors.values())
    fc1 = student.model.model.decoder.layers[0].fc1.weight
    before = fc1.detach().clone()
    with expert_applied(student.model, expert):  # applies to the student it was trained from: its weights + delta
        assert torch.allclose(fc1, before + expert.tensors["model.decoder.layers.0.fc1.weight"])
    assert torch.equal(fc1, before)


@pytest.fixture(scope="module")
def larger_whisper_dir(tmp_path_factory):
    """A stand-in for openai/whisper-large-v2 beside the tiny student: wider and deeper (d_model 128, 4 + 4
    layers against 64, 2 + 2), other weights, the same tokenizer and features."""
    from tests.tiny import make_tiny_whisper

    return make_tiny_whisper(tmp_path_factory.mktemp("larger") / "larger-whisper", d_model=128, layers=4, seed=7)


def test_a_larger_whisper_teaches_a_clsr_student_through_the_cache(uk_pt_corpus, tiny_whisper_dir,
                                                                  larger_whisper_dir, tmp_path):
    """DistilWhisper's regime (large-v2 teaching a smaller Whisper), with a tiny stand-in: the cache holds the
    larger model's own top-k log-probabilities, and the student's lineage names the larger model."""
    import numpy as np

    from distill.sources import scoring_fingerprint
    from distill.teacher_cache import TeacherCache, utterance_key
    from registry.bases import load_base
    from registry.store import Registry
    from trainers.language_batches import DistillDataModule

    code = main(["distill", "--base", str(tiny_whisper_dir), "--teacher", str(larger_whisper_dir),
                 "--teacher-cache", str(tmp_path / "cache"), "--top-k", "4", "--data", str(uk_pt_corpus),
                 "--languages", "uk,pt", "--kind", "clsr", "--path", "lowrank", "--rank", "2", "--name", "small",
                 "--max-steps", "2", "--max-train", "2", "--registry", str(tmp_path / "registry"),
                 "--run-dir", str(tmp_path / "run"), "--no-test", *TINY_RUN])
    assert code == 0
    student, teacher = load_base(str(tiny_whisper_dir), device="cpu"), load_base(str(larger_whisper_dir), device="cpu")
    assert teacher.model.config.d_model == 2 * student.model.config.d_model
    expert = Registry(tmp_path / "registry").get("small-uk")
    assert expert.manifest["base"]["fingerprint"] == student.fingerprint
    (taught,) = expert.manifest["lineage"]["teacher"]["teachers"]
    assert taught["base"]["fingerprint"] == teacher.fingerprint != student.fingerprint
    # every training clip's cached row is the larger model's own top-k log-probabilities for that clip
    data = DistillDataModule(str(uk_pt_corpus), student.processor, ["uk", "pt"], 4, max_train=2, progress=False)
    data.setup("fit")
    rows = data.datasets["train"].rows.with_format("numpy", columns=["input_features", "decoder_input_ids"])
    assert len(rows) == 4
    precision = expert.manifest["lineage"]["teacher"]["precision"]
    cache = TeacherCache(tmp_path / "cache", k=4)
    entries = cache.lookup([utterance_key(scoring_fingerprint(teacher.fingerprint, precision), f, i)
                            for f, i in zip(rows["input_features"], rows["decoder_input_ids"])])
    assert all(e is not None for e in entries)
    feats = torch.from_numpy(np.asarray(rows["input_features"][0], dtype=np.float32))[None]
    ids = torch.from_numpy(np.asarray(rows["decoder_input_ids"][0], dtype=np.int64))[None]
    with torch.no_grad():
        want = teacher.model(input_features=feats, decoder_input_ids=ids).logits.float().log_softmax(-1)[0]
    logprobs, indices = cache.read(entries[0])
    top = want.topk(4, dim=-1)
    if precision == "32":  # bf16 scoring may swap near-ties: compare values only then
        assert np.array_equal(indices, top.indices.numpy())
    # The cache stores float16: at |log p| in [8, 16) its spacing is 2**-7, so a stored value is within half of
    # that, 2**-11 relative (near-uniform tiny models score about log(1 / vocab) = -10.9), plus float32 rounding
    # between batched and single scoring; bf16 scoring adds more.
    np.testing.assert_allclose(logprobs, top.values.numpy(), rtol=2.0 ** -11, atol=0.05 if precision != "32" else 1e-4)


def test_a_full_student_needs_teachers():
    from trainers.configs import DistillConfig, default_lr

    with pytest.raises(ValueError, match="a full student is distilled from teachers.*--kind task_vector"):
        DistillConfig(data="d", languages=("uk",), kind="full")
    assert default_lr("full", "full") == default_lr("full", "lowrank") == 1e-4


def test_a_teacher_with_another_tokenizer_is_refused_by_the_command(uk_pt_corpus, tiny_whisper_dir, tmp_path, capsys):
    import shutil

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_whisper_dir, other)
    config = json.loads((other / "preprocessor_config.json").read_text())
    config["chunk_length"] = 20
    (other / "preprocessor_config.json").write_text(json.dumps(config))
    code = main(["distill", "--base", str(tiny_whisper_dir), "--teacher", str(other), "--data", str(uk_pt_corpus),
                 "--languages", "uk", "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert code == 2 and "other-teacher" in capsys.readouterr().err


def test_lightning_example_parses_and_takes_overrides(capsys):
    assert EXAMPLE.read_text().startswith(
        "# whisper-experts distill lightning fit --config examples/lightning_distill_clsr.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "lightning", "fit", "--config", str(EXAMPLE), "--model.path", "lowrank",
              "--trainer.max_epochs", "2", "--print_config"])
    assert exit_.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["path"] == "lowrank" and config["model"]["languages"] == ["uk", "pt", "nl"]
    assert config["model"]["teachers"] == ["uk-teacher", "pt-teacher", "nl-teacher"]
    assert config["trainer"]["max_epochs"] == 2 and config["trainer"]["use_distributed_sampler"] is False
    assert config["expert"]["name"] == "eu3-clsr-kd" and config["checkpoint"]["monitor"] == "val_wer"


def test_lightning_fit_stores_clsr_experts(uk_pt_corpus, tiny_whisper_dir, tmp_path, capsys):
    from registry.store import Registry

    code = main(["distill", "lightning", "fit", "--config", str(EXAMPLE), "--model.base", str(tiny_whisper_dir),
                 "--model.languages", "[uk]", "--model.teachers", "null", "--model.teacher_cache", "null",
                 "--model.path", "lowrank", "--model.rank", "2", "--model.lr", "0.01", "--model.warmup_steps", "0",
                 "--model.val_max_new_tokens", "4", "--data.data", str(uk_pt_corpus), "--data.batch_size", "4",
                 "--data.progress", "false", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--expert.name", "uk-lightning-clsr",
                 "--expert.registry", str(tmp_path / "registry"), "--expert.test", "false",
                 "--model.side", "decoder", "--data.cache_dir", str(tmp_path / "encoder-cache")])
    assert code == 0 and "stored uk-lightning-clsr@1" in capsys.readouterr().out
    expert = Registry(tmp_path / "registry").get("uk-lightning-clsr")
    assert expert.kind == "clsr" and expert.manifest["lineage"]["method"] == "clsr"
    hp = expert.manifest["hyperparameters"]
    assert hp["kd_weight"] == 0.0 and hp["side"] == "decoder"
    assert any((tmp_path / "encoder-cache").glob("enc-*.npy"))  # no teacher: the decoder-only student used the cache


def test_an_interrupted_clsr_run_resumes_from_its_last_checkpoint(uk_pt_corpus, tiny_whisper_dir, tmp_path):
    """distill --resume: the epochs go on from the checkpoint, each language's best epoch and the history carried
    over; a checkpoint of another language set or path rank is refused before any work, naming the file."""
    from trainers.configs import DistillConfig
    from trainers.train_distill import train_distilled

    cfg = DistillConfig(data=str(uk_pt_corpus), languages=("uk", "pt"), base=str(tiny_whisper_dir), kind="clsr",
                        path="lowrank", rank=2, epochs=1, max_train=3, batch_size=4, lr=0.01, warmup_steps=0,
                        val_max_new_tokens=4, progress=False, test=False, run_dir=str(tmp_path / "run"))
    first = train_distilled(cfg)[1]
    last = Path(first["checkpoint"]).parent / "last.ckpt"
    assert last.is_file()
    experts, report = train_distilled(DistillConfig(**{**cfg.__dict__, "epochs": 2, "resume": str(last)}))
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    assert report["history"][0] == first["history"][0]
    assert report["history"][1]["step"] == 2 * report["history"][0]["step"]
    assert {e.manifest["languages"][0] for e in experts} == {"uk", "pt"}
    for change, message in (({"languages": ("uk",)}, "languages: \\['uk', 'pt'\\] there"),
                            ({"rank": 4}, "trained tensors are not this run's")):
        with pytest.raises(ValueError, match=message) as err:
            train_distilled(DistillConfig(**{**cfg.__dict__, **change, "resume": str(last)}))
        assert str(last) in str(err.value)
