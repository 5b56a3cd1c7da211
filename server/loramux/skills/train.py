"""Train a LoRA skill adapter on the base model, on CPU, and save it in PEFT format.

    python -m loramux.skills.train --task sql --out adapters/sql --steps 300

Examples come from the task's train split (`loramux.skills.tasks`), formatted with
the model's chat template; the loss covers only the answer tokens (the reference
plus the end-of-turn token), never the prompt. AdamW with linear warmup and decay, a
fixed seed for LoRA init and data order, dropout off, so a run is reproducible on the
same machine and library versions.

The output directory holds `adapter_config.json` + `adapter_model.safetensors` (the
factors stored as float16 by default to keep the file a few MB) and `training.json`:
the configuration, the command that reproduces the run, the loss curve, the final
training and validation loss, timings and library versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramux.config import ModelConfig
from loramux.skills.tasks import TASK_NAMES, Example, make_task

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVE_DTYPES = ("float16", "bfloat16", "float32")
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass
class TrainConfig:
    """One training run.

    task: "sql", "python" or "json".
    out: directory the adapter and training.json are written to.
    steps: optimizer steps; batch_size: examples per step.
    lr, warmup_steps, weight_decay: AdamW, linear warmup then linear decay to 0.
    rank, alpha, targets: the LoRA (scale alpha / rank), on these module names.
    seed: LoRA init and data order. data_seed: the task's example generation.
    train_examples: how many distinct training examples to draw (the split may hold
      fewer, see tasks.generate); validation_examples: for the final validation loss.
    max_tokens: longer examples are skipped (counted in training.json).
    log_every: a progress line every this many steps.
    save_dtype: dtype of the saved factors.
    model: an HF model directory; None is the embedded default (SmolLM2-135M-
      Instruct), converted once under cache_dir.
    threads: torch CPU threads; None leaves torch's default.
    """

    task: str
    out: Path
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    seed: int = 0
    data_seed: int = 0
    train_examples: int = 2000
    validation_examples: int = 100
    max_tokens: int = 256
    log_every: int = 10
    save_dtype: str = "float16"
    model: Path | None = None
    cache_dir: Path = field(default_factory=lambda: ModelConfig().cache_dir)
    threads: int | None = None

    def validate(self) -> None:
        if self.task not in TASK_NAMES:
            raise ValueError(f"task {self.task!r} is not one of {TASK_NAMES}")
        for name in ("steps", "batch_size", "rank", "log_every", "train_examples",
                     "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.lr <= 0 or self.alpha <= 0:
            raise ValueError("lr and alpha must be positive")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype {self.save_dtype!r} is not one of {SAVE_DTYPES}")
        unknown = set(self.targets) - set(ALL_TARGETS)
        if not self.targets or unknown:
            raise ValueError(f"targets must be a non-empty subset of {ALL_TARGETS}")


@dataclass
class Encoded:
    """One tokenized example: the prompt's labels are IGNORE."""

    input_ids: list[int]  # [T]
    labels: list[int]  # [T]


@dataclass
class TrainResult:
    out: Path
    losses: list[float]  # one per step
    final_loss: float  # mean of the last log_every steps
    validation_loss: float | None
    seconds: float
    seconds_per_step: float
    adapter_bytes: int


# ---------------------------------------------------------------- data


