"""The Fish Fillets NG reader on a few-clip game tree made here (not the real packages): Lua dialog parsing,
clips without recordings, empty clips skipped and counted, splits by whole level, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from trainers.cli import main
from trainers.corpus.fillets import FilletsError, parse_dialogs, read_dialogs, split_levels
from trainers.corpus.loading import load_corpus

LUA = '''
dialogId("a-m-one", "font_small", "What (strange) ship is that?")
dialogStr("Co je to za divnou loď?")

dialogId("a-v-two", "font_big", "Quote \\"this\\".")
dialogStr(
"Řekl \\"tohle\\" a  odešel.")

dialogId("a-x-unrecorded", "font_big", "Nobody recorded this.")
dialogStr("Nikdo to nenahrál.")

dialogId("a-untranslated", "font_big", "No line follows.")
'''


def test_parse_dialogs_handles_escapes_line_breaks_and_parentheses():
    assert parse_dialogs(LUA) == [("a-m-one", "font_small", "Co je to za divnou loď?"),
                                  ("a-v-two", "font_big", 'Řekl "tohle" a odešel.'),
                                  ("a-x-unrecorded", "font_big", "Nikdo to nenahrál.")]


def _game(root, levels: dict[str, int], empty: str | None = None):
    """A game tree: each level has ``n`` recorded Czech clips (short tones) and one unrecorded line."""
    game = root / "usr/share/games/fillets-ng"
    for level, n in levels.items():
        (game / "script" / level).mkdir(parents=True)
        (game / "sound" / level / "cs").mkdir(parents=True)
        lines = []
        for i in range(n):
            clip = f"{level}-{i}"
            lines.append(f'dialogId("{clip}", "font_small", "gloss")\ndialogStr("Věta číslo {i} v úrovni {level}.")')
            tone = 0.3 * np.sin(np.arange(11025) * (200 + 20 * i) * 2 * np.pi / 22050).astype(np.float32)
            path = game / "sound" / level / "cs" / f"{clip}.ogg"
            if clip == empty:
                path.write_bytes(b"")
            else:
                sf.write(path, tone, 22050, format="OGG", subtype="VORBIS")
        lines.append(f'dialogId("{level}-missing", "font_big", "gloss")\ndialogStr("Chybí.")')
        (game / "script" / level / "dialogs_cs.lua").write_text("\n\n".join(lines), encoding="utf-8")
    return root


def test_read_dialogs_pairs_clips_and_counts_unrecorded_lines(tmp_path):
    _game(tmp_path, {"airplane": 2, "barrel": 3})
    clips, missing = read_dialogs(tmp_path, ["cs"])
    assert [c.clip_id for c in clips] == ["airplane-0", "airplane-1", "barrel-0", "barrel-1", "barrel-2"]
    assert missing == {"cs": 2} and clips[0].speaker == "small" and clips[0].text == "Věta číslo 0 v úrovni airplane."
    with pytest.raises(FilletsError, match="no recorded clips for nl"):
        read_dialogs(tmp_path, ["nl"])
    with pytest.raises(FilletsError, match="holds no Fish Fillets NG data"):
        read_dialogs(tmp_path / "nowhere", ["cs"])


def test_split_levels_is_deterministic_and_near_the_shares():
    counts = {f"level{i:02d}": 10 + (i * 7) % 30 for i in range(78)}
    splits = split_levels(counts)
    assert splits == split_levels(dict(reversed(list(counts.items()))))  # order of input does not matter
    total = sum(counts.values())
    share = {s: sum(n for lvl, n in counts.items() if splits[lvl] == s) / total
             for s in ("train", "validation", "test")}
    assert abs(share["test"] - 0.2) < 0.03 and abs(share["validation"] - 0.1) < 0.03 and share["train"] > 0.64


def test_fetch_from_an_unpacked_copy_writes_a_corpus_split_by_level(tmp_path, capsys):
    _game(tmp_path / "debs", {f"level{i}": 3 for i in range(10)}, empty="level3-1")
    out = tmp_path / "corpus"
    assert main(["corpus", "fetch", "fillets", "--from", str(tmp_path / "debs"), "--languages", "cs",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "30 clips with transcripts; 10 lines without a recording left out" in printed
    assert "skipped 1 unusable file(s)" in printed and "level3-1.ogg" in printed
    corpus = load_corpus(out)
    assert sum(len(corpus[s]) for s in corpus) == 29
    levels = {s: {row["id"].split("-")[1] for row in corpus[s]} for s in corpus}  # ids: sound-<level>-cs-<clip>
    assert not (levels["train"] & levels["test"]) and not (levels["train"] & levels["validation"])
    assert levels["test"] and levels["validation"]
    assert set(corpus["train"]["voice"]) == {"small"} and set(corpus["test"]["language"]) == {"cs"}
