"""The paper's bandit examples (Azar et al. 2023, §5): tabular policies against closed forms."""
