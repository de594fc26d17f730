"""Poisoning attacks as pure primitives that the round calls as hooks at the stage each acts on.

====================  ============  ===========================================  ==========================
attack                stage         function(s)                                  parameters (defaults)
====================  ============  ===========================================  ==========================
label flip            data          ``flip_labels`` (once on the training        p = 1.0 (single-label: a
                      (local_train) targets) or ``label_flip_hook`` (per step)   uniform other class;
                                                                                 multi-label: bit inverted)
scaled boost          update        ``boost`` on the flat backbone, then         scale s = 5, clamp ±1000,
                      (after local  ``reestimate_batchnorm`` on the boosted      BN re-estimation on 50
                      train)        model                                        batches
AT2FL                 data/train    ``at2fl_epoch`` (``fgsm`` on the first       CIFAR: ε = 0.03, 10 batches,
                      (local_train) mini-batches, optimizer steps on them,       weight clip ±10; CelebA:
                                    then ``clip_weights``)                       ε = 0.015, 8 batches, ±5
aggregation           cross         ``manipulate`` on what the leader            mode "scale", factor 2.0
manipulation          (leader,      broadcasts, only in rounds it leads          ("noise": relative norm)
                      before
                      redistribute)
bad buffer            exchange /    ``corrupt_buffer`` on the sent vector        mode "nan" | "inf" |
                      intra                                                      "short" | "long", count 1
====================  ============  ===========================================  ==========================

The reference setting has one attacker, the first node of the first group, present every round.
Which nodes attack, from which round and with which parameters is run configuration, read by the
round; nothing here talks MPI or keeps state, and every random draw takes a ``torch.Generator``.
"""

from colnet_mpi.attacks.adversarial import at2fl_epoch, clip_weights, fgsm
from colnet_mpi.attacks.labels import FLIP_KINDS, flip_labels, label_flip_hook
from colnet_mpi.attacks.updates import (
    CORRUPT_MODES,
    MANIPULATE_MODES,
    boost,
    corrupt_buffer,
    manipulate,
    reestimate_batchnorm,
)

__all__ = [
    "CORRUPT_MODES",
    "FLIP_KINDS",
    "MANIPULATE_MODES",
    "at2fl_epoch",
    "boost",
    "clip_weights",
    "corrupt_buffer",
    "fgsm",
    "flip_labels",
    "label_flip_hook",
    "manipulate",
    "reestimate_batchnorm",
]
