"""Fine-tuning machinery used by the `train` stage: arguments, schedule, trainer, callbacks, checkpoints, launch."""
