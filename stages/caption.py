"""Caption images with a trained run, computing features live with the run's own encoder.

    python stages/caption.py --run runs/demo --image a.jpg [--image b.png ...] [--prompt "..."]

Each image gets its own caption; a --prompt with k <image> tags takes k --image arguments, in order, and
gives one caption of them together (e.g. --prompt "<image> <image> Describe both images.").
"""
import argparse
import sys

from minivlm.cli import run
from minivlm.config import check_ranges
from minivlm.dist import init_distributed
from minivlm.use.captioner import SAMPLING_RANGES, caption_files, load_run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory with model.safetensors + model_config.json")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several: batched, or "
                                                                    "one per <image> tag of --prompt)")
    p.add_argument("--prompt", default="", help="user prompt (default: the run's tokenizer.prompt); "
                                                      "<image> tags place the images")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    check_ranges(a, "--{}", **SAMPLING_RANGES)
    cap = load_run(a.run, init_distributed(process_group=False).device)
    results = caption_files(cap, a.image, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
                            temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    for path, caption, error in results:
        if error:
            print(f"error: {error}", file=sys.stderr)
        else:
            print(f"{path}: {caption}")
    return all(error is None for _, _, error in results)


if __name__ == "__main__":
    run(main)
