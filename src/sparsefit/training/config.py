"""Every option of a fine-tuning run, with its default, validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparsefit.config import check_regexes


class GMPConfig(BaseModel):
    """Gradual magnitude pruning: cubic from `initial` to `final` sparsity over steps [start, end], every `every`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    initial: float = Field(0.0, ge=0.0, lt=1.0)
    final: float = Field(0.5, ge=0.0, lt=1.0)
    start: int = Field(0, ge=0)
    end: int = Field(100, ge=0)
    every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _order(self) -> GMPConfig:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must not come before start ({self.start})")
        if self.final < self.initial:
            raise ValueError(f"final sparsity {self.final} is below initial {self.initial}")
        return self


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf / nan in any float field is an error

    # data
    dataset: str = "gsm8k"  # or "self": text sampled from the teacher (or the model itself), no dataset needed
    self_samples: int = Field(64, ge=1)  # sequences of seq_len tokens when dataset is "self"
    split: str = "train"
    format: Literal["auto", "chat", "plain"] = "auto"  # supervised data: the chat template when the model has one
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    seq_len: int = Field(512, ge=2)
    limit: int | None = Field(None, ge=1)  # use only the first N examples
    # length: exactly one of these; max_tokens converts to steps with the data's mean example length
    max_steps: int | None = Field(None, ge=1)
    num_epochs: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    # optimization
    batch_size: int = Field(4, ge=1)  # sequences per micro-batch per process
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = Field(None, ge=0)  # default: 10% of the steps
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    bf16: Literal["auto", "true", "false"] = "auto"
    gradient_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with several processes: replicate (DDP) or shard (FSDP2)
    seed: int = Field(0, ge=0, lt=2**32)  # torch, random and numpy all take it
    # sparsity
    masks: Literal["auto", "zeros", "none"] = "auto"  # auto: keep zeros pruned when the model is sparse
    targets: list[str] | None = None  # regexes over module names; default every decoder linear
    ignore: list[str] = []
    gmp: GMPConfig | None = None
    # distillation (needs a teacher; a teacher with neither weight set distills with kl_weight 1)
    teacher: str | None = None
    ce_weight: float = Field(1.0, ge=0)
    kl_weight: float = Field(0.0, ge=0)
    square_head_weight: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    distill_layers: list[int] | None = None  # decoder block indices for square_head; default all
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # bookkeeping (a resumed run may change these)
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints; 0: by time only
    checkpoint_minutes: float = Field(15.0, ge=0)  # also checkpoint when this long has passed; 0: by steps only
    keep_checkpoints: int = Field(2, ge=1)  # the newest ones kept; older ones go once a newer is published
    log_every: int = Field(1, ge=1)

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, v: list[str] | None) -> list[str] | None:
        return check_regexes(v)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        given = [k for k in ("max_steps", "num_epochs", "max_tokens") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of max_steps, num_epochs, max_tokens (got {', '.join(given)})")
        distilling = self.kl_weight > 0 or self.square_head_weight > 0
        if self.teacher is not None and not distilling:
            if {"kl_weight", "square_head_weight"} & self.model_fields_set:
                raise ValueError(
                    "a teacher is given but every distillation weight is 0: set kl_weight or square_head_weight"
                )
            self.kl_weight = distilling = 1.0  # a teacher alone means logit distillation
        if distilling and self.teacher is None:
            raise ValueError("kl_weight / square_head_weight need a teacher: set teacher to a model")
        if self.ce_weight == 0 and not distilling:
            raise ValueError("every loss weight is 0: set ce_weight, or a teacher with kl_weight / square_head_weight")
        if self.gmp is not None and self.masks == "none":
            raise ValueError("gmp prunes during training and needs masks: drop masks='none'")
        return self

    @property
    def distilling(self) -> bool:
        return self.teacher is not None and (self.kl_weight > 0 or self.square_head_weight > 0)