def encode(tokenizer, example: Example) -> Encoded:
    """Prompt via the chat template (with the assistant header), then the answer and
    the end-of-turn token; tokenized apart, as generation sees them."""
    prompt = tokenizer.apply_chat_template(
        list(example.prompt_messages), add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.reference, add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def encode_all(tokenizer, examples: Sequence[Example], max_tokens: int) -> tuple[list, int]:
    """(encoded examples that fit in max_tokens, number skipped)."""
    encoded = [encode(tokenizer, ex) for ex in examples]
    kept = [e for e in encoded if len(e.input_ids) <= max_tokens]
    return kept, len(encoded) - len(kept)


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids, attention_mask, labels: [B, T]."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(items), width), dtype=torch.long)  # [B, T]
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index batches for `steps` steps: epochs of a seeded shuffle, wrapping around."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


# ---------------------------------------------------------------- model


def load_base(cfg: TrainConfig):
    """(model float32 on CPU, tokenizer, the name adapters record as their base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramux.model.loader import DEFAULT_MODEL_NAME, ensure_default_model

    source = Path(cfg.model) if cfg.model else ensure_default_model(Path(cfg.cache_dir))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The server's spec matches the default model by this name and any other by path.
    base_name = str(cfg.model) if cfg.model else DEFAULT_MODEL_NAME
    return model, tokenizer, base_name


def add_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                      target_modules=list(cfg.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def mean_loss(model, data: Sequence[Encoded], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean answer loss over `data`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = collate(data[i:i + batch_size], pad_id)
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    model.train()
    return total / max(1, count)


def train_steps(model, data: Sequence[Encoded], cfg: TrainConfig, pad_id: int,
                log: Callable[[str], None]) -> tuple[list[float], float]:
    """Run cfg.steps AdamW steps; returns (loss per step, seconds)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    model.train()
    losses: list[float] = []
    start = window = time.perf_counter()
    for step, idx in enumerate(batch_order(len(data), cfg.batch_size, cfg.steps, cfg.seed), 1):
        loss = model(**collate([data[i] for i in idx], pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            n = step % cfg.log_every or cfg.log_every
            per_step = (now - window) / n
            elapsed = now - start
            log(f"step {step}/{cfg.steps}  loss {sum(losses[-n:]) / n:.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {per_step:.2f} s/step  "
                f"elapsed {elapsed:.0f} s  eta {elapsed / step * (cfg.steps - step):.0f} s")
            window = now
    return losses, time.perf_counter() - start


def save(model, cfg: TrainConfig, base_name: str) -> int:
    """Write the PEFT directory with factors in cfg.save_dtype; returns its bytes."""
    dtype = getattr(torch, cfg.save_dtype)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(cfg.out)
    # PEFT also writes a boilerplate model card; training.json is our record.
    (Path(cfg.out) / "README.md").unlink(missing_ok=True)
    return (Path(cfg.out) / "adapter_model.safetensors").stat().st_size


# ---------------------------------------------------------------- run


def train(cfg: TrainConfig, argv: Sequence[str] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train, save the adapter and training.json to cfg.out, and return the result."""
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, argv, log)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as found


def _train(cfg: TrainConfig, argv: Sequence[str] | None, log) -> TrainResult:
    begin = time.perf_counter()
    model, tokenizer, base_name = load_base(cfg)
    task = make_task(cfg.task, seed=cfg.data_seed, sizes={
        "train": cfg.train_examples, "validation": cfg.validation_examples, "test": 0})
    data, skipped = encode_all(tokenizer, task.examples("train"), cfg.max_tokens)
    if not data:
        raise ValueError(f"no {cfg.task} example fits in max_tokens={cfg.max_tokens}")
    model = add_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.task}: {len(data)} examples ({skipped} over {cfg.max_tokens} tokens skipped), "
        f"{trainable:,} trainable parameters, {cfg.steps} steps of {cfg.batch_size}, "
        f"{torch.get_num_threads()} threads")
    losses, seconds = train_steps(model, data, cfg, tokenizer.pad_token_id, log)
    validation, _ = encode_all(tokenizer, task.examples("validation"), cfg.max_tokens)
    val_loss = mean_loss(model, validation, tokenizer.pad_token_id, cfg.batch_size) \
        if validation else None
    adapter_bytes = save(model, cfg, base_name)
    tail = losses[-cfg.log_every:]
    result = TrainResult(
        out=Path(cfg.out),
        losses=losses,
        final_loss=sum(tail) / len(tail),
        validation_loss=val_loss,
        seconds=time.perf_counter() - begin,
        seconds_per_step=seconds / cfg.steps,
        adapter_bytes=adapter_bytes,
    )
    record = training_record(cfg, result, base_name, len(data), skipped, trainable, argv)
    (Path(cfg.out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {cfg.out} ({adapter_bytes / 1e6:.1f} MB): final loss {result.final_loss:.4f}, "
        f"validation loss {val_loss if val_loss is None else round(val_loss, 4)}, "
        f"{result.seconds_per_step:.2f} s/step, {result.seconds:.0f} s in all")
    return result


def training_record(cfg: TrainConfig, result: TrainResult, base_name: str, examples: int,
                    skipped: int, trainable: int, argv: Sequence[str] | None) -> dict:
    import peft
    import transformers

    config = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
              for k, v in dataclasses.asdict(cfg).items()}
    return {
        "task": cfg.task,
        "base_model": base_name,
        "config": config,
        "data_seed": cfg.data_seed,
        "steps": cfg.steps,
        "train_examples": examples,
        "skipped_examples": skipped,
        "trainable_parameters": trainable,
        "first_loss": result.losses[0],
        "final_loss": result.final_loss,
        "validation_loss": result.validation_loss,
        "losses": [round(x, 5) for x in result.losses],
        "seconds_total": round(result.seconds, 2),
        "seconds_per_step": round(result.seconds_per_step, 4),
        "adapter_bytes": result.adapter_bytes,
        # The exact invocation when run from the command line, and always the
        # equivalent command with every option spelled out.
        "argv": list(argv) if argv is not None else None,
        "command": equivalent_command(cfg),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def equivalent_command(cfg: TrainConfig) -> str:
    args = ["python", "-m", "loramux.skills.train"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        args += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    return shlex.join(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loramux.skills.train",
        description="Train a LoRA skill adapter (PEFT format) on the base model, on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig(task="sql", out=Path("."))
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--out", required=True, type=Path, help="output adapter directory")
    p.add_argument("--model", type=Path, default=None,
                   help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    p.add_argument("--targets", nargs="+", default=list(ALL_TARGETS), choices=ALL_TARGETS,
                   metavar="MODULE", help=f"LoRA target modules, from {', '.join(ALL_TARGETS)}")
    p.add_argument("--save-dtype", default=defaults.save_dtype, choices=SAVE_DTYPES)
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("int", "float", "int | None") and f.name not in ("threads",):
            kind = float if f.type == "float" else int
            p.add_argument("--" + f.name.replace("_", "-"), type=kind,
                           default=getattr(defaults, f.name))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a busy machine 1 can be several times faster)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["targets"] = tuple(values["targets"])
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(build_parser().parse_args(argv))
    train(cfg, argv=["python", "-m", "loramux.skills.train", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
