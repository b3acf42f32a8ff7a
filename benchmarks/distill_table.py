"""The markdown table of ``benchmarks/distill_wer.py`` (``<out>/<name>.md``) from its results JSON: one line per
row, then the paired lines between twin rows (KD against its student without KD, soft inference gates against
hard, soft validation against hard), and the commands that produced it."""

from __future__ import annotations

from pathlib import Path


def split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def table(results: dict) -> str:
    from inference.confidence import format_change, format_ci
    from inference.evaluation import paired_comparison

    setup, rows = results["setup"], results["rows"]
    langs, untouched = split(setup["languages"]), split(setup["untouched"])
    base = rows.get("base", {})
    head = (["model"] + [f"{x} WER % [95% CI] (CER %)" for x in langs] + [f"{x} vs LoRA [paired 95% CI]" for x in langs]
            + [f"{u} WER % (untouched)" for u in untouched]
            + ["max WER loss on untouched", "params stored / language", "params active / token", "train min"])
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def rate(r):
        return f"{format_ci(r['wer'], r.get('wer_ci95'))} ({100 * r['cer']:.1f})" if r else "–"

    def versus(a, b):
        """B against A on the same utterances: relative change and the paired interval (points)."""
        if not (a and b and a.get("utterances") and b.get("utterances")):
            return "–"
        return format_change(next(iter(paired_comparison(a, b).values()), None)) or "–"

    def gains(a: str, b: str) -> str:
        """Row B against row A, per student language."""
        return ", ".join(f"{l} {versus(rows[a]['test'].get(l), rows[b]['test'].get(l))}" for l in langs)

    def count(n):
        return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"

    for key in ["base", "lora"] + sorted(k for k in rows if k.startswith("clsr")) + ["teacher"]:
        if key not in rows:
            continue
        r = rows[key]
        loss = [100 * (r["untouched"][u]["wer"] - base["untouched"][u]["wer"]) for u in untouched
                if u in r["untouched"] and u in base.get("untouched", {})]
        stored = sorted(set(r["stored"].values()))
        cells = ([r["label"]] + [rate(r["test"].get(l)) for l in langs]
                 + [versus(rows.get("lora", {}).get("test", {}).get(l), r["test"].get(l)) if key != "lora" else "–"
                    for l in langs]
                 + [f"{100 * r['untouched'][u]['wer']:.1f}" if u in r["untouched"] else "–" for u in untouched]
                 + [f"{max(loss):+.1f}" if loss else "–", " / ".join(count(n) for n in stored) or "0",
                    count(r["active"]), "reused" if r["minutes"] is None and key == "teacher" else
                    ("–" if r["minutes"] is None else f"{r['minutes']:.1f}")])
        md.append("| " + " | ".join(cells) + " |")
    # each KD row's own record of its plain twin; older rows: the KD marker sits before the variant suffix
    twins = {key: rows[key].get("without_kd", key.replace("-kd", "", 1))
             for key in sorted(k for k in rows if k.startswith("clsr") and "-kd" in k)}
    for key, plain in twins.items():
        if plain in rows:
            if list(twins.values()).count(plain) > 1:  # several KD rows of one twin: each line names its own
                md.append(f"\nKD's effect: {rows[key]['label']} against {rows[plain]['label']} (paired): "
                          f"{gains(plain, key)}")
            else:
                md.append(f"\nKD's effect on {rows[plain]['label']} (CLSR + KD against it, paired): "
                          f"{gains(plain, key)}")
    for key in sorted(k for k in rows if k.startswith("clsr")):
        if key.endswith("-soft") and (hard := key.removesuffix("-soft")) in rows:
            # the same student: soft inference gates against hard
            md.append(f"\nSoft gates at inference on {rows[hard]['label']} (against its hard gates, paired): "
                      f"{gains(hard, key)}")
        elif key.endswith("-vsoft") and (twin := key.removesuffix("-vsoft") + "-soft") in rows:
            # the best epoch by soft-gate validation against the same recipe's best epoch by hard gates, decoded soft
            md.append(f"\nSoft gates in validation too: {rows[key]['label']} against {rows[twin]['label']} "
                      f"(paired): {gains(twin, key)}")
    if pl := results.get("pseudo_labels"):  # the students' corpus of held_out_teacher.py --pseudo-label
        md.append(f"\nOf the students' {pl['training_clips']} {pl['language']} training clips, {pl['labeled']} carry "
                  f"human transcripts and {pl['pseudo_labelled']} the transcripts of `{Path(pl['teacher']).name}` "
                  f"(greedy, from the audio alone; {100 * pl['pseudo_label_wer']:.1f}% WER against the human ones).")
    trained = {key: r["precision"] for key, r in rows.items() if r.get("precision")}
    if trained:  # bf16 autocast and float32 train different weights: a table says which it holds
        kinds = set(trained.values())
        said = (f"at {kinds.pop()} precision (Lightning)" if len(kinds) == 1 else "at mixed precisions (Lightning): "
                + "; ".join(f"{rows[k]['label']}: {p}" for k, p in trained.items()))
        older = sum(k not in ("base", "teacher") for k in rows) - len(trained)
        md.append(f"\nStudents trained {said}" + (f"; {older} older row(s) do not record theirs." if older else "."))
    n = next((r["n"] for r in base.get("test", {}).values()), "?")
    md.append(f"\nTest WER/CER % (normalized) on {n} held-out utterances per language; students trained on "
              f"{setup['max_train']} utterances per language ({setup['base']}, {setup['epochs']} epochs max, best "
              f"validation epoch" + (f"; teachers on {setup['teacher_base']}" if setup.get("teacher_base") else "")
              + f"). Commands: {'; '.join(f'`{c}`' for c in setup['commands'])}\n")
    return "\n".join(md)
