"""Evaluation of a model on a split of its problem's data (the records' losses and accuracies)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..problems import l2_penalty
from ..problems.models import CarriesState


@torch.no_grad()
def evaluate(model: nn.Module, batches, loss_fn: nn.Module, split: str,
             device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy over a split (``"test"`` or ``"train"``), eval mode.

    A model that carries state between batches (:class:`CarriesState`, the character
    model) starts the pass from a zero state and carries it through the windows in order;
    the training state is restored afterwards.
    """
    was_training = model.training
    model.eval()
    saved_state = model.get_state() if isinstance(model, CarriesState) else None
    if saved_state is not None:
        model.reset_state()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for x, y in batches.eval_batches(split):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            n = y.numel()
            total_loss += float(loss_fn(logits, y)) * n
            correct += int((logits.argmax(-1) == y).sum())
            count += n
    finally:
        if saved_state is not None:
            model.set_state(saved_state)
        model.train(was_training)
    return total_loss / count, correct / count


def evaluation_fields(model: nn.Module, batches, loss_fn: nn.Module, device: torch.device,
                      weight_decay: float) -> dict[str, Any]:
    """A record's ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy`` and,
    with L2, ``l2_penalty``."""
    fields: dict[str, Any] = {}
    for split in ("train", "test"):
        loss, accuracy = evaluate(model, batches, loss_fn, split, device)
        fields[f"{split}_loss"] = loss
        fields[f"{split}_accuracy"] = accuracy
    if weight_decay:
        fields["l2_penalty"] = l2_penalty(model, weight_decay)
    return fields
