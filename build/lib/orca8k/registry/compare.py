"""Side-by-side HTML of two sampling reports (candidate vs champion) for the same prompts and configurations.

Reads the OA `SamplingReport` files listed in each folder's `summary.json` (`{"files": [...]}`, CONTRACTS §8):
`{"model_name", "date", "args", "prompts": [{"prompt", "results": [{"sampling_config", "sampling_params",
"outputs": [...]}]}]}`. Rows are (prompt, configuration) pairs present in the candidate's report; the champion's
outputs for the same pair sit beside them, or a note when the champion never saw that prompt/configuration.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from orca8k.errors import DataError

Outputs = dict[tuple[str, str], list[str]]


def read_report_folder(folder: Path) -> tuple[dict[str, Any], Outputs]:
    """(summary, {(prompt, sampling_config): outputs}) of a sampling report folder.

    Raises:
        DataError: `summary.json` or a listed report file is missing or malformed (the file and field are named).
    """
    summary_path = folder / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{summary_path}: unreadable ({err})") from None
    files = summary.get("files") if isinstance(summary, dict) else None
    if not isinstance(files, list):
        raise DataError(f"{summary_path}: field files missing or not a list")
    outputs: Outputs = {}
    for name in files:
        path = folder / str(name)
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            for prompt in report["prompts"]:
                for result in prompt["results"]:
                    key = (str(prompt["prompt"]), str(result["sampling_config"]))
                    outputs.setdefault(key, []).extend(str(o) for o in result["outputs"])
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: unreadable ({err})") from None
        except (KeyError, TypeError) as err:
            raise DataError(f"{path}: field {err} missing (expected prompts[].results[].outputs)") from None
    return summary, outputs


def _cell(outputs: list[str] | None, missing: str) -> str:
    if outputs is None:
        return f'<td class="missing">{html.escape(missing)}</td>'
    items = "".join(f"<li><pre>{html.escape(o) if o else '<em>(empty)</em>'}</pre></li>" for o in outputs)
    return f"<td><ol>{items}</ol></td>"


def side_by_side_html(
    candidate: tuple[dict[str, Any], Outputs], candidate_label: str,
    champion: tuple[dict[str, Any], Outputs] | None, champion_label: str, decision: str, reasons: list[str],
) -> tuple[str, dict[str, int]]:
    """Render the page; also return counts `{"rows", "compared", "only_candidate"}`.

    Args:
        candidate: `read_report_folder` of the candidate's sampling reports.
        candidate_label: e.g. `orca8k-demo v3 (candidate)`.
        champion: the champion's, or None when there is no champion (or no report of it).
        champion_label: e.g. `orca8k-demo v2 (champion)` or why there is none.
        decision: the gate's outcome, shown at the top with its reasons.
        reasons: the gate's reason lines.
    """
    cand_summary, cand = candidate
    champ_summary, champ = champion if champion is not None else ({}, {})
    stats = ("outputs", "empty_outputs", "proper_end_rate")
    rows, compared = [], 0
    for prompt, config in sorted(cand, key=lambda k: (k[0], k[1])):
        theirs = champ.get((prompt, config))
        compared += theirs is not None
        rows.append(
            f"<tr><td class='prompt'><pre>{html.escape(prompt)}</pre></td><td>{html.escape(config)}</td>"
            + _cell(cand[(prompt, config)], "")
            + _cell(theirs, "no champion" if champion is None else "champion has no output for this prompt/config")
            + "</tr>"
        )
    head = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(cand_summary.get(k)))}</td>"
        f"<td>{html.escape(str(champ_summary.get(k, '—')))}</td></tr>" for k in stats
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(candidate_label)} vs {html.escape(champion_label)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; text-align: left; }}
pre {{ white-space: pre-wrap; margin: 0; }} .missing {{ color: #888; font-style: italic; }}
.prompt {{ width: 20%; }} ol {{ margin: 0; padding-left: 1.2em; }}
</style></head><body>
<h1>Sampling report: {html.escape(candidate_label)} vs {html.escape(champion_label)}</h1>
<p>Gate decision: <b>{html.escape(decision)}</b></p>
<ul>{''.join(f'<li>{html.escape(r)}</li>' for r in reasons)}</ul>
<table><tr><th></th><th>{html.escape(candidate_label)}</th><th>{html.escape(champion_label)}</th></tr>{head}</table>
<h2>Outputs ({len(rows)} prompt × configuration pairs, {compared} with the champion's outputs)</h2>
<table><tr><th>prompt</th><th>configuration</th><th>{html.escape(candidate_label)}</th>
<th>{html.escape(champion_label)}</th></tr>
{''.join(rows)}
</table></body></html>
"""
    return page, {"rows": len(rows), "compared": compared, "only_candidate": len(rows) - compared}
