"""Training stages: the registry `finetune` picks from by objective.loss (`stages`), the trainers, the batch
layouts and their self-check, the precomputed reference, and distribution.

Importing this package first checks the TRL/transformers internals psipo relies on (`trl_internals`), before any
module here imports TRL: a missing one is one line at start, not a traceback mid-run. The CLI imports it only in
the commands that train or score, so `psipo --help` stays fast.
"""

from psipo_cli.training.trl_internals import check

check()
