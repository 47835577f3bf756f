"""Configuration: frozen dataclasses, one per TOML section, composed into `RunConfig`.

Design choices:
- One config file serves every stage (embed, train, caption, sweep); each stage reads the sections
  it needs. Paths are relative to the working directory (the repo root under `make`).
- Overrides are `section.key=value` strings typed by the dataclass field; an unknown section or key
  is a `ValueError` that lists the valid names, so a typo never silently does nothing.
- Values learned at run time (vocab size, cache width) never patch a config in place: callers build a
  new one with `dataclasses.replace`.
- Every numeric field is range-checked in its section's `__post_init__` (`check_ranges`), so a value
  out of range is one line naming the field at load, before any work. A range that depends on what is
  loaded (`encoder.select_layer` against the encoder's depth, `model.pool` and `model.pixel_shuffle`
  against the cache's patch grid: `ModelConfig.image_tokens`) is checked where that is known.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from minivlm.fileio import RunFailed, read_utf8  # noqa: F401  (RunFailed is imported from here by the stages)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TILINGS = ("none", "split", "anyres")  # encoder.tiles (minivlm.embedding.tiles)
CACHE_DTYPES = ("float16", "bfloat16", "int8", "float8_e4m3")  # codecs of stored rows (minivlm.embedding.shard)
SEED = "[0, 4294967296)"  # any 32-bit seed; the sampler multiplies it, and torch's generators take 64 bits


def check_ranges(obj, name: str, **specs: str) -> None:
    """Each numeric attribute of `obj` in its range, else a one-line ValueError naming the first that is not.
    A spec is ">= 1", "> 0" or an interval such as "[0, 1)"; `name` formats the attribute's name for the
    message ("train.{}" for a config field, "--{}" for a stage's option). NaN and infinities are never in range."""
    for attr, spec in specs.items():
        value = getattr(obj, attr)
        if not _in_range(value, spec):
            raise ValueError(f"{name.format(attr)} must be {spec if spec[0] == '>' else 'in ' + spec}, got {value!r}")


def _in_range(value: float, spec: str) -> bool:
    if not math.isfinite(value):
        return False
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)


@dataclass(frozen=True)
class DataConfig:
    """Records: LLaVA JSON/JSONL + an image folder, or Parquet / WebDataset tars with the images inside (a file, a
    directory, a glob or a brace pattern); any of them local or a URL (s3://, gs://, hf://, https://)."""
    records: str = "data/demo/train.json"  # JSON/JSONL, Parquet or tar file; directory, glob, {0..9} brace pattern
    image_root: str = "data/demo/images"  # folder (or URL) JSON records' image paths are relative to (not Parquet, tars)
    val_records: str = ""         # held-out records (same forms); empty -> deterministic hash split by image key
    val_frac: float = 0.05        # share of image keys held out when val_records is empty
    image_column: str = ""        # Parquet column with the image bytes; empty -> image_bytes, image, images, jpg, ...
    text_column: str = ""         # Parquet column with the text; empty -> conversations, messages, caption, text, txt
    storage_options: dict = field(default_factory=dict)  # fsspec options for URLs: {endpoint_url = "...", anon = true}
    max_images: int = 8           # images a sample may hold; samples with more are skipped and counted
    strict: bool = False          # a record that cannot become a sample stops the run (else: skipped and counted)
    max_dropped_frac: float = 0.05  # more records whose images are not in the cache than this: refused (wrong cache)

    def __post_init__(self):
        check_ranges(self, "data.{}", val_frac="[0, 1)", max_images=">= 1", max_dropped_frac="[0, 1]")


@dataclass(frozen=True)
class EncoderConfig:
    """Frozen CLIP-family vision tower and how its features are selected (part of the fingerprint)."""
    name_or_path: str = "data/demo/encoder"
    select_layer: int = -2        # hidden_states index; -2 = penultimate layer (LLaVA)
    keep_cls: bool = False
    pool: int = 1                 # k x k average pooling of the patch grid (1 = none)
    post_layernorm: bool = False  # the tower's post_layernorm on that layer: SigLIP's last_hidden_state (MiniMind-V)
    dtype: str = "auto"           # compute dtype: auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16
    tiles: str = "none"           # none (one row an image), split (Idefics3: grid, global), anyres (LLaVA-NeXT)
    max_tiles: int = 4            # split: tiles along the longest side (at most max_tiles^2 + the global image)
    grid_pinpoints: list = field(default_factory=list)  # anyres: [[h, w], ...] px; [] -> LLaVA-NeXT's, x tower side
    batch_size: int = 64          # images per batch read; the tower runs on at most this many tiles at once
    num_workers: int = 2          # DataLoader workers that decode and preprocess images
    local_files_only: bool = False
    max_image_pixels: int = 89_478_485  # larger images are rejected as decompression bombs

    def __post_init__(self):  # select_layer: checked against the encoder's depth when it loads
        check_ranges(self, "encoder.{}", pool=">= 1", max_tiles=">= 1", batch_size=">= 1", num_workers=">= 0",
                     max_image_pixels=">= 1")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"encoder.dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.tiles not in TILINGS:
            raise ValueError(f"encoder.tiles must be {', '.join(TILINGS[:-1])} or {TILINGS[-1]}, got {self.tiles!r}")
        if not all(isinstance(p, list) and len(p) == 2 and all(type(x) is int and x >= 1 for x in p)
                   for p in self.grid_pinpoints):
            raise ValueError(f"encoder.grid_pinpoints must be a list of [height, width] pairs of pixels >= 1, such as "
                             f"[[128, 64], [64, 128]], got {self.grid_pinpoints!r}")


