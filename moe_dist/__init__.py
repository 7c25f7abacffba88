"""moe_dist: a PyTorch-native trainer for Mixture-of-Experts transformers."""
