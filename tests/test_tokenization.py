"""tokenize_prompt_and_output against the design's pinned Qwen2.5 ids and a slow per-example reference."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from reasontune import tokenize_prompt_and_output
from reasontune.tokenization import pad_and_shift

QWEN_EOS = 151643


def slow_reference(prompt_ids, output_ids, pad_id, max_length=None):
    """Builds the expected tensors one example and one position at a time (seeds README rule 1)."""
    sequences = []
    prompt_lengths = []
    for p, o in zip(prompt_ids, output_ids):
        seq = list(p) + list(o)
        if max_length is not None:
            seq = seq[:max_length]
        sequences.append(seq)
        prompt_lengths.append(min(len(p), len(seq)))
    longest = max(len(s) for s in sequences)
    input_ids, labels, mask = [], [], []
    for seq, plen in zip(sequences, prompt_lengths):
        padded = seq + [pad_id] * (longest - len(seq))
        input_ids.append(padded[:-1])
        labels.append(padded[1:])
        # label j is token j + 1 of the sequence
        mask.append([plen <= j + 1 < len(seq) for j in range(longest - 1)])
    return torch.tensor(input_ids), torch.tensor(labels), torch.tensor(mask)


def test_design_example_pins_qwen_ids(qwen_tokenizer):
    strs = ["Hello, world!", "This is a test.", "This is another test."]
    batch = tokenize_prompt_and_output(strs, strs, qwen_tokenizer)
    assert set(batch) == {"input_ids", "labels", "response_mask"}
    assert batch["input_ids"][0].tolist() == [9707, 11, 1879, 0, 9707, 11, 1879, 0, QWEN_EOS]
    assert batch["labels"][0].tolist() == [11, 1879, 0, 9707, 11, 1879, 0, QWEN_EOS, QWEN_EOS]
    F, T = False, True
    assert batch["response_mask"][0].tolist() == [F, F, F, T, T, T, T, F, F]
    assert batch["response_mask"].dtype == torch.bool
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, 9)


def test_padding_by_several_tokens_keeps_every_real_token(qwen_tokenizer):
    # Seed 000's rule would replace the last real token of row 1 with 0; the rule that stands keeps it.
    prompts = ["Compute 2+2.", "A much longer prompt about a question with many words in it, really.", "Q"]
    outputs = [" <think> 2+2=4 </think> <answer>4</answer>", " ok", " The answer is 17."]
    batch = tokenize_prompt_and_output(prompts, outputs, qwen_tokenizer)
    p_ids = [qwen_tokenizer(p)["input_ids"] for p in prompts]
    o_ids = [qwen_tokenizer(o, add_special_tokens=False)["input_ids"] for o in outputs]
    lengths = [len(p) + len(o) for p, o in zip(p_ids, o_ids)]
    assert max(lengths) - min(lengths) >= 3, "fixture must pad some rows by several tokens"
    ref_in, ref_lab, ref_mask = slow_reference(p_ids, o_ids, QWEN_EOS)
    assert torch.equal(batch["input_ids"], ref_in)
    assert torch.equal(batch["labels"], ref_lab)
    assert torch.equal(batch["response_mask"], ref_mask)
    for i, (p, o) in enumerate(zip(p_ids, o_ids)):
        assert batch["labels"][i][batch["response_mask"][i]].tolist() == o
        assert batch["input_ids"][i, : len(p) + len(o) - 1].tolist() == (p + o)[:-1]


def test_max_length_cuts_response_tail_and_mask_follows(qwen_tokenizer):
    prompts = ["What is 1+1?", "Hi"]
    outputs = [" It is two, clearly and without doubt.", " Hello there friend, how are you doing today?"]
    batch = tokenize_prompt_and_output(prompts, outputs, qwen_tokenizer, max_length=7, return_lengths=True)
    p_ids = [qwen_tokenizer(p)["input_ids"] for p in prompts]
    o_ids = [qwen_tokenizer(o, add_special_tokens=False)["input_ids"] for o in outputs]
    ref_in, ref_lab, ref_mask = slow_reference(p_ids, o_ids, QWEN_EOS, max_length=7)
    assert batch["input_ids"].shape == (2, 6)
    assert torch.equal(batch["input_ids"], ref_in) and torch.equal(batch["labels"], ref_lab)
    assert torch.equal(batch["response_mask"], ref_mask)
    # "What is 1+1?" is 7 tokens: its response is cut away entirely and must be reported.
    assert len(p_ids[0]) == 7
    assert len(p_ids[1]) + len(o_ids[1]) > 7
    assert batch["response_lengths"].tolist() == [0, 7 - len(p_ids[1])]
    assert batch["truncated"].tolist() == [True, True]
    assert not batch["response_mask"][0].any()


def _word_tokenizer(with_bos: bool, with_pad: bool, with_eos: bool = True):
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "a": 4, "b": 5, "c": 6, "d": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = {"unk_token": "[UNK]"}
    if with_eos:
        kwargs["eos_token"] = "</s>"
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    if with_bos:
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def test_bos_tokenizer_adds_bos_to_prompts_only():
    tok = _word_tokenizer(with_bos=True, with_pad=True)
    batch = tokenize_prompt_and_output(["a b", "c"], ["c d", "a b d"], tok)
    # row 0: <s> a b | c d ; row 1: <s> c | a b d  (both 5 tokens, no padding)
    assert batch["input_ids"].tolist() == [[1, 4, 5, 6], [1, 6, 4, 5]]
    assert batch["labels"].tolist() == [[4, 5, 6, 7], [6, 4, 5, 7]]
    assert batch["response_mask"].tolist() == [[False, False, True, True], [False, True, True, True]]


def test_pad_token_preferred_and_eos_fallback():
    with_pad = tokenize_prompt_and_output(["a"], ["b"], _word_tokenizer(False, True))
    assert with_pad["labels"].tolist() == [[5]]
    batch = tokenize_prompt_and_output(["a b c", "a"], ["d", "b"], _word_tokenizer(False, True))
    assert batch["labels"][1].tolist() == [5, 3, 3]  # padded with <pad> = 3
    batch = tokenize_prompt_and_output(["a b c", "a"], ["d", "b"], _word_tokenizer(False, False))
    assert batch["labels"][1].tolist() == [5, 2, 2]  # no pad token: EOS = 2
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        tokenize_prompt_and_output(["a"], ["b"], _word_tokenizer(False, False, with_eos=False))


def test_pad_and_shift_random_batches_match_reference():
    generator = torch.Generator().manual_seed(7)
    for trial in range(20):
        batch_size = int(torch.randint(1, 6, (1,), generator=generator))
        prompts = [torch.randint(10, 99, (int(torch.randint(1, 9, (1,), generator=generator)),), generator=generator).tolist()
                   for _ in range(batch_size)]
        outputs = [torch.randint(10, 99, (int(torch.randint(0, 9, (1,), generator=generator)),), generator=generator).tolist()
                   for _ in range(batch_size)]
        if max(len(p) + len(o) for p, o in zip(prompts, outputs)) < 2:
            continue
        max_length = None if trial % 2 else int(torch.randint(2, 12, (1,), generator=generator))
        got = pad_and_shift(prompts, outputs, pad_token_id=3, max_length=max_length)
        ref_in, ref_lab, ref_mask = slow_reference(prompts, outputs, 3, max_length)
        assert torch.equal(got["input_ids"], ref_in) and torch.equal(got["labels"], ref_lab)
        assert torch.equal(got["response_mask"], ref_mask)
        assert got["response_lengths"].tolist() == ref_mask.sum(1).tolist()


def test_argument_errors():
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        pad_and_shift([[1], [2]], [[3]], pad_token_id=0)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        pad_and_shift([[1]], [[3]], pad_token_id=0, max_length=1)
