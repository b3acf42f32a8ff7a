"""Hostile inputs: names with a trailing newline, a mirror's unvalidated tags and mistyped index, mistyped
manifests, LIKE wildcards in queries, verify beside concurrent removes, a corrupt object behind `show`, and
the temporary files of killed writers."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from safetensors.torch import save

from registry.atomic import atomic_write_tagged
from registry.expert_file import MANIFEST_KEY, ExpertFormatError, save_expert
from registry.records import InvalidNameError, validate_name, validate_tag
from registry.store import Registry
from tests.registry.test_store import BASE, make_expert
from trainers.cli import main


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "registry")


def _cli(*argv) -> int:
    return main(["registry", *map(str, argv)])


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ------------------------------------------------------------------------------------------ names and tags
@pytest.mark.parametrize("bad", ["uk\n", "uk\r\n", "best\n"])
def test_a_trailing_newline_is_not_a_valid_name_or_tag(reg, bad, tmp_path, capsys):
    with pytest.raises(InvalidNameError):
        validate_name(bad)
    with pytest.raises(InvalidNameError):
        validate_tag(bad)
    with pytest.raises(InvalidNameError):
        reg.add(make_expert(1), bad)
    with pytest.raises(InvalidNameError):
        reg.add(make_expert(1), "uk", tags=[bad])
    with pytest.raises(InvalidNameError):
        reg.tag("uk", bad)
    assert _cli("--registry", reg.root, "add", save_expert(make_expert(1), tmp_path / "e.safetensors"),
                "--name", bad) == 2
    _one_error_line(capsys, "invalid expert name")
    assert reg.records() == []


def _mirror_with(reg: Registry, tmp_path, edit) -> str:
    """A mirror (in memory, so `list --registry URL` reads it as a mirror) whose index ``edit`` changed."""
    import fsspec

    url = f"memory://hostile-{tmp_path.name}"
    reg.push(url)
    fs = fsspec.filesystem("memory")
    path = f"/hostile-{tmp_path.name}/index.json"
    fs.pipe_file(path, json.dumps(edit(json.loads(fs.cat_file(path)))).encode())
    return url


@pytest.mark.parametrize("tag", ["../x", "latest", "7", "a@b", "Bad Tag", "ok\n"])
def test_pull_refuses_a_mirror_tag_that_is_not_a_valid_tag(reg, tmp_path, tag, capsys):
    reg.add(make_expert(1), "uk")
    url = _mirror_with(reg, tmp_path, lambda i: {**i, "tags": {"uk": {tag: 1}}})
    other = tmp_path / "other"
    assert _cli("--registry", other, "pull", url) == 2
    _one_error_line(capsys, "index.json", "invalid tag", "Nothing was copied")
    assert Registry(other).records() == []


@pytest.mark.parametrize("edit, says", [
    (lambda i: {**i, "format_version": "1"}, "format_version must be a positive integer"),
    (lambda i: {**i, "format_version": None}, "format_version must be a positive integer"),
    (lambda i: i["experts"], "holds a JSON list, not an object"),
    (lambda i: {**i, "experts": None}, "'experts' must be a list"),
    (lambda i: {**i, "tags": []}, "'tags' must be an object"),
    (lambda i: {**i, "experts": [{**i["experts"][0], "version": "1"}]}, "version must be a positive integer"),
    (lambda i: {**i, "experts": [{**i["experts"][0], "size": None}]}, "size must be a non-negative integer"),
    (lambda i: {**i, "experts": [{**i["experts"][0], "name": "../uk"}]}, "invalid expert name"),
    (lambda i: {**i, "experts": [i["experts"][0], i["experts"][0]]}, "listed twice"),
    (lambda i: {**i, "experts": ["uk"]}, "is not an object"),
    (lambda i: {**i, "tags": {"uk": {"best": [1]}}}, "not a listed version"),
])
def test_a_mistyped_mirror_index_is_one_clear_error(reg, tmp_path, capsys, edit, says):
    reg.add(make_expert(1), "uk")
    url = _mirror_with(reg, tmp_path, edit)
    for argv in (("--registry", url, "list"), ("--registry", tmp_path / "other", "pull", url),
                 ("--registry", reg.root, "push", url)):
        assert _cli(*argv) == 2
        _one_error_line(capsys, says, "index.json")
    assert not (tmp_path / "other").exists()


def _expert_with_manifest(path, edit):
    expert = make_expert(1)
    manifest = edit(dict(expert.manifest))
    path.write_bytes(save(expert.tensors, metadata={MANIFEST_KEY: json.dumps(manifest)}))
    return path


@pytest.mark.parametrize("edit, says", [
    (lambda m: {**m, "format_version": "1"}, "format_version must be a positive integer"),
    (lambda m: {**m, "format_version": None}, "format_version must be a positive integer"),
    (lambda m: {**m, "kind": ["lora"]}, "unknown expert kind"),
    (lambda m: {**m, "languages": "uk"}, "languages must be a list"),
    (lambda m: {**m, "base": {**m["base"], "name": {"x": 1}}}, "base name must be a string"),
    (lambda m: {**m, "metrics": [1]}, "metrics must be a JSON object"),
    (lambda m: {**m, "created": 5}, "created must be"),
])
def test_a_mistyped_manifest_is_one_clear_error(reg, tmp_path, capsys, edit, says):
    path = _expert_with_manifest(tmp_path / "bad.safetensors", edit)
    assert _cli("--registry", reg.root, "add", path, "--name", "uk") == 2
    _one_error_line(capsys, says, str(path))
    with pytest.raises(ExpertFormatError, match=says):
        reg.add_bytes(path.read_bytes(), "uk")
    assert reg.records() == []


# ------------------------------------------------------------------------------------------------ queries
def test_percent_and_underscore_are_characters_not_wildcards(reg, capsys):
    for i, base_name in enumerate(["a%c", "abc", "a_c", "axc"]):
        base = {**BASE, "name": base_name, "fingerprint": f"{i}f%_" + "0" * 12}
        reg.add(make_expert(i, base=base), f"e{i}")
    assert [r.name for r in reg.find(base="%")] == []
    assert [r.name for r in reg.find(base="a%c")] == ["e0"] and [r.name for r in reg.find(base="a_c")] == ["e2"]
    assert [r.name for r in reg.find(base="1f%_")] == ["e1"]  # a fingerprint prefix, compared exactly
    assert [r.name for r in reg.find(base="_")] == [] and [r.name for r in reg.find(base="2f")] == ["e2"]
    assert _cli("--registry", reg.root, "list", "--base", "%") == 0
    assert "(none)" in capsys.readouterr().out


def test_find_by_language_matches_whole_codes_only(reg):
    reg.add(make_expert(1, languages=["uk", "ru"]), "uk-ru")
    reg.add(make_expert(2, languages=["u"]), "u")
    reg.add(make_expert(3, languages=["pt"]), "uk-ru")  # a later version serving another language
    assert [r.ref for r in reg.find(language="uk")] == ["uk-ru@1"]
    assert [r.ref for r in reg.find(language="u")] == ["u@1"] and reg.find(language="%") == []
    assert [r.ref for r in reg.find(language="pt")] == ["uk-ru@2"]


# ------------------------------------------------------------------------------------ verify and show
def test_verify_beside_concurrent_removes_reports_no_false_problems(reg, monkeypatch):
    refs = [reg.add(make_expert(i), f"e{i}").ref for i in range(12)]
    other = Registry(reg.root)
    snapshot = Registry.records

    def records_then_a_remove_lands(self):
        taken = snapshot(self)
        for ref in refs[::2]:
            other.remove(ref)  # rows and objects go after verify took its list
        return taken

    monkeypatch.setattr(Registry, "records", records_then_a_remove_lands)
    assert reg.verify() == []
    monkeypatch.undo()
    # And for real: a thread removing while verify runs, round after round.
    for i in range(12, 40):
        reg.add(make_expert(i), f"f{i}")
    done = threading.Event()

    def remove_all():
        for rec in Registry(reg.root).records():
            Registry(reg.root).remove(rec.ref)
        done.set()

    thread = threading.Thread(target=remove_all)
    thread.start()
    while not done.is_set():
        assert not [p for p in reg.verify() if p.serious]
    thread.join()


def test_show_refuses_a_corrupt_object(reg, capsys):
    rec = reg.add(make_expert(1), "uk")
    data = bytearray(rec.path.read_bytes())
    data[20] ^= 0x01  # inside the header's JSON: the manifest shown would be the tampered one
    rec.path.write_bytes(bytes(data))
    assert _cli("--registry", reg.root, "show", "uk") == 2
    _one_error_line(capsys, "corrupt or truncated", str(rec.path))
    with pytest.raises(ExpertFormatError, match="corrupt"):
        reg.read_manifest("uk")


# ------------------------------------------------------------------------------------- temporary files
def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _temp_of(target, pid: int, age: float = 0.0):
    """A temporary file as a writer with ``pid`` on this host names it, ``age`` seconds old."""
    real = atomic_write_tagged.__globals__["_host"]()
    path = target.parent / f".{target.name}.w{pid}-{real}.abc123.tmp"
    path.write_bytes(b"partial")
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_gc_deletes_killed_writers_temporaries_and_says_what_it_keeps(reg, capsys):
    rec = reg.add(make_expert(1), "uk")
    dead = _temp_of(rec.path, _dead_pid())
    alive = _temp_of(rec.path, os.getpid())
    unknown = rec.path.parent / f".{rec.path.name}.zzz.tmp"  # an untagged name: only age can judge it
    unknown.write_bytes(b"partial")
    assert _cli("--registry", reg.root, "gc") == 0
    out = capsys.readouterr().out
    assert not dead.exists() and alive.exists() and unknown.exists()
    assert "removed 1 " in out and "kept 2 temporary file(s)" in out and "registry gc --now" in out
    assert _cli("--registry", reg.root, "gc", "--now") == 0
    assert not alive.exists() and not unknown.exists() and "kept" not in capsys.readouterr().out
    assert reg.verify() == [] and reg.get("uk") is not None


def test_records_read_from_the_index_are_whole_dataclass_records(reg):
    """Listings build records without the dataclass __init__ (for speed): they must be the same records."""
    import dataclasses

    rec = reg.add(make_expert(1, metrics={"uk": {"test": {"wer": 0.25}}}), "uk", tags=["best"])
    fields = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
    rebuilt = type(rec)(**fields)
    assert rebuilt == rec and hash(rebuilt) == hash(rec) and rebuilt.path == rec.path
    assert set(vars(rec)) == set(fields) and rec.tags == ("best",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.name = "x"
