"""The evaluation report: our figures per fold and over folds, beside the published figures of docs/method.md.

The published figures are those of docs/method.md ("Published figures to compare against"); they
are the authors' numbers, not ours, and are always labelled so.
"""

from __future__ import annotations

import base64
from pathlib import Path

PUBLISHED_SOURCE = "vaemo's docs/method.md, \"Published figures to compare against\" (UAR / WAR, %)"
# (method, parameters, {benchmark: (UAR, WAR), None where not reported})
PUBLISHED: list[tuple[str, str, dict[str, tuple[float | None, float | None]]]] = [
    ("HiCMAE-B (released checkpoints)", "about 81M",
     {"crema-d": (84.94, 84.91), "mafw": (42.69, 56.21), "dfew": (None, 75.01)}),
    ("MAE-DFER (video only)", "85M, 50 GFLOPs", {"mafw": (41.62, 54.31), "dfew": (63.41, 74.43)}),
    ("VideoMAE-B pre-trained on VoxCeleb2", "86M, 81 GFLOPs", {"mafw": (40.87, 53.51), "dfew": (63.60, 74.60)}),
    ("MultiMAE-DER", "about 86M", {"crema-d": (79.12, 79.36)}),
    ("CLAIP-Emo (CLIP ViT-L/14 + CLAP, LoRA)", "8M trained", {"mafw": (None, 61.18), "dfew": (None, 80.14)}),
    ("Emotion-LLaMA (zero-shot)", "about 7B", {"dfew": (45.59, 59.37)}),
]
NOTES = {"dfew": "HiCMAE-B's DFEW WAR is the paper's figure", "crema-d": "VAEmo's own figures are not public"}

UNOFFICIAL = " (not the official protocol: not comparable with published figures)"
LISTED = 50  # not-evaluated videos listed in the report; results.json lists all


def published_for(protocol: str) -> list[dict]:
    rows = []
    for method, params, figures in PUBLISHED:
        if protocol in figures:
            uar, war = figures[protocol]
            rows.append({"method": method, "params": params, "uar": uar, "war": war})
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _pm(summary: dict, key: str) -> str:
    return f"{100 * summary[key]:.2f} ± {100 * summary[key + '_std']:.2f}"


def test_set_line(counts: dict, what: str) -> str:
    """``scored 118 of 120 test videos of fold 1 (3 video-only); 2 not evaluated: 1 no_audio_stream, 1 no_face``."""
    line = f"scored {counts['scored']} of {counts['test_videos']} {what}"
    if counts["scored_video_only"]:
        line += f" ({counts['scored_video_only']} video-only)"
    if counts["not_evaluated"]:
        line += f"; {counts['not_evaluated']} not evaluated: " + ", ".join(
            f"{n} {status}" for status, n in counts["reasons"].items()
        )
    return line


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _test_set(test_set: dict) -> list[str]:
    total = test_set_line(test_set["total"], "test videos in all")
    lines = ["## Test set: what was scored", "", f"**{total[0].upper() + total[1:]}.**", ""]
    lines += [f"- {test_set_line(f, 'test videos of fold ' + str(f['fold']))}" for f in test_set["folds"]]
    if test_set["no_fold"]:
        lines.append(f"- {test_set['no_fold']} of those not evaluated are in no fold's test part: they have no clip, "
                     "and neither has their speaker (or the folds are stratified by clip)")
    lines.append("")
    if test_set["manifest"] is None:
        lines += ["The ingest folder has no manifest, so test videos that did not ingest are not counted here; only "
                  "those that did not decode are.", ""]
    missing = test_set["not_evaluated"]
    if missing:
        lines += ["A video is not evaluated when ingest made no clip of it (the status and reason of the ingest "
                  "manifest), when none of its clips decoded at evaluation (not_decodable), or when it was "
                  "ingested without audio and not scored by its video alone (video_only).", "",
                  "| fold | video (relative to the corpus root) | status | reason |", "|---|---|---|---|"]
        lines += [f"| {'-' if e['fold'] is None else e['fold']} | {_cell(e['path'])} | {e['status']} | "
                  f"{_cell(e['reason'])} |" for e in missing[:LISTED]]
        if len(missing) > LISTED:
            lines.append(f"| | ... and {len(missing) - LISTED} more (results.json: test_set.not_evaluated) | | |")
        lines.append("")
    return lines


