"""Loss functions of the trainers; the registry itself lives in `rewards.loss_registry` (the lowest package with losses)."""

from rewards.loss_registry import LOSS_FAMILIES, get_loss, losses_of, register_loss

__all__ = ["LOSS_FAMILIES", "get_loss", "losses_of", "register_loss"]
