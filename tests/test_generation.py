import pytest
import torch
from conftest import tiny_llama_model

from ds_loradrop.data.tasks import EvalExample
from ds_loradrop.eval.generation import generate_predictions, left_pad, rank_batches

pytestmark = pytest.mark.unit


class DigitTokenizer:
    """Characters '0'-'9' are tokens 10-19; 1 = BOS, 2 = EOS, 0 = pad."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[1] + [10 + int(c) for c in t] for t in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids if int(i) > 2)


def test_left_pad():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rank_batches_sort_by_length_and_give_every_rank_the_same_number():
    lengths = [3, 9, 1, 7, 5]
    assert rank_batches(lengths, 0, 1, 2) == [[1, 3], [4, 0], [2]]
    shares = [rank_batches(lengths, rank, 2, 2) for rank in range(2)]
    assert shares == [[[1, 4], [2]], [[3, 0], []]]
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(5))


def test_batched_left_padded_generation_equals_one_by_one():
    model = tiny_llama_model(num_layers=2)
    model.generation_config.pad_token_id = 0
    examples = [
        EvalExample(str(i), prompt, ["x"]) for i, prompt in enumerate(["1234567", "98", "5555", "3", "24680"])
    ]
    options = {
        "max_new_tokens": 6,
        "num_beams": 1,
        "synced_gpus": False,
        "device": torch.device("cpu"),
        "max_prompt_tokens": 32,
    }
    batched = generate_predictions(model, DigitTokenizer(), examples, batch_size=4, **options)
    single = [
        generate_predictions(model, DigitTokenizer(), [ex], batch_size=1, **options).predictions[0]
        for ex in examples
    ]
    assert batched.predictions == single
    assert all(p for p in batched.predictions)
    # every new token that is not padding counts (EOS included): at least the decoded ones, at most 6 each
    decoded = sum(len(p.split()) for p in batched.predictions)
    assert decoded <= batched.num_generated_tokens <= 6 * len(examples)
    beams = generate_predictions(
        model, DigitTokenizer(), examples, batch_size=4, **{**options, "num_beams": 3}
    )
    assert len(beams.predictions) == len(examples)
