"""Training and evaluation of the default model (used by scripts/train_default_model.py and evaluate.py)."""
