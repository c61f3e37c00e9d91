"""What the zoo's LightningModules read from their datamodule, written down once.

A new dataset for an existing model is a datamodule that has these members (a class need not inherit anything: the
protocols are checked by structure, so a user's own ``LightningDataModule`` qualifies when it has them):

============================  =====================================  =====================================
protocol                      members                                read by
============================  =====================================  =====================================
:class:`ClassificationData`   ``num_classes``                        the configs (the head's outputs)
:class:`AugmentedEvaluation`  ``tta_augment(images, generator)``     ``ImageClassifier(tta=True)``, "augment"
:class:`TrainImages`          ``train_images(n)``                    networks fitted to the data (AirbenchNet)
:class:`TokenData`            ``vocab_size``; batches ``(inputs,     ``LanguageModel``
                              targets, bptt)`` with ``IGNORE_INDEX``
                              where a target is padding
============================  =====================================  =====================================

:func:`require` turns a missing member into one message naming the datamodule, what needs the member and the fix.
:func:`rank_world` is the (global rank, world size) a datamodule shards by, ``(0, 1)`` outside a Trainer.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

#: Target value the language models' loss and perplexity skip (padding at the end of the last evaluation stream);
#: ``torch.nn.functional.cross_entropy``'s default ``ignore_index``.
IGNORE_INDEX = -100


@runtime_checkable
class ClassificationData(Protocol):
    """A labelled image dataset."""

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""


@runtime_checkable
class AugmentedEvaluation(Protocol):
    """A dataset that lends its training augmentation to test-time augmentation."""

    def tta_augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The training augmentation applied to a batch of normalised evaluation images, on their device, with draws
        from ``generator`` (so TTA repeats)."""


@runtime_checkable
class TrainImages(Protocol):
    """A dataset whose training images a network can be fitted to before training."""

    def train_images(self, n: int | None = None) -> Tensor:
        """The first ``n`` (all when ``None``) normalised, unaugmented training images, ``(n, C, H, W)``."""


@runtime_checkable
class TokenData(Protocol):
    """A tokenised corpus for language modelling.

    Its loaders yield ``(inputs, targets, bptt)`` with ``(time, batch)`` token ids, ``bptt`` the nominal window
    length the window was drawn around, and ``IGNORE_INDEX`` for targets that are padding.
    """

    @property
    def vocab_size(self) -> int:
        """Number of distinct token ids."""


P = TypeVar("P")


def require(datamodule: Any, protocol: type[P], needed_by: str, fix: str) -> P:
    """``datamodule`` itself when it has ``protocol``'s members, else a ``MisconfigurationException`` that says so.

    Args:
        datamodule: the Trainer's datamodule (``None`` when the Trainer was given bare dataloaders).
        protocol: one of this module's protocols.
        needed_by: what reads the members, e.g. ``"ImageClassifier(tta=True)"``.
        fix: the other ways out, e.g. ``"or set model.init_args.tta=false"``.
    """
    missing = [name for name in _members(protocol) if not _has(datamodule, name)]
    if datamodule is not None and not missing:
        return datamodule
    members = ", ".join(missing)
    where = ("bare dataloaders (no datamodule)" if datamodule is None
             else f"the Trainer's datamodule ({type(datamodule).__name__})")
    raise MisconfigurationException(
        f"{needed_by} reads {members} from the datamodule ({protocol.__name__} in datamodules/contract.py), but "
        f"{where} has none. Use a zoo datamodule that has it (or add it to yours), {fix}."
    )


def _members(protocol: type) -> list[str]:
    return [name for name in vars(protocol) if not name.startswith("_")]


def _has(obj: Any, name: str) -> bool:
    # looked up without evaluating properties: a datamodule's ``num_classes`` or ``vocab_size`` is only known after
    # ``setup``, and raises before it
    return obj is not None and (name in getattr(obj, "__dict__", {}) or any(name in vars(k) for k in type(obj).__mro__))


def rank_world(trainer: Any) -> tuple[int, int]:
    """``(global rank, world size)`` of ``trainer``; ``(0, 1)`` without one (a datamodule used on its own)."""
    return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
