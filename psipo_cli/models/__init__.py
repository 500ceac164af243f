"""The base model, its adapter and the reference it gives when disabled (`loading`); attention masks (`masks`)."""
