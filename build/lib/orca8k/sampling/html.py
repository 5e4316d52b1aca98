"""The HTML view of a report set: per prompt, the decoding configurations side by side (one self-contained page,
no scripts, every text escaped)."""

from __future__ import annotations

import html
import json
from typing import Any

from orca8k.sampling.schema import SamplingReport

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%;table-layout:fixed;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}
th{background:#f3f3f3}
pre{white-space:pre-wrap;word-wrap:break-word;margin:.2em 0;font-size:.9em}
.prompt{background:#eef4ff;padding:.5em;border-left:4px solid #4a7bd0}
.output{border-bottom:1px dashed #ddd;padding-bottom:.3em}
.cut{color:#b00;font-size:.8em}
.params{font-size:.8em;color:#555}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_index(
    reports: dict[str, SamplingReport],
    filenames: dict[str, str],
    summary: dict[str, Any],
    ended: dict[str, list[list[bool]]] | None = None,
) -> str:
    """One HTML page: a summary table (per configuration: outputs, proper-end rate, the effective parameters, the
    report file), then one section per prompt with a column per configuration holding its outputs.

    Args:
        reports: configuration name → report (all for the same prompts, in the same order).
        filenames: configuration name → report file name (linked from the page).
        summary: `orca8k.sampling.report.summarize`'s result (per-configuration counts under `configs`).
        ended: configuration name → per prompt → per output: did it end with `</s>`; outputs that did not are
            marked as cut at `max_new_tokens`.

    Returns:
        The HTML text.

    Raises:
        ValueError: the reports do not hold the same prompts in the same order.
    """
    names = list(reports)
    first = reports[names[0]]
    prompts = [p.prompt for p in first.prompts]
    for name in names[1:]:
        if [p.prompt for p in reports[name].prompts] != prompts:
            raise ValueError(f"render_index: report {name!r} holds other prompts than {names[0]!r}")
    per_config = summary.get("configs", {})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Sampling report: {_esc(first.model_name)} ({_esc(first.date)})</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Sampling report: {_esc(first.model_name)}</h1>",
        f"<p>Date (UTC): {_esc(first.date)} · prompts: {len(prompts)} · outputs: {_esc(summary.get('outputs'))}"
        f" · proper end rate: {_esc(summary.get('proper_end_rate'))}"
        f" · empty outputs: {_esc(summary.get('empty_outputs'))}</p>",
        "<table><tr><th>configuration</th><th>outputs</th><th>proper end rate</th><th>mean new tokens</th>"
        "<th>sampling_params</th><th>report file</th></tr>",
    ]
    for name in names:
        c = per_config.get(name, {})
        params = reports[name].prompts[0].results[0].sampling_params if reports[name].prompts else {}
        parts.append(
            f"<tr><td>{_esc(name)}</td><td>{_esc(c.get('outputs', ''))}</td><td>{_esc(c.get('proper_end_rate', ''))}</td>"
            f"<td>{_esc(c.get('mean_new_tokens', ''))}</td>"
            f"<td><pre class=\"params\">{_esc(json.dumps(params, sort_keys=True))}</pre></td>"
            f"<td><a href=\"{_esc(filenames[name])}\">{_esc(filenames[name])}</a></td></tr>"
        )
    parts.append("</table>")
    for i, prompt in enumerate(prompts):
        parts.append(f'<h2 id="prompt-{i}">Prompt {i + 1}</h2><pre class="prompt">{_esc(prompt)}</pre>')
        parts.append("<table><tr>" + "".join(f"<th>{_esc(n)}</th>" for n in names) + "</tr><tr>")
        for name in names:
            cells = []
            flags = (ended or {}).get(name, [])
            outputs = [o for r in reports[name].prompts[i].results for o in r.outputs]
            for k, output in enumerate(outputs):
                cut = i < len(flags) and k < len(flags[i]) and not flags[i][k]
                mark = '<div class="cut">no &lt;/s&gt; within max_new_tokens</div>' if cut else ""
                cells.append(f'<div class="output"><pre>{_esc(output)}</pre>{mark}</div>')
            parts.append("<td>" + "".join(cells) + "</td>")
        parts.append("</tr></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
