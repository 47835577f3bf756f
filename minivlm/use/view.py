"""The view page: a local Gradio app to look at runs (a table, loss curves, held-out captions side by side, and
captioning one's own images with any run). The only module that imports Gradio (the `view` extra).

Design choices:
- Everything it shows comes from minivlm.use.runs (the runs' own files) and every caption from the code
  stages/caption.py and stages/evaluate.py call, so the page says what the commands say.
- Offline and private: analytics off, no share link, a theme of system fonts only (Gradio's default one loads
  web fonts from a CDN), images inlined as data: URIs (nothing served from the run directories), bound to
  127.0.0.1 unless the caller says otherwise.
- A problem with one run (its tower moved, its fingerprint differs, no weights yet) is one line in the page's
  notes and that run's cell; the other runs go on.
- A run still training refreshes the table and curves every few seconds (a gr.Timer, active only then).
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
from PIL import Image, ImageOps

from minivlm.config import check_ranges
from minivlm.formats.records import IMAGE_TAG
from minivlm.use.captioner import SAMPLING_RANGES
from minivlm.use.runs import COLUMNS, Loaded, Run, curves, run_row

EVERY = "every selected run"
REFRESH_S = 5.0
THEME_FONTS = dict(font=("system-ui", "ui-sans-serif", "sans-serif"), font_mono=("ui-monospace", "monospace"))
NUMERIC = ("best_eval_loss", "image_gap", "samples_per_s", "step")


def theme() -> gr.themes.Base:
    return gr.themes.Base(**THEME_FONTS)


def runs_table(runs: list[Run]) -> dict:
    """Dataframe value: numbers as numbers (they sort as numbers), shown as summary.md writes them."""
    rows = [run_row(r) for r in runs]
    data = [[float(row[c]) if c in NUMERIC and row[c] else row[c] if c not in NUMERIC else None for c in COLUMNS]
            for row in rows]
    return {"headers": list(COLUMNS), "data": data, "metadata": {"display_value": [[row[c] for c in COLUMNS]
                                                                                   for row in rows]}}


def loss_frames(runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    points = pd.DataFrame([p for r in runs for p in curves(r)], columns=["run", "kind", "step", "loss"])
    return points[points.kind == "train"], points[points.kind == "eval"]


def thumbnail(path: str, side: int = 160) -> str:
    """An <img> with the image inlined (a data: URI), or a note when it cannot be read."""
    try:
        with Image.open(path) as im:
            buf = io.BytesIO()
            ImageOps.contain(im.convert("RGB"), (side, side)).save(buf, format="PNG")
    except (OSError, ValueError):
        return f"<em>{html.escape(str(path))}: image unavailable</em>"
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(str(path))}" src="data:image/png;base64,{data}">'


def table_html(elem_class: str, head: list[str], rows: list[list[str]]) -> str:
    """An HTML table (cells already escaped), each cell tagged with its column for the tests and for CSS."""
    out = [f'<div style="overflow-x: auto"><table class="{elem_class}" style="table-layout: fixed; width: 100%; '
           f'overflow-wrap: anywhere"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f'<td data-col="{html.escape(h)}">{c}</td>' for h, c in zip(head, row)) + "</tr>"
            for row in rows]
    return "".join(out) + "</tbody></table></div>"


def caption_cell(caption: str | None, error: str | None = None) -> str:
    """A caption as stages/caption.py prints it; an empty one (end of text first) says so."""
    if caption is None:
        return html.escape(f"error: {error}")
    return html.escape(caption) if caption else '<em class="empty">(empty caption)</em>'


def captions_html(columns: dict[str, list[tuple[str, str | None, str | None]]]) -> str:
    """Images down, runs across: each run's (path, caption, error) list as stages/caption.py returns it."""
    if not columns:
        return ""
    keys = [p for p, _, _ in next(iter(columns.values()))]
    rows = [[thumbnail(k.split(" + ")[0], 96) + "<br>" + html.escape(" + ".join(Path(p).name for p in k.split(" + "))),
             *(caption_cell(c, err) for _, c, err in (col[i] for col in columns.values()))]
            for i, k in enumerate(keys)]
    return table_html("captions", ["image", *map(html.escape, columns)], rows)


def notes_text(problems: list[str]) -> str:
    return "\n".join(f"- {html.escape(p)}" for p in dict.fromkeys(problems))


