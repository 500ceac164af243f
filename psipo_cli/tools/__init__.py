"""Tools that work on a finished (or running) run directory: eval, plots, merge, generate/chat, card, push, label."""