def markdown(results: dict, embed_figures_from: Path | None = None) -> str:
    """The report; its figures are links to the PNGs beside it, or, read from ``embed_figures_from``, data URIs
    (for a viewer that has the text alone: Prefect's UI)."""
    setup, model, data = results["setup"], results["model"], results["data"]
    rules = results["checkpoint_rules"]
    lines = [
        f"# Evaluation: {setup['protocol']}, {setup['mode']}, {setup['modality']} input",
        "",
        f"- Model: `{model['dir']}` ({model['name']}, {model['encoder_params'] / 1e6:.2f}M encoder parameters used, "
        f"{model['total_params'] / 1e6:.2f}M with the pre-training decoder)",
        f"- Data: `{data['dir']}`: {data['clips']} labelled clips, {data['speakers'] or 'unknown'} speakers, "
        f"classes {', '.join(data['classes'])}",
        f"- Folds: {data['fold_rule']}{'' if data['official_folds'] else UNOFFICIAL}; "
        "validation carved from each fold's training part "
        f"({', '.join(sorted({f['validation_split'] for f in results['folds']}))}), "
        "never from its test part; the test part is scored once, after training",
        "",
        *_test_set(results["test_set"]),
        "## Our results (mean ± std over folds, %)",
        "",
        "| checkpoint rule | UAR | WAR | macro-F1 |",
        "|---|---|---|---|",
    ]
    for rule, text in rules.items():
        mean = results["mean"][rule]
        lines.append(f"| **{rule}**: {text} | {_pm(mean, 'uar')} | {_pm(mean, 'war')} | {_pm(mean, 'macro_f1')} |")
    lines += ["", "### Per fold (%)", "", "| fold | train / val / test clips | best epoch | "
              + " | ".join(f"{rule} UAR | {rule} WAR | {rule} F1" for rule in rules) + " |",
              "|---|---|---|" + "---|" * (3 * len(rules))]
    for fold in results["folds"]:
        sizes = fold["sizes"]
        cells = " | ".join(
            f"{_pct(fold[r]['uar'])} | {_pct(fold[r]['war'])} | {_pct(fold[r]['macro_f1'])}" for r in rules
        )
        lines.append(
            f"| {fold['fold']} | {sizes['train']} / {sizes['val']} / {sizes['test']} | {fold['best_epoch']} | {cells} |"
        )
    lines += ["", "### Recall per class, mean over folds (%)", "", "| class | " + " | ".join(rules) + " |",
              "|---|" + "---|" * len(rules)]
    for name in data["classes"]:
        lines.append(
            f"| {name} | " + " | ".join(_pct(results["mean"][r]["per_class_recall"][name]) for r in rules) + " |"
        )
    chance = 1 / len(data["classes"])
    lines += ["", f"Chance level: UAR {100 * chance:.2f} % ({len(data['classes'])} classes).", ""]

    published = published_for(setup["protocol"])
    lines += [f"## Published figures for {setup['protocol']}: their numbers, not ours", ""]
    if published:
        lines += [f"Copied from {PUBLISHED_SOURCE}. Different models, pre-training data, fine-tuning recipes and "
                  "(often) checkpoint selection on the test fold; shown for scale only.", "",
                  "| method (published) | parameters | UAR | WAR |", "|---|---|---|---|"]
        for row in published:
            uar = "-" if row["uar"] is None else f"{row['uar']:.2f}"
            war = "-" if row["war"] is None else f"{row['war']:.2f}"
            lines.append(f"| {row['method']} | {row['params']} | {uar} | {war} |")
        best = results["mean"]["best_val"]
        lines.append(f"| **ours** ({model['name']}, {setup['mode']}, {setup['modality']}; best_val rule) | "
                     f"{model['encoder_params'] / 1e6:.2f}M | {100 * best['uar']:.2f} | {100 * best['war']:.2f} |")
        if setup["protocol"] in NOTES:
            lines += ["", f"Note: {NOTES[setup['protocol']]}."]
    else:
        lines.append(f"No published figures for {setup['protocol']} ({PUBLISHED_SOURCE} lists none).")
    lines += ["", "## Figures", ""]
    for name, caption in results["figures"].items():
        source = name if embed_figures_from is None else \
            "data:image/png;base64," + base64.b64encode((Path(embed_figures_from) / name).read_bytes()).decode()
        lines.append(f"![{caption}]({source})")
        lines.append("")
    lines.append(f"Fold files (clip ids and source paths relative to the corpus root): `{results['fold_files_dir']}/`.")
    return "\n".join(lines) + "\n"
