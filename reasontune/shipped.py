"""The names that ship with the package: the rewards and the prompt templates a flag may name without a file.

A module of its own, importing nothing, so that config (resume checks), options (flag checks)
and data (template loading) share the one list without importing each other.
"""

# --reward values that need no module:function (see rollouts.reward_fn_by_name).
REWARD_NAMES = ("auto", "r1_zero", "question_only")
# --prompt-template values read from the package's prompts/ (see data.load_template).
SHIPPED_TEMPLATES = ("r1_zero", "question_only")
