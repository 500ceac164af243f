"""Training stages: the registry `finetune` picks from by objective.loss (`stages`), the trainers, the batch
layouts and their self-check, the precomputed reference, and distribution."""
