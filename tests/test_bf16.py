"""bf16 as a tested configuration: 2-rank LoRA-drop runs of the real ``smollm2-135m`` preset under the
shipped ``ds_configs/zero2_bf16.json`` and ``ds_configs/zero3_bf16.json`` (bf16 forced on the CPU), and
the Llama-2-7b-shaped ``tiny-llama2`` end to end under ZeRO-3 in bf16.

What is held: the dtypes (bf16 base and adapters, fp32 master weights and Adam moments, under both stages),
generation, the importance measured in bf16 against fp32 on the same stage-1 adapter and inputs (same kept
layers), the three exports (the PEFT one through plain PEFT over a bf16 base), and resume.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest
import torch
from conftest import REPO_ROOT
from launching import TRAIN, assert_partitioned_on_two_ranks, direct, job_env, launch
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

BF16_PRECISION = {
    "frozen": "bfloat16",
    "trainable": "bfloat16",
    "master_weights": "float32",
    "optimizer_state": "float32",
}
SHIPPED = {stage: os.path.join(REPO_ROOT, "ds_configs", f"zero{stage}_bf16.json") for stage in (2, 3)}


def _json(path) -> dict:
    with open(path) as handle:
        return json.load(handle)


def _two_ranks(config: str, output: str, args: list[str]) -> list[str]:
    return direct(TRAIN, "--ds_config", config, "--output_dir", output, *args)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, smollm2_cache, e2e_dir):
    """smollm2-135m LoRA-drop under each shipped bf16 config (stage 1 two steps on its 8-example sample,
    stage 2 four steps, a checkpoint every 2 steps), and the ZeRO-3 run resumed from its stage-2 step-2
    checkpoint."""
    cache, _ = smollm2_cache
    root = tmp_path_factory.mktemp("bf16")
    env = {**job_env(root), "DS_LORADROP_CACHE": cache}
    args = [
        "--model", "smollm2-135m", "--data_dir", e2e_dir, "--max_train_samples", "16",
        "--per_device_train_batch_size", "2", "--sample_ratio", "0.5", "--stage1_epochs", "1",
        "--threshold", "0.9", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "2e-3",
        "--max_seq_length", "64", "--max_eval_samples", "4", "--max_new_tokens", "8",
        "--val_loss_samples", "4",
        "--eval_batch_size", "2", "--logging_steps", "1", "--report_to", "none", "--seed", "5",
    ]  # fmt: skip
    out, logs = {}, {}
    for stage, config in SHIPPED.items():
        out[stage] = str(root / f"zero{stage}")
        logs[stage] = launch(_two_ranks(config, out[stage], args), env).stdout
    # What a job killed after stage 2's step 3 leaves: its step-2 checkpoint, then --resume auto.
    resumed = str(root / "zero3_resumed")
    kept_out = shutil.ignore_patterns("stage2-step-000004", "adapter", "summary.json", "eval")
    shutil.copytree(out[3], resumed, ignore=kept_out)
    logs["resumed"] = launch(_two_ranks(SHIPPED[3], resumed, [*args, "--resume", "auto"]), env).stdout
    out["resumed"] = resumed
    return out, logs


def test_bf16_trains_bf16_weights_with_fp32_master_weights_under_zero2_and_zero3(bf16_runs):
    out, logs = bf16_runs
    for stage in (2, 3):
        summary = _json(os.path.join(out[stage], "summary.json"))
        assert summary["precision"] == BF16_PRECISION, stage
        assert _json(os.path.join(out[stage], "run_config.json"))["resolved"]["dtype"] == "bfloat16"
        assert _json(os.path.join(out[stage], "ds_config.json"))["bf16"] == {"enabled": True}
        for name in ("stage1", "stage2"):
            assert (
                f"{name}: precision frozen bfloat16, trainable bfloat16, master_weights float32, "
                "optimizer_state float32" in logs[stage]
            )
        assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2"]
        assert all(math.isfinite(s["final_loss"]) for s in summary["stages"])
        assert [s["num_steps"] for s in summary["stages"]] == [2, 4]
        # generation in bf16: every evaluated input got a text, and the scores were computed
        predictions = (
            open(os.path.join(out[stage], "eval", "predictions.jsonl")).read().splitlines()  # noqa: SIM115
        )
        assert len(predictions) == 4 and all(json.loads(p)["prediction"].strip() for p in predictions)
        assert {"bleu", "rouge_l"} <= set(summary["eval_metrics"])
        # the adapters are written as trained: bf16
        weights = load_file(os.path.join(out[stage], "adapter", "adapter_model.safetensors"))
        assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_importance_in_bf16_keeps_the_layers_fp32_keeps_on_the_same_adapter_and_inputs(bf16_runs):
    """The same stage-1 adapter and sample measured in fp32 and in bf16 (the squared norms summed in fp32,
    accumulated in fp64 in both): the same kept layers, and normalised importances within 0.5 % of the
    total. The run's own plan (measured during the bf16 run, on 2 ranks) keeps the same layers too."""
    from ds_loradrop.recipes.importance import adapter_importance, run_config_for

    out, _ = bf16_runs
    run = out[2]
    cfg = run_config_for(run, {})
    adapter = os.path.join(run, "stage1_adapter")
    fp32 = adapter_importance(adapter, cfg, batch_size=8, dtype=torch.float32)
    bf16 = adapter_importance(adapter, cfg, batch_size=8, dtype=torch.bfloat16)
    in_run = _json(os.path.join(run, "plan.json"))
    for target in ("q_proj", "v_proj"):
        ours, reference = bf16.targets[target], fp32.targets[target]
        assert ours.retained == reference.retained == in_run["targets"][target]["retained"], target
        difference = max(abs(a - b) for a, b in zip(ours.normalized, reference.normalized, strict=True))
        assert difference < 5e-3, (target, difference)
        assert 0 < len(reference.retained) < 30


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_the_three_exports_of_a_bf16_run_load_over_a_bf16_base(bf16_runs, tmp_path):
    """PEFT (plain PeftModel over a bf16 base), merged (a bf16 checkpoint) and loradrop (reloaded by this
    project) give the trained bf16 model's logits, as closely as bf16 itself allows: each differs from
    it by at most twice what the same adapter differs in bf16 from fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ds_loradrop.recipes.export import export_run, load_adapted_model

    out, _ = bf16_runs
    run = out[3]
    ids = torch.randint(100, 40_000, (2, 17), generator=torch.Generator().manual_seed(0))
    trained, config = load_adapted_model(os.path.join(run, "adapter"), dtype=torch.bfloat16)
    assert {p.dtype for p in trained.parameters()} == {torch.bfloat16}
    reference = _logits(trained, ids)
    del trained
    in_fp32, _ = load_adapted_model(os.path.join(run, "adapter"), dtype=torch.float32)
    bf16_noise = (_logits(in_fp32, ids) - reference).abs().max().item()
    del in_fp32
    assert 0 < bf16_noise

    peft_dir = export_run(run, "peft", str(tmp_path / "peft"))
    base = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    assert peft_model.get_base_model().model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert (_logits(peft_model, ids) - reference).abs().max().item() <= 2 * bf16_noise
    del peft_model, base

    merged_dir = export_run(run, "merged", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).eval()
    assert (_logits(merged, ids) - reference).abs().max().item() <= 2 * bf16_noise
    del merged

    compact_dir = export_run(run, "loradrop", str(tmp_path / "loradrop"))
    compact, _ = load_adapted_model(compact_dir, dtype=torch.bfloat16)
    torch.testing.assert_close(_logits(compact, ids), reference, rtol=0, atol=0)


def test_a_bf16_zero3_run_resumed_mid_stage2_ends_with_the_uninterrupted_adapters(bf16_runs):
    out, logs = bf16_runs
    assert re.search(r"resumed from .*stage2-step-000002 at step 2/4", logs["resumed"])
    uninterrupted = load_file(os.path.join(out[3], "adapter", "adapter_model.safetensors"))
    resumed = load_file(os.path.join(out["resumed"], "adapter", "adapter_model.safetensors"))
    assert sorted(resumed) == sorted(uninterrupted)
    for name, tensor in uninterrupted.items():
        # the fp32 master weights and Adam moments come back from the checkpoint: bit for bit
        assert torch.equal(resumed[name], tensor), name
    assert _json(os.path.join(out["resumed"], "summary.json"))["precision"] == BF16_PRECISION


# Llama-2-7b: 32 layers, multi-head attention (q_proj and v_proj both hidden -> hidden), MLP 11008/4096,
# untied 32,000-row head. tiny-llama2 keeps all of that at hidden 128.
LLAMA2_LAYERS, LLAMA2_HIDDEN, LLAMA2_VOCAB, R = 32, 128, 32000, 8


def test_the_llama2_shaped_model_trains_end_to_end_under_zero3_in_bf16(tmp_path, e2e_dir):
    """tiny-llama2 (random weights at Llama-2-7b's proportions) under 2-rank ZeRO-3 in bf16: every tensor
    partitioned, half of the elements per rank; a plan over 32 layers; q and v adapters of equal shape;
    the PEFT export reloaded by plain PEFT over a bf16 base gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_loradrop.recipes.export import export_run, load_adapted_model

    env = job_env(tmp_path)
    output = str(tmp_path / "run")
    args = [
        "--model", "tiny-llama2", "--data_dir", e2e_dir, "--max_train_samples", "64",
        "--per_device_train_batch_size", "2", "--sample_ratio", "0.5", "--stage1_epochs", "1",
        "--threshold", "0.9", "--max_steps", "3", "--learning_rate", "3e-3",
        "--max_seq_length", "64", "--max_eval_samples", "4", "--max_new_tokens", "6",
        "--val_loss_samples", "8",
        "--eval_batch_size", "4", "--report_to", "none", "--seed", "2",
    ]  # fmt: skip
    log = launch(_two_ranks(SHIPPED[3], output, args), env).stdout

    summary = _json(os.path.join(output, "summary.json"))
    base_path = _json(os.path.join(output, "run_config.json"))["resolved"]["model_path"]
    config = AutoConfig.from_pretrained(base_path)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (32, 128, 32000)
    assert config.num_key_value_heads == config.num_attention_heads and not config.tie_word_embeddings
    assert config.intermediate_size / config.hidden_size == pytest.approx(11008 / 4096, rel=1e-3)
    assert_partitioned_on_two_ranks(log, slack=2 * 128)
    assert summary["precision"] == BF16_PRECISION
    assert summary["num_layers"] == {"q_proj": LLAMA2_LAYERS, "v_proj": LLAMA2_LAYERS}
    # multi-head attention: q and v both 128 -> 128, so every adapter is r * (128 + 128)
    assert summary["lora_parameters"] == 2 * LLAMA2_LAYERS * R * 2 * LLAMA2_HIDDEN == 131_072
    plan = _json(os.path.join(output, "plan.json"))
    kept = {t: p["retained"] for t, p in plan["targets"].items()}
    assert all(len(p["normalized"]) == LLAMA2_LAYERS for p in plan["targets"].values())
    shared = sum(1 for p in plan["targets"].values() if p["shared"])
    assert summary["trainable_parameters"] == R * 2 * LLAMA2_HIDDEN * (sum(map(len, kept.values())) + shared)
    weights = load_file(os.path.join(output, "adapter", "adapter_model.safetensors"))
    assert {t.shape for n, t in weights.items() if n.endswith("lora_B")} == {(LLAMA2_HIDDEN, R)}

    ids = torch.randint(4, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    trained, _ = load_adapted_model(os.path.join(output, "adapter"), dtype=torch.bfloat16)
    reference = _logits(trained, ids)
    peft_dir = export_run(output, "peft", str(tmp_path / "peft"))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    assert len([n for n, _ in peft_model.named_parameters() if "q_proj.lora_A" in n]) == LLAMA2_LAYERS
    # PEFT computes the adapter in fp32 over the bf16 base (autocast_adapter_dtype), ours in bf16: the
    # logits agree to bf16's resolution at their scale
    torch.testing.assert_close(_logits(peft_model, ids), reference, rtol=0.02, atol=0.02)
