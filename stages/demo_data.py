"""Write the embedded offline demo: synthetic shape images + LLaVA records, a tiny random CLIP tower and a
tiny BPE tokenizer (nothing is downloaded). Idempotent: an identical earlier build is kept.

    python stages/demo_data.py [--out data/demo] [--n_train 4000] [--n_val 256] [--seed 0] [--parquet] [--tars]
                               [--pairs] [--detail]

--parquet also writes the records and images as the Parquet files MiniMind-V, Hugging Face datasets and
img2dataset produce, under <out>/parquet/{minimind,hf,img2dataset}/ (see docs/data.md).
--tars also writes them as img2dataset's WebDataset tars, under <out>/tars/{train,val}/NNNNN.tar.
--pairs also writes the images paired into two-image records (the answer describes the first, then the second)
as <out>/pairs/{train,val}.json and as MiniMind-V and Hugging Face Parquet under <out>/pairs/parquet/.
--detail also writes the detail demo under <out>/detail/ (images, records, encoder, tokenizer): wide and tall
scenes whose caption names a tiny shape at one end, which one square view loses and tiles keep (docs/cache.md, "Tiles").
"""
import argparse
import sys
from pathlib import Path

try:
    import minivlm  # noqa: F401  (installed editable by `make install`)
except ImportError:  # run from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.cli import run
from minivlm.config import SEED, check_ranges
from minivlm.demo.detail import make_detail_demo
from minivlm.demo.folder import make_demo
from minivlm.demo.pairs import write_pairs
from minivlm.demo.parquet import LAYOUTS, write_layout
from minivlm.demo.tars import write_tars


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/demo", help="output directory (default: %(default)s)")
    p.add_argument("--n_train", type=int, default=4000, help="training images (default: %(default)s)")
    p.add_argument("--n_val", type=int, default=256, help="validation images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for images and encoder weights (default: %(default)s)")
    p.add_argument("--parquet", action="store_true", help="also write the demo in each Parquet layout")
    p.add_argument("--tars", action="store_true", help="also write the demo as img2dataset's WebDataset tars "
                                                       "(1,000 samples a tar)")
    p.add_argument("--pairs", action="store_true", help="also write two-image records (data/demo/pairs/)")
    p.add_argument("--detail", action="store_true", help="also write the detail demo (wide and tall scenes with a "
                                                         "tiny detail, for tiles) under <out>/detail/")
    args = p.parse_args()
    check_ranges(args, "--{}", n_train=">= 1", n_val=">= 0", seed=SEED)
    make_demo(Path(args.out), n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    for layout in LAYOUTS if args.parquet else ():
        paths = write_layout(Path(args.out), layout, Path(args.out) / "parquet" / layout, seed=args.seed)
        print(f"demo: {layout} Parquet -> {', '.join(str(p) for ps in paths.values() for p in ps)}")
    if args.pairs:
        paths = write_pairs(Path(args.out), Path(args.out) / "pairs", seed=args.seed)
        print(f"demo: two-image records -> {paths['train']}, {paths['val']} (and Parquet under "
              f"{Path(args.out) / 'pairs' / 'parquet'})")
    if args.tars:
        paths = write_tars(Path(args.out), Path(args.out) / "tars", per_tar=1000, repeat=0)
        print(f"demo: img2dataset tars -> {', '.join(f'{len(ps)} in {ps[0].parent}' for ps in paths.values())}")
    if args.detail:
        make_detail_demo(Path(args.out) / "detail", n_train=args.n_train, n_val=args.n_val, seed=args.seed)


if __name__ == "__main__":
    run(main)
