"""The docs say only what is true of this checkout: every relative link, anchor and repository path they name
exists; every `make` target is in the Makefile; every `section.key` is a field of the config dataclasses; every
stage command they show has options its script defines and overrides that load; the performance page and the
README's headline are what bench/report.py writes from the newest results; the disk-cost tables are what the
cache's own codec and tiling compute. Nothing here runs a stage or trains."""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from minivlm.config import SECTIONS, load_config
from minivlm.demo.folder import build_tiny_clip
from minivlm.embedding import shard, tiles

sys.path.insert(0, str(REPO / "bench"))
import report  # noqa: E402

DOCS = sorted([REPO / "README.md", REPO / "cache" / "README.md", *(REPO / "docs").glob("*.md")])
PATH_ROOTS = ("minivlm", "stages", "configs", "bench", "tests", "docs")   # tracked folders a doc may name
NOT_KEYS = {"safetensors", "py", "md", "toml", "json", "jsonl", "h5", "pth"}  # model.safetensors is a file
# Vision towers the shipped configs name, as their config.json on the Hub states them: (image side, patch, width).
TOWERS = {"openai/clip-vit-base-patch16": (224, 16, 768), "openai/clip-vit-base-patch32": (224, 32, 768),
          "openai/clip-vit-large-patch14-336": (336, 14, 1024), "jingyaogong/siglip2-base-p32-256-ve": (256, 32, 768)}
DEMO_TOWER = {k: inspect.signature(build_tiny_clip).parameters[k].default
              for k in ("image_size", "patch_size", "hidden_size")}  # data/demo/encoder, as make demo-data builds it
TOWERS["data/demo/encoder"] = tuple(DEMO_TOWER.values())


# ---- reading markdown ----------------------------------------------------------------------------------------

FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", flags=re.M | re.S)  # a code block, also in a list item


def fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return FENCE.findall(text)


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def code_texts(text: str) -> list[str]:
    """Inline code spans and the lines of shell code blocks (continuation lines joined): where docs name
    commands, paths and keys. Python blocks are left out (`model.generate` there is not a config key)."""
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose(text))]
    lines = []
    for lang, body in fenced(text):
        if lang != "python":
            lines += body.replace("\\\n", " ").splitlines()
    return spans + lines


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(doc.read_text(encoding="utf-8")), flags=re.M)}


def broken_links(doc: Path) -> list[str]:
    """Each relative link of `doc` whose file, or anchor in it, does not exist."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            out.append(f"{doc.name}: {target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            out.append(f"{doc.name}: {target}: no heading #{anchor} there")
    return out


def repo_paths(text: str) -> list[str]:
    """Repository paths named in `text` (patterns with <placeholders>, * or {braces} left out)."""
    out = []
    pattern = rf"(?<![\w./-])((?:{'|'.join(PATH_ROOTS)})/[\w./-]*|Makefile|pyproject\.toml)"
    for m in re.finditer(pattern, text):
        if text[m.end():m.end() + 1] not in ("<", "*", "{"):
            out.append(m.group(1).rstrip("./") or m.group(1))
    return out


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):(?!=)", (REPO / "Makefile").read_text(), flags=re.M))


def config_keys(text: str) -> list[str]:
    """`section.key` names (`train.lr`, `"train.lr" = ...`, `train.lr=3e-4`) in code spans and shell lines."""
    sections = "|".join(SECTIONS)
    return [f"{s}.{k}" for code in code_texts(text)
            for s, k in re.findall(rf"(?<![\w/.-])({sections})\.([a-z_]\w*)", code) if k not in NOT_KEYS]


# ---- commands ------------------------------------------------------------------------------------------------

STAGE_OF_TARGET = {"embed": "embed", "train": "train", "sweep": "sweep", "demo": "train", "caption": "caption",
                   "evaluate": "evaluate", "export": "export"}
TAKES_CONFIG = {"embed", "train", "sweep"}


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(the code it came from, its tokens) for each `make ...`, `python stages/...` or `torchrun ... stages/...`."""
    out = []
    for code in code_texts(text):
        for m in re.finditer(r"(?:^|&&|;|\s)((?:make|python|torchrun|nohup) .*)", code):
            cmd = m.group(1)
            if cmd.startswith("make ") or "stages/" in cmd.split("#")[0]:
                out.append((code, shlex.split(cmd, comments=True)))
                break
    return out


