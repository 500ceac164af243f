"""The recipe: one schema for every key (`schema`) and the YAML loader with extends and overrides (`loader`)."""
