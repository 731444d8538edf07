"""A real pretrained model end to end from its GGUF file: SmolLM2-135M-Instruct (Q4_1), through --model and models get.

The reference every check compares with is transformers' own reading of the GGUF file
(``from_pretrained(..., gguf_file=...)``, every weight dequantised), not reasontune's code.
"""

from __future__ import annotations

import json

import pytest
import torch

from reasontune.cli import main

PROBE = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
ATOL = 1e-5


def dequantised_reference(gguf):
    """Returns (model, tokenizer) as transformers reads the GGUF file, every weight dequantised to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasontune.gguf_models import _dequantising_options

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=str(gguf), dtype=torch.float32,
                                                 **_dequantising_options())
    return model.eval(), AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=str(gguf))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids])).logits[0]


@pytest.mark.slow
def test_models_get_writes_the_dequantised_model_as_a_plain_directory(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, reference_tokenizer = dequantised_reference(smollm2_gguf)
    ids = reference_tokenizer(PROBE).input_ids
    expected = logits(reference, ids)
    del reference

    output = tmp_path / "smollm2"
    assert main(["models", "get", "smollm2-135m-instruct", "--gguf", str(smollm2_gguf), "--output-dir", str(output)]) == 0
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)  # plain transformers, no GGUF
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert tokenizer(PROBE).input_ids == ids
    assert tokenizer.chat_template == reference_tokenizer.chat_template is not None
    torch.testing.assert_close(logits(model.eval(), ids), expected, atol=ATOL, rtol=0)
    source = json.loads((output / "reasontune_source.json").read_text())
    assert source["gguf_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.mark.slow
def test_sft_and_eval_from_the_gguf_file_write_a_final_that_plain_transformers_loads(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = tmp_path / "train.jsonl"
    questions = [("What is 12 + 30?", "42"), ("What is 7 * 6?", "42"), ("What is 50 - 8?", "42"), ("What is 84 / 2?", "42")]
    train.write_text("".join(json.dumps({"prompt": f"User: {q}\nAssistant: <think>",
                                         "response": f" {q[8:-1]} = {a} </think> <answer>{a}</answer>"}) + "\n"
                             for q, a in questions))
    held_out = tmp_path / "val.jsonl"
    held_out.write_text("".join(json.dumps({"question": f"What is {n} + {n}?", "answer": f"#### {2 * n}"}) + "\n"
                                for n in (3, 5, 8, 13)))
    run = tmp_path / "run"
    assert main(["sft", "--model", str(smollm2_gguf), "--train-data", str(train), "--max-steps", "2",
                 "--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "64",
                 "--learning-rate", "1e-5", "--val-data", str(held_out), "--eval-examples", "4",
                 "--eval-max-new-tokens", "4", "--no-eval-before-training", "--no-write-report", "--no-progress",
                 "--output-dir", str(run)]) == 0
    train_lines = [line for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if line["kind"] == "train"]
    assert [line["step"] for line in train_lines] == [1, 2] and all(torch.isfinite(torch.tensor(line["loss"]))
                                                                    for line in train_lines)
    records = (run / "eval" / "step-000002" / "records.jsonl").read_text().splitlines()
    assert len(records) == 4

    final = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert getattr(final.config, "quantization_config", None) is None
    assert final.lm_head.weight is final.model.embed_tokens.weight  # still tied after training and saving
    assert tokenizer.chat_template is not None and tokenizer.eos_token == "<|im_end|>"
    assert torch.isfinite(logits(final.eval(), tokenizer(PROBE).input_ids)).all()