@dataclass(frozen=True)
class CacheConfig:
    """Where stage 1 writes the embedding cache and stage 2 reads it."""
    dir: str = "cache/demo"
    shard_size: int = 1024        # images per HDF5 shard (the unit of resume and of torchrun work)
    max_failure_frac: float = 0.05  # more failed images than this ends `embed` non-zero
    dtype: str = "float16"        # stored rows: float16, bfloat16, int8 or float8_e4m3 (8-bit: half the bytes)
    mirror: str = ""              # local copy of a URL cache.dir; empty -> cache/mirror/<name>-<hash of the URL>
    storage_options: dict = field(default_factory=dict)  # fsspec options of a URL cache.dir; empty -> data.storage_options

    def __post_init__(self):
        check_ranges(self, "cache.{}", shard_size=">= 1", max_failure_frac="[0, 1]")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"cache.dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class TokenizerConfig:
    """Tokenizer and prompt format (stage 2 and captioning)."""
    name_or_path: str = "data/demo/tokenizer"
    image_token: str = "<|image_pad|>"  # placeholder; added to the tokenizer if missing
    template: str = "auto"        # auto (chat template if the tokenizer has one, else plain), chat, plain
    prompt: str = "Describe this image."  # user turn when a record has no human text
    max_len: int = 512            # text tokens + image tokens; truncation never cuts image tokens

    def __post_init__(self):  # max_len: checked against the image tokens when the cache is known
        check_ranges(self, "tokenizer.{}", max_len=">= 1")
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError(f"tokenizer.template must be auto, chat or plain, got {self.template!r}")


