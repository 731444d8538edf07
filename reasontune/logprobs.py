"""Per-token log-probabilities and entropy from a causal LM, memory-bounded.

(Placeholder straightforward version; the chunked / fused path replaces it.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Returns the entropy (…) of softmax(logits) over the last axis."""
    log_z = torch.logsumexp(logits.float(), dim=-1)
    probs = torch.exp(logits.float() - log_z.unsqueeze(-1))
    return log_z - (probs * logits.float()).sum(dim=-1)


def get_response_log_probs(model, input_ids, labels, return_token_entropy=False):
    """Returns {"log_probs": (b, s)[, "token_entropy": (b, s)]}."""
    logits = model(input_ids=input_ids).logits.float()
    log_probs = torch.gather(F.log_softmax(logits, dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)
    result = {"log_probs": log_probs}
    if return_token_entropy:
        result["token_entropy"] = compute_entropy(logits)
    return result