def check_command(tokens: list[str]) -> list[str]:
    """What is wrong with one command: an unknown target, an option its script lacks, overrides that do not load."""
    if tokens[0] == "make":
        target, assigns = tokens[1], dict(t.split("=", 1) for t in tokens[2:] if "=" in t and t[0].isupper())
        if target not in make_targets():
            return [f"make {target}: no such target"]
        stage = STAGE_OF_TARGET.get(target)
        args = shlex.split(assigns.get("ARGS", ""))
        config = assigns.get("CONFIG", "configs/demo.toml")
    else:
        script = next((t for t in tokens if t.startswith("stages/")), None)
        if script is None:
            return []
        stage, args = Path(script).stem, tokens[tokens.index(script) + 1:]
        config = args[args.index("--config") + 1] if "--config" in args else "configs/demo.toml"
    if stage is None:
        return []
    source = (REPO / "stages" / f"{stage}.py").read_text() + (REPO / "minivlm" / "cli.py").read_text()
    errors = [f"stages/{stage}.py has no option {a}" for a in args
              if re.fullmatch(r"--[a-z][\w-]*", a) and a != "--help" and f'"{a}"' not in source]
    overrides = [a for a in args if re.match(rf"({'|'.join(SECTIONS)})\.\w+=", a)]
    if stage in TAKES_CONFIG:
        path = config if (REPO / config).is_file() else None
        if path is None and config.startswith("configs/"):
            return errors + [f"{config}: no such config"]
        try:
            load_config(REPO / path if path else None, overrides)
        except (ValueError, FileNotFoundError) as e:
            errors.append(f"overrides {overrides} do not load: {e}")
    elif overrides:
        errors.append(f"stages/{stage}.py takes no section.key=value overrides: {overrides}")
    return errors


