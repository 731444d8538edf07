"""Environments: what a rollout's turns are, and the sandbox that runs model-written programs."""
