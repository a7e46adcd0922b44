"""Training: DeepSpeed engine set-up, schedules, the step, checkpoints, logging, the run loop."""