# ---- the docs as committed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_exists(doc):
    assert broken_links(doc) == []


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text("See [a](other.md#real-heading), [b](missing.md), [c](other.md#no-such-heading) and "
                   "[d](https://example.com/x).\n\n```\n[not a link](nowhere.md)\n```\n")
    assert broken_links(doc) == ["doc.md: missing.md: no such file", "doc.md: other.md#no-such-heading: no heading "
                                 "#no-such-heading there"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_named_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [p for p in repo_paths(text) if not (REPO / p).exists()]
    assert missing == []


def test_path_check_sees_a_missing_file_and_skips_patterns():
    assert repo_paths("see `stages/nope.py`, `bench/results/<host>-<date>.json` and `stages/*.py`.") == ["stages/nope.py"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_target_and_config_key_named_exists(doc):
    text = doc.read_text(encoding="utf-8")
    targets = {t for code in code_texts(text) for t in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", code)}
    assert targets - make_targets() == set()
    fields = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert sorted(set(config_keys(text)) - fields) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_stage_command_has_real_options_and_overrides_that_load(doc):
    problems = [f"{code}: {e}" for code, tokens in commands(doc.read_text(encoding="utf-8"))
                for e in check_command(tokens)]
    assert problems == []


def test_command_check_sees_a_wrong_key_option_target_and_value():
    bad = ['make embed ARGS="data.recrods=x.json"', "python stages/train.py --config configs/demo.toml --resum",
           "make trian", "python stages/train.py --config configs/demo.toml train.lr=fast",
           "python stages/embed.py --config configs/nope.toml"]
    for cmd in bad:
        assert check_command(shlex.split(cmd)), cmd
    assert check_command(shlex.split('make train CONFIG=configs/minimind_v.toml ARGS="train.lr=1e-3 '
                                     'data.storage_options=\'{anon = true}\'"')) == []


def test_no_benchmark_figure_in_prose_outside_the_generated_page():
    """Bench figures reach the docs only through bench/report.py: a ratio like 1.5x or a rate like 300 rows/s
    anywhere else would go stale."""
    figure = re.compile(r"\d\.\d+ ?[×x]\b|\d[\d,.]* ?(?:rows|samples|images|img|tiles|tokens|MB|GB)/s")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = report.HEADLINE
    texts = {"README.md": readme.split(start)[0] + readme.split(end)[1]}
    texts |= {d.name: d.read_text(encoding="utf-8") for d in DOCS if d.name not in ("README.md", "performance.md")}
    assert {name: figure.findall(t) for name, t in texts.items() if figure.findall(t)} == {}


# ---- the performance page ------------------------------------------------------------------------------------

def differences(results: Path, page: str, readme: str) -> list[str]:
    """Which of the committed page and README block differ from what bench/report.py writes from `results`."""
    _, want_page, want_readme = report.expected(results, readme)
    return [name for name, got, want in (("docs/performance.md", page, want_page), ("README.md", readme, want_readme))
            if got != want]


def committed() -> tuple[str, str]:
    return report.PAGE.read_text(encoding="utf-8"), report.README.read_text(encoding="utf-8")


def test_performance_page_and_readme_headline_are_what_report_writes():
    assert differences(report.RESULTS, *committed()) == [], "run `python bench/report.py` and commit its output"


def test_the_check_fails_when_the_results_or_the_page_change_alone(tmp_path):
    page, readme = committed()
    newest = report.newest()
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    res = json.loads(newest.read_text())
    for w in res["workloads"].values():
        w["p1_cached_vs_live"] += 0.5
    (results / newest.name).write_text(json.dumps(res))
    assert differences(results, page, readme) == ["docs/performance.md", "README.md"]  # new results, old docs
    assert differences(report.RESULTS, page.replace("| P2 train", "| P2 training", 1), readme) == ["docs/performance.md"]
    start = readme.index(report.HEADLINE[0])
    assert differences(report.RESULTS, page, readme[:start] + readme[start:].replace("**", "*", 1)) == ["README.md"]


def test_report_reads_the_newest_non_smoke_results_by_their_date(tmp_path):
    res = json.loads(report.newest().read_text())
    for name, date, mode in (("a-2026-12-09.json", "2026-12-09T08:00:00", "full"),
                             ("z-2026-12-01.json", "2026-12-01T08:00:00", "full"),   # the last name, an older date
                             ("b-2026-12-10-smoke.json", "2026-12-10T08:00:00", "smoke"),
                             ("c-2026-12-11-cuda-smoke.json", "2026-12-11T08:00:00", "smoke-cuda")):
        (tmp_path / name).write_text(json.dumps({**res, "date": date, "mode": mode}))
    assert report.newest(tmp_path).name == "a-2026-12-09.json"


def test_the_page_shows_each_ratio_of_its_results_file_and_names_what_an_older_file_lacks():
    path = report.newest()
    res = json.loads(path.read_text())
    page = report.render(path, res)
    assert path.name in page and res["date"] in page and res["machine"]["cpu"] in page
    for w in res["workloads"].values():
        for key in ("p1_cached_vs_live", "p2_cached_vs_ram", "p3_read_vs_raw_reopened", "p4_embed_vs_encoder"):
            assert f"{w[key]:.2f}" in page, key
        assert ("CONTENDED" if w["noise"]["contended"] else "idle") in page
    old = REPO / "bench" / "results" / "vm-2026-11-28.json"  # before codecs, Parquet/tar P4, P6, P7, tiles
    missing = report.render(old, json.loads(old.read_text())).split("Not in this file: ")[1].split(". (")[0]
    assert "codec: the 8-bit cache" in missing and "P7 packed ÷ padded" in missing and "P4 the same: tiles" in missing


# ---- disk cost ------------------------------------------------------------------------------------------------

def table_after(doc: Path, heading: str) -> list[list[str]]:
    """The cells of the first table under `heading`, header and rule left out."""
    section = doc.read_text(encoding="utf-8").split(f"\n{heading}\n", 1)[1]
    rows = re.search(r"^\|.*?(?=\n\n|\Z)", section, flags=re.M | re.S).group(0).splitlines()
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


def row_bytes(cfg, dtype: str) -> int:
    """One untiled image's bytes in the cache: its row as the codec stores it, plus its checksum."""
    side, patch, width = TOWERS[cfg.encoder.name_or_path]
    tokens = (side // patch // cfg.encoder.pool) ** 2 + cfg.encoder.keep_cls
    return shard.Codec(dtype, tokens, width).row_bytes + shard.CHECKSUMS[shard.CHECKSUM][0].itemsize


def test_disk_cost_table_is_what_the_codec_computes_for_each_shipped_config():
    rows = table_after(REPO / "docs" / "cache.md", "## Disk cost per config")
    named = set()
    for config_cell, _, shape, f16, int8, million in rows:
        configs = re.findall(r"`(configs/[\w.]+\.toml)`", config_cell)
        overrides = re.findall(r"`(encoder\.\w+=[^`]+)`", config_cell)
        named.update(configs)
        for config in configs:
            cfg = load_config(REPO / config, overrides)
            side, patch, width = TOWERS[cfg.encoder.name_or_path]
            tokens = (side // patch // cfg.encoder.pool) ** 2 + cfg.encoder.keep_cls
            assert (cfg.cache.dtype, shape) == ("float16", f"{tokens} × {width}"), config
            assert (f16, int8) == (f"{row_bytes(cfg, 'float16'):,}", f"{row_bytes(cfg, 'int8'):,}"), config
            assert million == f"{row_bytes(cfg, 'float16') * 1e6 / 1e9:,.1f} GB", config
    assert named == {f"configs/{p.name}" for p in (REPO / "configs").glob("*.toml")}


def test_tile_cost_table_is_what_the_tiling_cuts_on_the_detail_demo_scenes():
    side = DEMO_TOWER["image_size"]
    tile_index = 5 * 4  # shard.py: `tiles` (m, 5) int32, written where images are tiled
    cost = re.findall(r"^\| `(encoder\.tiles=[^`]+)` \| (\d+) \| ([\d,]+) \|$",
                      (REPO / "docs" / "cache.md").read_text(encoding="utf-8"), flags=re.M)  # the detail demo's rows
    assert len(cost) == 4
    for setting, rows, size in cost:
        cfg = load_config(REPO / "configs" / "demo.toml", setting.split())
        tiling = tiles.tiling_of(cfg.encoder, side, Image.BICUBIC)
        for w, h in ((256, 96), (96, 256)):  # minivlm.demo.detail's wide and tall scenes
            assert len(tiles.cut(Image.new("RGB", (w, h)), tiling)[0]) == int(rows), setting
        tiled = cfg.encoder.tiles != "none"
        assert size == f"{int(rows) * row_bytes(cfg, 'float16') + tile_index * tiled:,}", setting
