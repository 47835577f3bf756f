"""Stage 1: embed every image of data.records with the frozen encoder into the HDF5 cache at cache.dir.

    python stages/embed.py --config configs/demo.toml [section.key=value ...] [--overwrite]
    python stages/embed.py --config C --verify | --upgrade | --compare OTHER_CACHE
    torchrun --nproc_per_node N stages/embed.py --config ...   (rank r takes shards i % N == r)
"""
import json

from minivlm.cli import config_from, parser, run
from minivlm.dist import init_distributed
from minivlm.embedding import cache, mirror, shard
from minivlm.embedding.embed import run_embed


def main():
    p = parser(__doc__.splitlines()[0], ["data", "encoder", "cache"])
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with another encoder spec or records")
    p.add_argument("--verify", action="store_true", help="re-read every shard and row of cache.dir and check them; "
                                                         "embed nothing")
    p.add_argument("--upgrade", action="store_true", help="rewrite a cache.dir an older minivlm wrote (format 1, or "
                                                          "CRC-32 row checksums) in place as embedding writes it "
                                                          "now: copies bytes, no encoder, resumable")
    p.add_argument("--compare", metavar="CACHE", help="reconstruction error of CACHE's rows against cache.dir's "
                                                      "(e.g. an int8 cache against the float16 one); JSON")
    args = p.parse_args()
    cfg = config_from(args)
    if args.verify:
        problems = cache.verify(mirror.local(cfg))  # a URL cache.dir: its mirror, every shard checked as copied
        for line in problems:
            print(f"verify: {line}")
        print(f"verify: {cfg.cache.dir}: " + (f"{len(problems)} problem(s)" if problems else "ok"))
        return not problems
    if args.upgrade:
        n = cache.upgrade(cfg.cache.dir)
        print(f"upgrade: {cfg.cache.dir}: {n} shard(s) rewritten; the cache is format {cache.FORMAT_VERSION} with "
              f"{shard.CHECKSUM} row checksums")
        return
    if args.compare:
        print(json.dumps(cache.compare(cfg.cache.dir, args.compare), indent=2))
        return
    # Ranks never talk: each takes shards i % world_size == rank, the last to finish writes the manifest.
    run_embed(cfg, init_distributed(process_group=False), overwrite=args.overwrite)


if __name__ == "__main__":
    run(main)
