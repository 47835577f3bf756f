"""Export a trained run for transformers: LlavaForConditionalGeneration + its processor, or the LM alone.

    python stages/export.py --run runs/demo --out exports/demo [--lm-only] [--overwrite]
"""
import argparse

from minivlm.cli import run
from minivlm.use.export import export_run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (a finished stages/train.py run)")
    p.add_argument("--out", required=True, help="directory to write (from_pretrained loads it)")
    p.add_argument("--lm-only", action="store_true", help="the LM alone, as a causal-LM directory (Llama, Qwen3 with qk_norm)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a = p.parse_args()
    export_run(a.run, a.out, lm_only=a.lm_only, overwrite=a.overwrite)


if __name__ == "__main__":
    run(main)
