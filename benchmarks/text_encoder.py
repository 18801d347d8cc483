"""The CLIP text tower on the state prompt ensembles, open_clip's ``encode_text`` (every one of the 77
columns) against ``clipfusion.encoders.clip.encode_tokens`` (the columns up to the last end token), in one
run, interleaved: time per category (both states' ensembles, as a detector's first image of a category
pays it), and the largest difference of the normalised embeddings.  ``ViT-B-16-plus-240`` (both presets'
CLIP) with random weights, float32, on the CPU.

Usage: python benchmarks/text_encoder.py [--repeats 3] [--category "printed circuit board"]
                                         [--out benchmarks/results/text_encoder.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from clipfusion.config import ClipConfig, RuntimeConfig
from clipfusion.encoders.clip import encode_tokens
from clipfusion.encoders.loading import load_open_clip
from clipfusion.prompts import state_ensembles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--category", default="printed circuit board")
    parser.add_argument("--out", default="benchmarks/results/text_encoder.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import interleaved_median_ms, write_results

    parts = load_open_clip(ClipConfig(pretrained=None), RuntimeConfig("cpu", "float32"))
    model = parts.model
    tokens = [parts.tokenizer(prompts) for prompts in state_ensembles(args.category)]

    def every_column() -> list[torch.Tensor]:
        return [F.normalize(model.encode_text(t).float(), dim=-1) for t in tokens]

    def up_to_the_end_token() -> list[torch.Tensor]:
        return [F.normalize(encode_tokens(model, t).float(), dim=-1) for t in tokens]

    with torch.inference_mode():
        times = interleaved_median_ms({"every_column": every_column, "up_to_the_end_token": up_to_the_end_token},
                                      args.repeats)
        difference = max(float((a - b).abs().max()) for a, b in zip(every_column(), up_to_the_end_token(),
                                                                     strict=True))
    row = {"prompts": sum(len(t) for t in tokens), "columns_used": int(max(t.argmax(-1).max() for t in tokens)) + 1,
           "every_column_ms": times["every_column"], "up_to_the_end_token_ms": times["up_to_the_end_token"],
           "speedup": round(times["every_column"] / times["up_to_the_end_token"], 2),
           "max_embedding_difference": difference}
    print(row)
    write_results(args.out, [row], category=args.category,
                  command=" ".join(["python", "benchmarks/text_encoder.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
