"""Does a trained projector help through the sharer's cache, or by adapting the receiver alone?

The projectors see the receiver's own K/V too, so training can teach them to steer the receiver
(its answer format, say) whatever the sharer sends. This runs the same multiple-choice questions
three ways, side by side: the receiver alone, C2C with the sharer's real cache, and the control,
C2C with the same projectors fed a cache of zeros of the sharer's shape (the sharer "says"
nothing). Accuracy of the control near C2C's means the gain is not the sharer's knowledge.

    python bench/refine_control.py --task arc-challenge --limit 50 \
        --sharer qwen2.5-coder-1.5b-instruct --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedattn.evaluation.tasks import multiple_choice
from fedattn.runtime.blocks import SplitModel
from fedattn.runtime.decoding import Decoding, answer_text, stop_rule
from fedattn.runtime.models import load_model
from fedattn.systems.fedrefine.alignment import (
    receiver_prompt,
    same_tokenizer,
    sent_blocks,
    sharer_input,
    sharer_request,
)
from fedattn.systems.fedrefine.caches import SharerCache, cache_dims, read_sharer_cache
from fedattn.systems.fedrefine.config import default_projector_dir
from fedattn.systems.fedrefine.projector import load_projectors
from fedattn.systems.fedrefine.receiver import Contribution, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arc-challenge", choices=multiple_choice.EVALUATION_SETS)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--receiver", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--sharer", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    receiver = load_model(args.receiver, dtype=dtype)
    sharer = load_model(args.sharer, dtype=dtype)
    projectors = load_projectors(default_projector_dir(args.receiver, args.sharer))
    split = SplitModel(receiver.model)
    same = same_tokenizer(receiver.tokenizer, sharer.tokenizer)
    blocks = sent_blocks(cache_dims(receiver.model).blocks, cache_dims(sharer.model).blocks)
    stop = stop_rule(receiver.tokenizer, receiver.model)
    right = {"receiver alone": 0, "C2C": 0, "C2C, sharer cache zeroed": 0}
    seconds = {name: [] for name in right}
    questions = multiple_choice.evaluation_set(args.task)[: args.limit]
    for number, question in enumerate(questions, start=1):
        prompt = receiver_prompt(receiver.tokenizer, multiple_choice.prompt(question))
        request = sharer_request(prompt, receiver.tokenizer, same)
        shared = read_sharer_cache(sharer.model, sharer_input(request, sharer.tokenizer), blocks)
        silent = SharerCache(
            shared.blocks, [k.new_zeros(k.shape) for k in shared.keys], [v.new_zeros(v.shape) for v in shared.values]
        )
        runs = {
            "receiver alone": [],
            "C2C": [Contribution(projectors, shared, request.positions)],
            "C2C, sharer cache zeroed": [Contribution(projectors, silent, request.positions)],
        }
        for name, contributions in runs.items():
            start = time.perf_counter()
            tokens = answer(split, prompt, contributions, Decoding(), stop, args.max_new_tokens).token_ids
            seconds[name].append(time.perf_counter() - start)
            said = answer_text(stop, receiver.tokenizer, tokens)
            right[name] += int(multiple_choice.score(question, said)["accuracy"])
        print(
            f"{number}/{len(questions)}: " + ", ".join(f"{name} {count}" for name, count in right.items()), flush=True
        )
    print(f"\n{args.task}, first {len(questions)} questions, receiver {args.receiver}, sharer {args.sharer}:")
    for name, count in right.items():
        print(f"  {name:26s} accuracy {count / len(questions):.1%}  median {statistics.median(seconds[name]):.2f} s")


if __name__ == "__main__":
    main()
