"""How `--method bipo`'s defaults were chosen (issue 22): trained-direction variants
against the mean difference, *in generations*, on a development concept only.

Each variant is trained on the bundled pairs of ``--concept`` (layers 3-10, the token
position the CLI chooses for them), then its direction is applied over the whole band at
each ``--strengths`` (relative, summed over the band, as `vsteer tune` does) to the first
``--prompts`` development prompts; the table gives the concept rate and the perplexity
ratio against the unsteered answers, with each layer's cosine to the mean difference.
Never run it on a held-out concept (eval/data/heldout): that list is scored only by
`bench/recipes.py`.

    flock /work/heavy.lock python bench/bipo_dev.py --concept ocean --variants caa,v1,default,lr01
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from recipes import DEV  # noqa: E402  the development concepts (never the held-out list)

NAME = "bipo_dev"
LAYERS = tuple(range(3, 11))
VARIANTS = {  # BiPOConfig overrides; "caa" is the mean difference
    "caa": None,
    "v1": dict(strength=None, context="plain", init="zero", l2=1.0),  # the first version's defaults
    "size": dict(context="plain"),                                    # served size, bare sentences
    "default": {},                                                    # served size, chat turn
    "lr01": dict(lr=1e-2),
}


def make_set(model, tok, concept: str, variant: str, work: Path):
    """The variant's vector set, trained (or extracted) once and cached in ``work``."""
    from vsteer.engine.formats import load_vector_set
    from vsteer.extract.caa import extract_caa
    from vsteer.extract.output import write_vector_set
    from vsteer.extract.pairs import ContrastPairDataset
    from vsteer.extract.trained import BiPOConfig, train_bipo

    cache = work / f"{concept}-{variant}"
    if (cache / "vsteer.json").is_file():
        return load_vector_set(str(cache))
    pairs = ContrastPairDataset.from_bundled(concept)
    if VARIANTS[variant] is None:
        vs = extract_caa(model, tok, pairs, layers=list(LAYERS), token_position="auto", progress=False)
    else:
        vs = train_bipo(model, tok, pairs, list(LAYERS), BiPOConfig(**VARIANTS[variant]), progress=False)
    write_vector_set(vs, str(cache))
    return vs


def measure(model_path: str, model, tok, concept: str, vs, strengths: list[float], n_prompts: int) -> dict:
    from vsteer.eval import analysis
    from vsteer.eval.execute import Session
    from vsteer.eval.plan import Condition
    from vsteer.eval.recipes import Recipe
    from vsteer.eval.sweep import _setup

    _, beh, probes, prompts = _setup(vs, concept, None, None, None, n_prompts, None)
    conds = [Condition("baseline", "baseline")] + [
        Condition(f"{s:g}", "sweep", Recipe(LAYERS, s, unit="relative")) for s in strengths]
    with Session(model_path, vs.select(list(LAYERS)), [], beh, prompts=prompts, probes=probes, max_new_tokens=40,
                 backend="hf", batch_size=16, hf_model=(model, tok), progress=False) as session:
        session.run(conds, desc=concept)
    for c in conds:
        analysis.score(c, beh, 40)
    base = conds[0].result
    return {c.key: {"behaviour": c.result["behaviour"], "ppl_ratio": c.result["perplexity"] / base["perplexity"],
                    "sample": c.result["texts"][0]} for c in conds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concept", choices=DEV, default="ocean")
    ap.add_argument("--variants", default="caa,v1,default,lr01")
    ap.add_argument("--strengths", default="0.2,0.3")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from vsteer.engine.models import load_hf

    torch.set_num_threads(args.threads)
    path = C.resolve_model(args.model)
    model, tok = load_hf(path)
    work = C.OUT_DIR / NAME
    rows, out = [], {}
    for variant in args.variants.split(","):
        started = time.perf_counter()
        vs = make_set(model, tok, args.concept, variant, work)
        res = measure(path, model, tok, args.concept, vs, [float(s) for s in args.strengths.split(",")], args.prompts)
        training = vs.provenance.get("training") or {}
        cos = list((training.get("cosine_to_caa") or {}).values())
        out[variant] = {"config": VARIANTS[variant], "results": res, "training": training,
                        "seconds": time.perf_counter() - started}
        rows.append([variant, f"{min(cos):.2f}-{max(cos):.2f}" if cos else "1"] +
                    [f"{r['behaviour']:.2f} (x{r['ppl_ratio']:.2f})" for r in res.values()])
        C.log(f"{variant}: {rows[-1][1:]}")
    print(C.table(["variant", "cosine to caa", *next(iter(out.values()))["results"]], rows))
    C.write_result(NAME, {"params": vars(args), "variants": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
