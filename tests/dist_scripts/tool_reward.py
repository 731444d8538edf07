"""A reward for the tool trainers' end-to-end tests: 1 for a response whose program ran cleanly and that then answered.

``reward(response, ground_truth)`` is ``reasontune grpo --reward tool_reward:reward``. The tiny
tool policy (``tests/tool_policy.py``) writes the call format but not yet the right product, so
r1_zero would give every response 0; this reward differs within groups (some programs fail,
some responses never reach ``<answer>``) and, for expert iteration, marks responses to keep.
"""

import re

_OUTPUT = re.compile(r"<output>\n(.*?)</output>", re.DOTALL)


def reward(response: str, ground_truth: str) -> dict[str, float]:
    outputs = _OUTPUT.findall(response)
    ran = bool(outputs) and not any("Error" in output or output.startswith("[") for output in outputs)
    answered = bool(re.search(r"<answer>[^<]*</answer>\s*$", response))
    value = float(ran and answered)
    return {"format_reward": float(answered), "answer_reward": value, "reward": value}