def build_page(runs: list[Run], loaded: Loaded, n_held_out: int = 8) -> gr.Blocks:
    by_name = {r.name: r for r in runs}
    names = list(by_name)
    disabled = [r.caption_disabled() for r in runs if r.caption_disabled()]

    def chosen(selected: list[str]) -> list[Run]:
        return [by_name[n] for n in selected if n in by_name]

    def refresh(selected):
        train, evals = loss_frames(chosen(selected))
        running = any(run_row(r)["status"] == "running" for r in runs)
        return runs_table(runs), train, evals, gr.Timer(active=running)

    def plots(selected):
        return loss_frames(chosen(selected))

    def held_out_grid(selected, n):
        problems, columns, samples = [], [], {}
        for run in chosen(selected):
            try:
                got = loaded.held_out(run, int(n))
            except (ValueError, FileNotFoundError, OSError) as e:
                problems.append(str(e).splitlines()[0])
                continue
            columns.append(run.name)
            for s in got:
                samples.setdefault(s["id"], {**s, "by_run": {}})["by_run"][run.name] = s["generated"]
        rows = [[thumbnail(s["image_paths"][0]) if s["image_paths"] and s["image_paths"][0] else "",
                 html.escape(s["reference"]), *(caption_cell(s["by_run"].get(c, "")) for c in columns)]
                for s in samples.values()]
        picks = [p for s in samples.values() for p in s["image_paths"][:1] if p]
        return (table_html("held-out", ["image", "reference", *map(html.escape, columns)], rows) if columns else "",
                notes_text(disabled + problems), gr.Dropdown(choices=picks))

    def caption(files, pasted, picks, prompt, temperature, top_k, top_p, max_new_tokens, seed, with_run, selected):
        """Yields the side-by-side table as tokens come, run after run (a generator: Gradio streams each)."""
        paths = [str(f) for f in files or []] + ([str(pasted)] if pasted else []) + list(picks or [])
        if not paths:
            yield "", notes_text(disabled + ["no image: upload, paste or pick one, then press Caption"])
            return
        targets = chosen(selected) if with_run == EVERY else chosen([with_run])
        kw = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                  max_new_tokens=int(max_new_tokens), seed=int(seed))
        try:  # the ranges stages/caption.py holds its options to
            check_ranges(SimpleNamespace(**kw), "{}", **SAMPLING_RANGES)
        except ValueError as e:
            yield "", notes_text(disabled + [str(e)])
            return
        problems, columns = [], {}
        keys = [" + ".join(paths)] if prompt.count(IMAGE_TAG) else paths
        for run in targets:
            try:
                for kind, value in loaded.caption_stream(run, paths, prompt or "", **kw):
                    if kind == "partial":  # prompt i is image i (or all of them with <image> tags) while it grows
                        value = [(k, value.get(i, ""), None) for i, k in enumerate(keys)]
                    columns[run.name] = value
                    yield captions_html(columns), notes_text(disabled + problems)
            except (ValueError, FileNotFoundError, OSError) as e:
                problems.append(str(e).splitlines()[0])
                yield captions_html(columns), notes_text(disabled + problems)

    with gr.Blocks(title="minivlm runs", analytics_enabled=False) as page:
        gr.Markdown(f"# minivlm runs\n{len(runs)} run(s). Select runs to compare them in every tab.")
        notes = gr.Markdown(notes_text(disabled), elem_id="notes")
        selected = gr.CheckboxGroup(names, value=names, label="selected runs", elem_id="selected")
        with gr.Tab("Runs"):
            table = gr.Dataframe(runs_table(runs), interactive=False, elem_id="runs-table", label="runs")
            train, evals = loss_frames(runs)
            with gr.Row():
                train_plot = gr.LinePlot(train, x="step", y="loss", color="run", title="train loss",
                                         elem_id="train-loss")
                eval_plot = gr.LinePlot(evals, x="step", y="loss", color="run", title="eval loss", elem_id="eval-loss")
            timer = gr.Timer(REFRESH_S, active=any(run_row(r)["status"] == "running" for r in runs))
        with gr.Tab("Held-out images"):
            n = gr.Slider(1, 64, value=n_held_out, step=1, label="held-out samples")
            show = gr.Button("Show held-out captions", elem_id="show-held-out")
            grid = gr.HTML(elem_id="held-out")
        with gr.Tab("Caption"):
            with gr.Row():
                files = gr.File(file_count="multiple", file_types=["image"], label="upload images", elem_id="upload")
                pasted = gr.Image(sources=["clipboard", "upload"], type="filepath", label="or paste an image")
            picks = gr.Dropdown([], multiselect=True, label="or pick held-out images (show them first)")
            prompt = gr.Textbox(label="prompt: empty for the run's own; k <image> tags take k images together")
            with gr.Row():
                temperature = gr.Number(0.0, minimum=0, label="temperature (0: greedy)")
                top_k = gr.Number(0, minimum=0, precision=0, label="top-k (0: off)")
                top_p = gr.Number(1.0, minimum=0.01, maximum=1, label="top-p")
                max_new_tokens = gr.Number(48, minimum=1, precision=0, label="max new tokens")
                seed = gr.Number(0, minimum=0, precision=0, label="seed")
            with_run = gr.Dropdown([EVERY, *names], value=EVERY, label="caption with")
            button = gr.Button("Caption", variant="primary", elem_id="caption")
            out = gr.HTML(elem_id="captions")
        selected.change(plots, [selected], [train_plot, eval_plot])
        timer.tick(refresh, [selected], [table, train_plot, eval_plot, timer])
        show.click(held_out_grid, [selected, n], [grid, notes, picks])
        button.click(caption, [files, pasted, picks, prompt, temperature, top_k, top_p, max_new_tokens, seed,
                               with_run, selected], [out, notes])
    return page


def serve(runs: list[Run], loaded: Loaded, host: str = "127.0.0.1", port: int = 7860, n_held_out: int = 8) -> None:
    """Build the page and serve it until interrupted; once it listens, print its URL and the ssh tunnel to it."""
    page = build_page(runs, loaded, n_held_out)
    try:
        page.queue().launch(server_name=host, server_port=port, share=False, theme=theme(), quiet=True,
                            show_error=True, inbrowser=False, prevent_thread_lock=True)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise ValueError(f"cannot listen on {host}:{port} ({str(e).splitlines()[0]}); pass another --port or "
                         f"--host") from None
    print(f"view: {len(runs)} run(s) on http://{host}:{port}/", flush=True)
    print(f"view: from another machine: ssh -L {port}:127.0.0.1:{port} <this host>, then open "
          f"http://127.0.0.1:{port}/", flush=True)
    page.block_thread()