@dataclass(frozen=True)
class ModelConfig:
    """MiniMind-style decoder LM plus the projector from image rows to the LM width.

    The defaults are MiniMind2's (26M); configs/minimind_v1.toml and configs/minimind3.toml hold the
    other generations' values, and a Hugging Face Llama/Qwen3 directory is checked against these fields."""
    dim: int = 512
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int = 2
    head_dim: int = 0             # per-head width; 0 -> dim // n_head
    ffn_dim: int = 0              # SwiGLU (and expert) width; 0 -> multiple_of * ceil(int(8*dim/3) / multiple_of)
    multiple_of: int = 64         # rounding of the default ffn_dim
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    qk_norm: bool = False         # per-head RMSNorm on q and k before RoPE (minimind-3, Qwen3)
    max_seq_len: int = 2048
    dropout: float = 0.0
    use_moe: bool = False
    n_routed_experts: int = 4
    n_experts_per_tok: int = 2
    n_shared_experts: int = 1
    moe_norm_topk: str = "k>1"    # top-k weights rescaled to sum 1: k>1 (MiniMind v1/2), always (minimind-3), never
    aux_loss_alpha: float = 0.1
    projector: str = "mlp"        # linear | mlp2x_gelu (LLaVA-1.5: Linear -> GELU -> Linear) | mlp (LayerNorm first)
    pool: int = 1                 # k x k average of each image's cached patch grid before the projector (1 = none)
    pixel_shuffle: int = 1        # s: each s x s block of (pooled) rows as one row of s*s*D (Idefics3; 1 = none)

    def __post_init__(self):
        check_ranges(self, "model.{}", dim=">= 1", n_layer=">= 1", n_head=">= 1", n_kv_head=">= 1", head_dim=">= 0",
                     ffn_dim=">= 0", multiple_of=">= 1", norm_eps="> 0", rope_theta="> 0", max_seq_len=">= 1",
                     dropout="[0, 1)", n_routed_experts=">= 1", n_experts_per_tok=">= 1", n_shared_experts=">= 0",
                     aux_loss_alpha=">= 0", pool=">= 1", pixel_shuffle=">= 1")
        if not self.head_dim and self.dim % self.n_head:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_head ({self.n_head}), "
                             f"or set model.head_dim")
        if self.head_size % 2:
            raise ValueError(f"model.head_dim (or dim / n_head) must be even for RoPE, got {self.head_size}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.projector not in ("linear", "mlp2x_gelu", "mlp"):
            raise ValueError(f"model.projector must be linear, mlp2x_gelu or mlp, got {self.projector!r}")
        if self.moe_norm_topk not in ("k>1", "always", "never"):
            raise ValueError(f"model.moe_norm_topk must be k>1, always or never, got {self.moe_norm_topk!r}")
        if self.use_moe and not 1 <= self.n_experts_per_tok <= self.n_routed_experts:
            raise ValueError("model.n_experts_per_tok must be between 1 and model.n_routed_experts")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_head

    @property
    def ffn_size(self) -> int:
        """MiniMind's rule when ffn_dim is 0: 1408 for dim 512."""
        return self.ffn_dim or self.multiple_of * -(-int(8 * self.dim / 3) // self.multiple_of)

    @property
    def renorm_topk(self) -> bool:
        """Whether the chosen experts' router weights are rescaled to sum to 1."""
        return self.moe_norm_topk == "always" or self.moe_norm_topk == "k>1" and self.n_experts_per_tok > 1

    def image_tokens(self, rows: int) -> int:
        """T': the placeholders (projected rows) of an image whose cached rows are T = `rows`: its g x g patch grid
        pooled by `pool` and pixel-shuffled by `pixel_shuffle`, (g / pool / pixel_shuffle)^2, plus the CLS row where
        the cache kept it (outside the grid, untouched). Checked here, where the cache's T is known: one line.

        A CLS row with pixel_shuffle > 1 is refused: shuffled rows are s^2 D wide and the CLS row D wide, so one
        projector cannot take both (padding or repeating it would be inventing input), and none of the models that
        shuffle (Idefics3, SmolVLM, nanoVLM, InternVL) feeds a CLS row beside shuffled ones."""
        k, s = self.pool, self.pixel_shuffle
        if k == s == 1:
            return rows
        g, cls = patch_grid(rows)
        if g % (k * s):
            raise ValueError(f"model.pool={k} x model.pixel_shuffle={s} must divide the cache's {g}x{g} patch grid "
                             f"(T={rows}); choose values whose product divides {g}")
        if cls and s > 1:
            raise ValueError(f"model.pixel_shuffle={s} on a cache that keeps the CLS row (encoder.keep_cls=true): a "
                             f"shuffled row is {s * s}x as wide as the CLS row and one projector takes one width; "
                             f"set model.pixel_shuffle=1 or use a cache embedded with encoder.keep_cls=false")
        return (g // (k * s)) ** 2 + cls


def patch_grid(rows: int) -> tuple[int, int]:
    """(g, cls) of an image's T cached rows: a g x g patch grid after `cls` (0 or 1) CLS rows, CLS first as stage 1
    writes it. Unambiguous: g^2 + 1 is a square only for g = 0."""
    g = math.isqrt(rows)
    if rows - g * g not in (0, 1) or not g:
        raise ValueError(f"the cache's T={rows} rows per image are no square patch grid (nor one plus a CLS row); "
                         f"model.pool and model.pixel_shuffle need one: set both to 1")
    return g, rows - g * g


@dataclass(frozen=True)
class TrainConfig:
    """Stage-2 optimisation, evaluation, checkpointing and logging."""
    out_dir: str = "runs"
    run_name: str = "demo"        # the run lives in out_dir/run_name
    seed: int = 1337
    epochs: int = 1
    max_steps: int = 0            # optimizer steps; 0 -> epochs * steps per epoch
    batch_size: int = 32          # per rank, per micro-step; a step reads batch_size x grad_accum x ranks
    grad_accum: int = 1
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # 0 disables clipping
    dtype: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16 (GradScaler)
    compile: bool = False
    freeze_llm: int = 2           # 0 train all, 1 projector + first/last LM layer, 2 projector only
    init_from: str = ""           # an LM or MiniMind-V file (.safetensors/.pth), a HF Llama/Qwen3 dir, or a run dir
    allow_partial_init: bool = False  # let tensors the init_from checkpoint lacks start random
    num_workers: int = 2          # threads reading cache rows ahead of the step (0: read in the loop)
    packing: bool = False         # several samples a row, each attending only to itself (else one a row, padded)
    eval_interval: int = 200      # steps between evals; 0 -> only at the end
    eval_batches: int = 20        # held-out global batches (batch_size x grad_accum x ranks samples) per eval
    save_interval: int = 500      # steps between checkpoints; 0 -> only at the end
    keep_checkpoints: int = 2     # newest checkpoints kept; 0 keeps every one
    resume: str = "auto"          # auto (newest checkpoint if any), never
    log_interval: int = 10        # steps between metrics rows: the only steps that read the GPU's numbers
    deterministic: bool = False   # torch.use_deterministic_algorithms for the run, for exact-resume checks
    wandb: bool = False
    wandb_project: str = "minivlm"

    def __post_init__(self):
        check_ranges(self, "train.{}", seed=SEED, epochs=">= 1", max_steps=">= 0", batch_size=">= 1",
                     grad_accum=">= 1", lr=">= 0", min_lr=">= 0", warmup_steps=">= 0", weight_decay=">= 0",
                     beta1="[0, 1)", beta2="[0, 1)", grad_clip=">= 0", freeze_llm="[0, 2]", num_workers=">= 0",
                     eval_interval=">= 0", eval_batches=">= 1", save_interval=">= 0", keep_checkpoints=">= 0",
                     log_interval=">= 1")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"train.dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"train.resume must be auto or never, got {self.resume!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {f.name: f.default_factory for f in fields(RunConfig)}


def _coerce(value: Any, typ: type, where: str) -> Any:
    """Type-check a TOML value (or parse an override string) against a dataclass field type."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ in (dict, list):  # an inline TOML table {anon = false} or array [[672, 336], [336, 672]]
                return _coerce(tomllib.loads(f"v = {text}")["v"], typ, where)
            if typ is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            return typ(text)
        except (ValueError, tomllib.TOMLDecodeError, KeyError):
            want = {dict: "an inline TOML table such as {anon = true}",
                    list: "a TOML array such as [[128, 64], [64, 128]]"}.get(typ, typ.__name__)
            raise ValueError(f"{where}: expected {want}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool) or typ is not bool and isinstance(value, bool) \
            or not isinstance(value, typ):
        raise ValueError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _field_types(cls) -> dict[str, type]:
    names = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}
    return {f.name: names[f.type] if isinstance(f.type, str) else f.type for f in fields(cls)}


def build_config(tree: dict[str, dict[str, Any]], source: str = "config") -> RunConfig:
    """Build a RunConfig from a {section: {key: value}} tree, rejecting unknown names and wrong types."""
    sections = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            raise ValueError(f"{source}: unknown section [{name}]; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{name}] must be a table of key = value")
        cls = SECTIONS[name]
        types = _field_types(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in types:
                raise ValueError(f"{source}: unknown key {name}.{key}; valid keys of [{name}]: {', '.join(types)}")
            kwargs[key] = _coerce(value, types[key], f"{source}: {name}.{key}")
        sections[name] = cls(**kwargs)
    return RunConfig(**sections)


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, str]]:
    tree: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        tree.setdefault(section, {})[name] = value
    return tree


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; pass --config configs/demo.toml or another TOML file")
    try:
        return tomllib.loads(read_utf8(path))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {})
        if not isinstance(out[section], dict) or not isinstance(values, dict):
            raise ValueError(f"[{section}] must be a table of key = value")
        out[section].update(values)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """TOML file (optional) then `section.key=value` overrides, validated into a RunConfig."""
    tree = load_toml(path) if path else {}
    cfg = build_config(tree, str(path or "defaults"))
    if overrides:
        # Overrides are typed against the fields, then re-validated as a whole.
        over = build_config_strings(parse_overrides(list(overrides)))
        cfg = build_config(merge(to_tree(cfg), over), str(path or "defaults"))
    return cfg


def build_config_strings(tree: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Parse override strings into typed values (errors name the override)."""
    out: dict[str, dict[str, Any]] = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            raise ValueError(f"override: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        types = _field_types(SECTIONS[section])
        for key, value in values.items():
            if key not in types:
                raise ValueError(f"override: unknown key {section}.{key}; valid keys of [{section}]: {', '.join(types)}")
            out.setdefault(section, {})[key] = _coerce(value, types[key], f"override {section}.{key}")
    return out


def to_tree(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def to_toml(tree: dict[str, dict[str, Any]]) -> str:
    """Write a {section: {key: value}} tree (a resolved config) as TOML that load_config reads back."""
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _comments(cls) -> dict[str, str]:
    """The `# ...` comment after each field in the class source: the field's help text."""
    found = re.findall(r"^\s+(\w+): [\w\[\], |]+ = [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M)
    return dict(found)


def describe(sections: list[str]) -> str:
    """`--help` text: every key of the given sections with its default and its comment."""
    lines = ["config keys (set in the TOML file or override as section.key=value):"]
    for name in sections:
        cls = SECTIONS[name]
        notes = _comments(cls)
        lines.append(f"  [{name}]  {(cls.__doc__ or '').strip()}")
        for f in fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            item = f"    {name}.{f.name} = {_toml_value(default)}"
            lines.append(f"{item:<44} {notes[f.name]}" if f.name in notes else item)
    return "\n".join(lines)
