"""What an export names as its base: the hub id of bundled bases, else the imported directory."""

from __future__ import annotations

import json

from registry.bases import base_reference


def test_bundled_and_imported_bases_resolve_to_something_loadable(tmp_path):
    home = tmp_path / "home"
    assert base_reference("whisper-base", home=home) == "openai/whisper-base"  # bundled, not imported yet
    assert base_reference("whisper-tiny.en", home=home) == "openai/whisper-tiny.en"
    assert base_reference("openai/whisper-large-v2", home=home) == "openai/whisper-large-v2"
    mine = home / "bases" / "my-small"
    mine.mkdir(parents=True)
    (mine / "base.json").write_text(json.dumps({"name": "my-small", "hub_id": ""}))
    assert base_reference("my-small", home=home) == str(mine.resolve())
    (mine / "base.json").write_text(json.dumps({"name": "my-small", "hub_id": "someone/whisper-small-x"}))
    assert base_reference("my-small", home=home) == "someone/whisper-small-x"
