"""OCNOpt inside PyTorch Lightning's automatic optimization (DIGITS, a small tanh MLP).

Lightning calls ``optimizer.step(closure)`` with a closure that runs ``training_step``,
``zero_grad`` and ``backward()`` (the torch closure convention); OCNOpt calls it a second time,
under ``no_grad``, for the feedback pass, and cuts that call short once the last layer is
updated (before the loss and the backward). Run: ``python examples/lightning_digits.py``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ocnopt import OCNOpt


class DigitsMLP(L.LightningModule):
    def __init__(self, lr: float = 0.02, curvature: str = "ekfac") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> OCNOpt:
        kw = {"momentum": 0.9} if self.hparams.curvature in ("identity", "kfac", "ekfac") else {}
        return OCNOpt(self.net, lr=self.hparams.lr, curvature=self.hparams.curvature,
                      feedback=True, **kw)


def digits_loaders(batch_size: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:1500], perm[1500:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size),
            DataLoader(TensorDataset(x[val], y[val]), batch_size=512))


def main() -> None:
    torch.manual_seed(0)
    train, val = digits_loaders()
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False,
                        enable_checkpointing=False)
    trainer.fit(DigitsMLP(), train, val)
    print(f"validation accuracy: {trainer.callback_metrics['val_acc']:.4f}")


if __name__ == "__main__":
    main()
