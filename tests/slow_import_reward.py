"""A reward module that takes 1.5 s to import (tests/test_rewards_batch.py: the load is not charged to an item's timeout)."""

import time

from reasontune.rewards import r1_zero_reward_fn

time.sleep(1.5)


def slow_module_reward_fn(response: str, ground_truth):
    return r1_zero_reward_fn(response, ground_truth)
