"""psipo: preference fine-tuning with DPO, IPO and ΨPO (Azar et al. 2023, arXiv 2310.12036)."""

__version__ = "0.1.0"
