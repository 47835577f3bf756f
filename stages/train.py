"""Stage 2: train the VLM from the embedding cache (no vision forward, no image decoding).

    python stages/train.py --config configs/demo.toml [section.key=value ...]
    torchrun --nproc_per_node N stages/train.py --config ...
Resumes from runs/<run_name>/checkpoints when train.resume=auto (the default), also on another number of
ranks with the same global batch (batch_size x grad_accum x ranks). Ctrl-C, SIGTERM or SIGHUP: a checkpoint
at the next step, then exit; a second signal stops at once.
"""
from minivlm.cli import config_from, parser, run
from minivlm.dist import close_distributed, init_distributed
from minivlm.training.trainer import fit


def main():
    args = parser(__doc__.splitlines()[0], ["data", "cache", "encoder", "tokenizer", "model", "train"]).parse_args()
    cfg = config_from(args)
    dist = init_distributed()
    fit(cfg, dist)
    close_distributed()  # on an error, no barrier: the rank exits and torchrun stops the others


if __name__ == "__main__":
    run(main)
