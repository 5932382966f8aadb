"""``flover generate``: serial decoding of one prompt, streamed."""

from __future__ import annotations

import json
import sys

from flover.commands.common import add_model_flags
from flover.commands.parser import int_list
from flover.launch import open_backend
from flover.loading import resolve
from reference import SamplingParams, check_request, generate


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from one prompt, token by token")
    add_model_flags(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=int_list, help="prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of this request's sampler")
    p.add_argument("--stop-ids", type=int_list, default=[])
    p.add_argument("--json", action="store_true", help='print {"prompt_ids", "tokens", "text"}')
    p.set_defaults(run=run)


def run(args) -> int:
    config, weights, tokenizer = resolve(args.model, args.weights_seed)
    prompt_ids = args.prompt_ids if args.prompt_ids is not None else tokenizer.encode(args.prompt)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    check_request(config, prompt_ids, args.max_new_tokens)
    bad_stop = [t for t in args.stop_ids if not 0 <= t < config.vocab_size]
    if bad_stop:
        raise ValueError(f"stop id {bad_stop[0]} is outside the vocabulary 0..{config.vocab_size - 1}")
    with open_backend(args.backend, config, weights, n_slots=1, tp=args.tp) as backend:
        if backend is None:  # a worker rank of a tensor-parallel job
            return 0
        tokens = generate(backend, prompt_ids, args.max_new_tokens, sampling, args.stop_ids)
        if args.json:
            made = [int(t) for t in tokens]
            print(json.dumps({"prompt_ids": [int(t) for t in prompt_ids], "tokens": made,
                              "text": tokenizer.decode(made)}))  # fmt: skip
            return 0
        for piece in tokenizer.stream(tokens):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0
