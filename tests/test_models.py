import os

import pytest
import torch

from ds_loradrop.data.tasks import get_task
from ds_loradrop.models.loading import (
    TinyLlamaSpec,
    ensure_tiny_llama,
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    tiny_llama_cache_key,
)

pytestmark = pytest.mark.unit


def test_tiny_llama_preset_is_a_normal_checkpoint_cached_by_content(e2e_dir, tmp_path):
    spec = TinyLlamaSpec(vocab_size=512, tokenizer_examples=500)
    text = get_task("e2e").training_text(e2e_dir, max_examples=spec.tokenizer_examples)
    path = ensure_tiny_llama(text, str(tmp_path), spec)
    assert sorted(f for f in os.listdir(path)) == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )
    weights_time = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert ensure_tiny_llama(text, str(tmp_path), spec) == path  # built once
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == weights_time
    assert tiny_llama_cache_key(spec, text[:-1]) != os.path.basename(path)  # other text, other entry
    assert not [name for name in os.listdir(os.path.dirname(path)) if name.startswith(".building-")]

    # Loaded through the same path as a real checkpoint
    config = load_model_config(path)
    assert config.num_hidden_layers == 8 and config.model_type == "llama"
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token_id == 3 and tokenizer.eos_token_id == 2 and len(tokenizer) == 512
    ids = tokenizer("Meaning representation: name[The Eagle]")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Meaning representation: name[The Eagle]"
    model = load_causal_lm(path, torch.float32)
    again = load_causal_lm(path, torch.float32)
    torch.testing.assert_close(
        model.model.layers[3].self_attn.q_proj.weight, again.model.layers[3].self_attn.q_proj.weight
    )
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 512)


def test_model_directory_without_config_or_weights(tmp_path):
    from ds_loradrop.errors import UsageError

    with pytest.raises(UsageError, match="has no config.json"):
        load_model_config(str(tmp_path))
    with pytest.raises(UsageError, match="has no weight files"):
        load_causal_lm(str(tmp_path), torch.float32)
