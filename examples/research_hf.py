"""Research use without a server: extract a vector, steer a Hugging Face model with it,
compose two behaviours, and measure the effect with `vsteer.eval`.

    python examples/research_hf.py --model smollm2-135m-instruct --layer 10
"""

from __future__ import annotations

import argparse

import torch

from vsteer.engine import ActivationInjector, MultiVectorInjector
from vsteer.engine.models import load_hf
from vsteer.eval import format_report, run_sweep
from vsteer.extract import ContrastPairDataset, extract_caa


def generate(model, tok, text: str, n: int = 24) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--prompts", type=int, default=8, help="eval prompts (small: a quick look)")
    args = p.parse_args()
    model, tok = load_hf(args.model)
    sentiment = extract_caa(model, tok, ContrastPairDataset.from_bundled("sentiment"), layers=[args.layer],
                            token_position="mean", progress=False)
    formality = extract_caa(model, tok, ContrastPairDataset.from_bundled("formality"), layers=[args.layer],
                            token_position="mean", progress=False)
    question = "Tell me about your weekend."
    print("unsteered :", generate(model, tok, question))
    with ActivationInjector(model, sentiment, strength=4.0, positions="generated"):
        print("sentiment+:", generate(model, tok, question))
    with MultiVectorInjector(model, [sentiment, formality], {"sentiment": -3.0, "formality": 3.0}) as inj:
        print("composed  :", generate(model, tok, question))
        inj.set_strength("formality", 0.0)  # change a strength at run time
        print("only sent-:", generate(model, tok, question))

    report = run_sweep(args.model, sentiment, behaviour="sentiment", strengths=[-4.0, 0.0, 4.0],
                       n_prompts=args.prompts, max_new_tokens=16, random_baselines=2, hf_model=(model, tok),
                       progress=False, plots=False)
    print(format_report(report))


if __name__ == "__main__":
    main()
