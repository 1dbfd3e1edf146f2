"""Try a trained model: complete a prompt, a file of prompts, or chat, with a run, an adapter, a PEFT
export or a merged model; tokens stream as they are generated.

One process generates on its device. Under the DeepSpeed launcher with ``--ds_config`` (ZeRO-3), every rank
holds a share of the weights and takes part in every forward (``synced_gpus``); rank 0 reads the prompts,
sends them to the others and prints, so a model that does not fit one device still answers.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch

from ds_loradrop.config import TrainConfig
from ds_loradrop.data.chat import render_generation_prompt, require_chat_template
from ds_loradrop.data.tasks import TASKS
from ds_loradrop.errors import UsageError
from ds_loradrop.eval.generation import stop_token_ids
from ds_loradrop.method.adapter_files import attach_saved_adapters, read_adapter_config
from ds_loradrop.method.placement import cast_adapters
from ds_loradrop.models.loading import (
    RANDOM_PRESETS,
    load_causal_lm,
    load_for_deepspeed,
    load_model_config,
    load_tokenizer,
    resolve_model_path,
)
from ds_loradrop.run_files import ADAPTER_WEIGHTS_NAME, FINAL_ADAPTER_DIR, FULL_MODEL_DIR
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import broadcast_object, get_world_size_and_rank, is_rank_zero
from ds_loradrop.training.ds_config import load_ds_config, resolve_ds_config, zero_stage

# --task: the tasks whose training prompt wraps one text (DART's takes triples), by their own format_prompt.
TASK_PROMPTS = {name: TASKS[name].format_prompt for name in ("e2e", "dialogsum", "gsm8k")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateConfig:
    run: str | None = field(
        default=None,
        metadata={"help": "A finished training run's directory: its final adapter (or full_model/)."},
    )
    adapter: str | None = field(
        default=None, metadata={"help": "An adapter directory written by launch/train.py."}
    )
    peft: str | None = field(
        default=None, metadata={"help": "A PEFT adapter directory (e.g. launch/export.py --format peft)."}
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "A model to generate with (path, hub id or the smollm2-135m preset: a merged export, a "
            "full fine-tuning run's full_model/, a base model); with --adapter / --peft, the base model to "
            "use instead of the one they name."
        },
    )
    prompt: list[str] = field(default_factory=list, metadata={"help": "One or more prompts to complete."})
    prompt_file: str | None = field(
        default=None,
        metadata={"help": "A file of prompts: one per line, or JSON lines with a 'prompt' field."},
    )
    chat: bool = field(
        default=False,
        metadata={"help": "Chat on standard input (the tokenizer's chat template, with the history); an "
                  "empty line or end of input ends it."},
    )  # fmt: skip
    system: str | None = field(default=None, metadata={"help": "--chat: a system message."})
    use_chat_template: bool = field(
        default=False, metadata={"help": "Render each --prompt as a user turn with the chat template."}
    )
    task: str | None = field(
        default=None,
        metadata={"help": f"Wrap each prompt in a task's training prompt ({', '.join(TASK_PROMPTS)})."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens generated per answer."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "--do_sample: softmax temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "--do_sample: nucleus mass, in (0, 1]."})
    top_k: int = field(default=50, metadata={"help": "--do_sample: keep the k most likely tokens (0: all)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty on repeated tokens (1: none)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    stream: bool = field(default=True, metadata={"help": "Print tokens as they are generated."})
    output: str | None = field(
        default=None, metadata={"help": "Also write {prompt, completion} JSON lines here (a new file)."}
    )
    dtype: str = field(
        default="float32", metadata={"help": f"Weights' dtype without --ds_config: {', '.join(DTYPES)}."}
    )
    ds_config: str | None = field(
        default=None,
        metadata={"help": "Load the model under DeepSpeed with this JSON (ZeRO-3: partitioned over the ranks "
                  "of `deepspeed --num_gpus N launch/generate.py ...`); its precision sets the dtype."},
    )  # fmt: skip
    model_cache_dir: str | None = field(default=None, metadata={"help": "Cache of the presets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})


def check_config(cfg: GenerateConfig) -> None:
    """One UsageError for the first problem, before any model is loaded."""
    sources = [name for name in ("run", "adapter", "peft") if getattr(cfg, name)]
    if len(sources) > 1:
        raise UsageError(f"pass one of --run, --adapter, --peft (got {', '.join('--' + s for s in sources)})")
    if not sources and not cfg.model:
        raise UsageError("nothing to generate with: pass --run, --adapter, --peft or --model")
    if cfg.run and cfg.model:
        raise UsageError("--run brings its own model; pass --adapter with --model to change the base model")
    inputs = [
        name
        for name, given in (("prompt", cfg.prompt), ("prompt_file", cfg.prompt_file), ("chat", cfg.chat))
        if given
    ]
    if len(inputs) != 1:
        raise UsageError("pass exactly one of --prompt, --prompt_file, --chat")
    for name in ("run", "adapter", "peft"):
        path = getattr(cfg, name)
        if path and not os.path.isdir(path):
            raise UsageError(f"--{name} {path!r} is not a directory")
    if cfg.prompt_file and not os.path.isfile(cfg.prompt_file):
        raise UsageError(f"--prompt_file {cfg.prompt_file!r} does not exist")
    if cfg.task is not None and cfg.task not in TASK_PROMPTS:
        raise UsageError(f"--task {cfg.task!r}: expected one of {list(TASK_PROMPTS)}")
    if cfg.max_new_tokens <= 0:
        raise UsageError(f"--max_new_tokens must be > 0, got {cfg.max_new_tokens}")
    if cfg.do_sample and not cfg.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0 or cfg.repetition_penalty <= 0:
        raise UsageError("--top_k must be >= 0 and --repetition_penalty > 0")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype {cfg.dtype!r}: expected one of {list(DTYPES)}")
    if cfg.output and os.path.exists(cfg.output):
        raise UsageError(f"--output {cfg.output!r} exists; choose a new file")
    if cfg.peft and cfg.ds_config:
        raise UsageError(
            "--peft loads with PEFT in one process; under --ds_config pass --adapter or a merged --model"
        )
    if cfg.model in RANDOM_PRESETS:
        raise UsageError(
            f"--model {cfg.model} is built from a task's data by a training run: pass that run's --run or "
            "--adapter"
        )


def read_prompts(cfg: GenerateConfig) -> list[str]:
    if cfg.prompt:
        return list(cfg.prompt)
    prompts = []
    with open(cfg.prompt_file) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (ValueError, KeyError) as error:
                    raise UsageError(
                        f"{cfg.prompt_file}:{number}: a JSON line needs a 'prompt' field"
                    ) from error
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise UsageError(f"--prompt_file {cfg.prompt_file!r} holds no prompt")
    return prompts


@dataclass
class Generator:
    """A loaded model and tokenizer, and how to generate with them on this rank."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    synced: bool  # every rank takes part in every forward (ZeRO-3 over several ranks)
    engine: object = None

    def complete(self, text: str, cfg: GenerateConfig) -> str:
        """The completion of ``text`` (streamed to stdout on rank 0 with ``--stream``)."""
        from transformers import TextStreamer

        bos = self.tokenizer.bos_token
        # A chat template's text starts with its BOS already; a plain prompt gets it as in training.
        encoded = self.tokenizer(
            text, return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos))
        )
        streamer = (
            TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            if cfg.stream and is_rank_zero()
            else None
        )
        torch.manual_seed(cfg.seed)
        sampling = (
            {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
            if cfg.do_sample
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        with torch.no_grad():
            output = self.model.generate(
                input_ids=encoded["input_ids"].to(self.device),
                attention_mask=encoded["attention_mask"].to(self.device),
                max_new_tokens=cfg.max_new_tokens,
                repetition_penalty=cfg.repetition_penalty,
                eos_token_id=stop_token_ids(self.model, self.tokenizer),
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                synced_gpus=self.synced,
                **sampling,
            )
        new_tokens = output[0, encoded["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def model_and_adapter(cfg: GenerateConfig) -> tuple[str, str | None]:
    """(the model to load, our adapter directory to attach or None) for --run / --adapter / --model."""
    if cfg.run:
        adapter = os.path.join(cfg.run, FINAL_ADAPTER_DIR)
        if os.path.isfile(os.path.join(adapter, ADAPTER_WEIGHTS_NAME)):
            return read_adapter_config(adapter)["base_model"], adapter
        full = os.path.join(cfg.run, FULL_MODEL_DIR)
        if os.path.isdir(full):
            return full, None
        raise UsageError(
            f"--run {cfg.run!r} has no {FINAL_ADAPTER_DIR}/ or {FULL_MODEL_DIR}/: was it finished?"
        )
    if cfg.adapter:
        return cfg.model or read_adapter_config(cfg.adapter)["base_model"], cfg.adapter
    return cfg.model, None


def load_generator(cfg: GenerateConfig) -> Generator:
    if cfg.peft:
        return load_peft_generator(cfg)
    model_name, adapter = model_and_adapter(cfg)
    load_model_config(model_name, cfg.trust_remote_code, cfg.model_cache_dir)  # an unusable model: one line
    if cfg.ds_config is None:
        path = resolve_model_path(model_name, cfg.model_cache_dir, _no_training_text)
        device = single_process_device()
        model = load_causal_lm(path, DTYPES[cfg.dtype], cfg.trust_remote_code)
        if adapter:
            attach_saved_adapters(model, adapter)
            model.to(DTYPES[cfg.dtype])
        return Generator(model.to(device).eval(), load_tokenizer(path, cfg.trust_remote_code), device, False)
    raw = load_ds_config(cfg.ds_config)
    ds_engine.init_distributed()
    world_size, _ = get_world_size_and_rank()
    path = resolve_model_path(model_name, cfg.model_cache_dir, _no_training_text)
    ds_config, _ = resolve_ds_config(
        raw,
        TrainConfig(),
        world_size=world_size,
        hidden_size=load_model_config(path, cfg.trust_remote_code).hidden_size,
        accelerator_has_native_bf16=ds_engine.accelerator_has_native_bf16(),
    )
    model, zero3_loading = load_for_deepspeed(path, ds_config, cfg.trust_remote_code)
    if adapter:
        attach_saved_adapters(model, adapter)
        cast_adapters(model, ds_engine.model_dtype(ds_config))  # as in training: ZeRO-3 casts only its own
    engine = ds_engine.build_inference_engine(model, ds_config)
    engine.zero3_loading = zero3_loading  # referenced while the model lives (see load_for_deepspeed)
    synced = world_size > 1 and zero_stage(ds_config) == 3
    module = engine.module.eval()
    return Generator(
        module, load_tokenizer(path, cfg.trust_remote_code), ds_engine.local_device(), synced, engine
    )


def load_peft_generator(cfg: GenerateConfig) -> Generator:
    from peft import PeftConfig, PeftModel

    base = cfg.model or PeftConfig.from_pretrained(cfg.peft).base_model_name_or_path
    load_model_config(base, cfg.trust_remote_code, cfg.model_cache_dir)
    path = resolve_model_path(base, cfg.model_cache_dir, _no_training_text)
    device = single_process_device()
    model = PeftModel.from_pretrained(
        load_causal_lm(path, DTYPES[cfg.dtype], cfg.trust_remote_code), cfg.peft
    )
    return Generator(model.to(device).eval(), load_tokenizer(path, cfg.trust_remote_code), device, False)


def single_process_device() -> torch.device:
    """Without --ds_config: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _no_training_text(max_examples: int) -> list[str]:
    raise UsageError("this preset is built from a task's data by a training run: pass that run's --run")


def as_prompt(text: str, cfg: GenerateConfig, tokenizer) -> str:
    if cfg.task:
        text = TASK_PROMPTS[cfg.task](text)
    if cfg.use_chat_template:
        require_chat_template(tokenizer)
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": text}
        ]
        return render_generation_prompt(tokenizer, messages)
    return text


def generate(cfg: GenerateConfig) -> list[dict]:
    """Answer every prompt (or chat until the user stops); returns [{prompt, completion}] on every rank."""
    check_config(cfg)
    prompts = read_prompts(cfg) if not cfg.chat else None
    generator = load_generator(cfg)
    if cfg.chat:
        require_chat_template(generator.tokenizer)
    answered = chat(generator, cfg) if cfg.chat else answer(generator, cfg, prompts)
    if cfg.output and is_rank_zero():
        with open(cfg.output, "w") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in answered)
    if generator.engine is not None:
        ds_engine.destroy_engine(generator.engine)
        ds_engine.shutdown_distributed()
    return answered


def answer(generator: Generator, cfg: GenerateConfig, prompts: list[str]) -> list[dict]:
    answered = []
    for text in prompts:
        prompt = as_prompt(text, cfg, generator.tokenizer)
        if is_rank_zero() and cfg.stream:
            print(f">>> {text}", flush=True)
        completion = generator.complete(prompt, cfg)
        if is_rank_zero() and not cfg.stream:
            print(f">>> {text}\n{completion}", flush=True)
        answered.append({"prompt": text, "completion": completion})
    return answered


def chat(generator: Generator, cfg: GenerateConfig) -> list[dict]:
    """Turns read on rank 0 from standard input and sent to every rank; the history is the conversation."""
    history = [{"role": "system", "content": cfg.system}] if cfg.system else []
    answered = []
    while True:
        line = None
        if is_rank_zero():
            print("user> ", end="", flush=True)
            line = sys.stdin.readline()
        line = broadcast_object(line)
        if not line or not line.strip():
            return answered
        history.append({"role": "user", "content": line.strip()})
        if is_rank_zero():
            print("assistant> ", end="", flush=True)
        reply = generator.complete(render_generation_prompt(generator.tokenizer, history), cfg)
        if is_rank_zero() and not cfg.stream:
            print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})
        answered.append({"prompt": line.strip(), "completion": reply})
