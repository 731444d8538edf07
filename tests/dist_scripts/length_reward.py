"""A reward that varies within every group of a random tiny model's responses: for end-to-end GRPO tests.

``reward(response, ground_truth)`` is ``reasontune grpo --reward length_reward:reward``: the share of
the response's characters that are digits or spaces, so two different responses to one question
almost always get different rewards and the advantages are not zero.
"""


def reward(response: str, ground_truth: str) -> dict[str, float]:
    share = sum(c.isdigit() or c.isspace() for c in response) / max(1, len(response))
    return {"format_reward": 1.0, "answer_reward": share, "reward": share}
