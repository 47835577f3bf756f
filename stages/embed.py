"""Stage 1: embed every image of data.records with the frozen encoder into the HDF5 cache at cache.dir.

    python stages/embed.py --config configs/demo.toml [section.key=value ...] [--overwrite] [--verify]
    torchrun --nproc_per_node N stages/embed.py --config ...   (rank r takes shards i % N == r)
"""
from minivlm import cache
from minivlm.cli import config_from, parser, run
from minivlm.dist import init_distributed
from minivlm.embed import run_embed


def main():
    p = parser(__doc__.splitlines()[0], ["data", "encoder", "cache"])
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with another encoder spec or records")
    p.add_argument("--verify", action="store_true", help="re-read every shard of cache.dir and check it; embed nothing")
    args = p.parse_args()
    cfg = config_from(args)
    if args.verify:
        problems = cache.verify(cfg.cache.dir)
        for line in problems:
            print(f"verify: {line}")
        print(f"verify: {cfg.cache.dir}: " + (f"{len(problems)} problem(s)" if problems else "ok"))
        return not problems
    # Ranks never talk: each takes shards i % world_size == rank, the last to finish writes the manifest.
    run_embed(cfg, init_distributed(process_group=False), overwrite=args.overwrite)


if __name__ == "__main__":
    run(main)
