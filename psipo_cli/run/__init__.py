"""The run directory: files, checkpoints and what they were trained on, and the console display."""
