"""Fakes in the exact on-disk layouts of real checkpoints (random weights, tiny sizes) for tests."""
