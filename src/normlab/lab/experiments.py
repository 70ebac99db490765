"""Every experiment of the lab by name: one file per paper (or measurement) under
:mod:`normlab.lab.papers`, each a declarative :class:`~normlab.lab.spec.Experiment`.

Protocols, formulas and the papers' numbers follow the papers (see each module's docstring); where a paper
leaves a choice open, the choice is named in the spec's ``protocol``. Budgets are per suite: ``quick`` fits
the whole lab in a few minutes on 2 CPU cores, ``full`` scales steps, widths and data towards the papers'
setups (CIFAR-10 when ``--data-dir`` holds it).
"""

from __future__ import annotations

from normlab.lab import papers
from normlab.lab.papers import domain_shift, fold, loss_surface, precise_stats, transfer
from normlab.lab.papers.sync_bn import EXPERIMENTS as SYNC_BN
from normlab.lab.papers.bjorck import BJORCK
from normlab.lab.papers.ics import ICS, ICS_SLOW
from normlab.lab.papers.ioffe import IOFFE
from normlab.lab.papers.landscape import LANDSCAPE
from normlab.lab.papers.lp_norm import LP_NORM
from normlab.lab.papers.noisy_bn import NOISY_BN
from normlab.lab.papers.position import POSITION
from normlab.lab.papers.santurkar_lr import SANTURKAR_LR
from normlab.lab.spec import Experiment

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    IOFFE, SANTURKAR_LR, NOISY_BN, ICS, ICS_SLOW, LANDSCAPE, LP_NORM, BJORCK, POSITION,
    *papers.EXPERIMENTS, *SYNC_BN,
    precise_stats.EXPERIMENT, domain_shift.EXPERIMENT, transfer.EXPERIMENT, fold.EXPERIMENT, loss_surface.EXPERIMENT,
)}
