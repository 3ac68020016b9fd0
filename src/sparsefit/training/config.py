"""Every option of a fine-tuning run, with its default, validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sparsefit.config import MAX_BATCH, MAX_DIM, MAX_SAMPLES, MAX_SEQ_LEN, MAX_STEPS, check_regexes

# The experiment trackers `report_to` names (`training.trackers`).
ReportTo = Literal["none", "tensorboard", "wandb", "trackio", "mlflow"]


class GMPConfig(BaseModel):
    """Gradual magnitude pruning: cubic from `initial` to `final` sparsity over steps [start, end], every `every`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    initial: float = Field(0.0, ge=0.0, lt=1.0)
    final: float = Field(0.5, ge=0.0, lt=1.0)
    start: int = Field(0, ge=0, le=MAX_STEPS)
    end: int = Field(100, ge=0, le=MAX_STEPS)
    every: int = Field(10, ge=1, le=MAX_STEPS)

    @model_validator(mode="after")
    def _order(self) -> GMPConfig:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must not come before start ({self.start})")
        if self.final < self.initial:
            raise ValueError(f"final sparsity {self.final} is below initial {self.initial}")
        return self


class ASTConfig(BaseModel):
    """Adaptive N:M training (AST): masks recomputed from the dense weights, SR-STE, optional SLoRB."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    structure: str = Field("2:4", description="N:M pattern along each row's inputs")
    mask_every: int = Field(10, ge=1, le=MAX_STEPS, description="steps between mask updates")
    # Wanda measured far better than magnitude from a dense start (benchmarks/adaptive.py).
    mask_metric: Literal["magnitude", "wanda"] = Field(
        "wanda", description="mask score: wanda (|W| x input norm of the starting model) | magnitude"
    )
    stats_batches: int = Field(8, ge=1, le=MAX_SAMPLES, description="micro-batches whose inputs give Wanda's norms")
    stats_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="steps between refreshes of Wanda's norms (0: gathered once)"
    )
    srste_decay: float = Field(1e-4, ge=0, le=1, description="SR-STE decay on pruned weights' gradients (peak)")
    increase_steps: int | None = Field(
        None,
        ge=0,
        le=MAX_STEPS,
        description="steps over which the decay rises linearly to its peak (default a quarter of the run)",
    )
    # On a SparseGPT 2:4 start, capped edged out zero (which trains like a fixed mask) on both
    # benchmark metrics, and teacher lost on both (benchmarks/adaptive.py).
    pruned_start: Literal["auto", "zero", "teacher", "capped"] = Field(
        "auto",
        description="a model that is already N:M sparse keeps its mask to start with; its pruned weights start at "
        "zero (they seldom win back a place) | teacher (the teacher's values, so the masks can move) | capped (the "
        "teacher's values, each shrunk where needed until its score is at most pruned_cap times its group's "
        "smallest kept score: the start's mask holds until training moves the weights) | auto (default): capped "
        "when the model is N:M sparse and a teacher is given, else zero",
    )
    pruned_cap: float = Field(
        0.8, gt=0, lt=1, description="capped: largest score of a pruned weight, a fraction of its group's kept scores"
    )
    slorb: bool = Field(False, description="add SLoRB side branches (sparse low-rank boosting)")
    slorb_k: int = Field(16, ge=1, le=MAX_DIM, description="inputs per SLoRB group (its size is 1/k of a layer)")
    slorb_init: Literal["mean", "zero"] = Field("mean", description="SLoRB init: mean of the pruned weights | zero")
    slorb_trainable_projection: bool = Field(False, description="train SLoRB's group-sum projection too")

    @field_validator("structure")
    @classmethod
    def _nm(cls, v: str) -> str:
        from sparsefit.pruning.structure import Structure

        if not Structure.parse(v).is_nm:
            raise ValueError(f"adaptive masks need an N:M pattern such as 2:4, got '{v}'")
        return v


# Options of row adapters that LoRA has no use for.
ROWS_ONLY = {"row_fraction", "row_budget", "criterion", "importance_batches", "zo_directions", "zo_eps", "row_init"}


class AdapterConfig(BaseModel):
    """Parameter-efficient fine-tuning (`peft`): the base frozen, row deltas or LoRA trained."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rank: int = Field(8, ge=1, le=MAX_DIM, description="rows per linear (rows) | LoRA rank (lora)")
    row_fraction: float | None = Field(
        None, gt=0, le=1, description="rows: this fraction of each linear's output rows instead of rank"
    )
    row_budget: Literal["layer", "global"] = Field(
        "layer", description="rows: the count per linear | one global budget (scores divided by their layer's mean)"
    )
    criterion: Literal["l2", "l1", "random", "taylor", "zo-taylor"] = Field(
        "taylor",
        description="rows: importance criterion that picks the rows (default taylor: sum |W x G| over "
        "importance_batches, which measured best)",
    )
    importance_batches: int = Field(8, ge=1, le=MAX_SAMPLES, description="micro-batches of training data for taylor")
    zo_directions: int = Field(
        16, ge=1, le=MAX_SAMPLES, description="zo-taylor: random directions, each on its own micro-batch"
    )
    zo_eps: float = Field(1e-3, gt=0, le=1, description="zo-taylor: perturbation size")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    lora_alpha: float | None = Field(None, gt=0, le=1e6, description="lora: scale numerator (default 2 x rank)")
    exclude: list[str] = Field([], description="regexes of decoder linears without an adapter (e.g. q_proj|k_proj)")
    base_bits: Literal[16, 4] = Field(16, description="4: the frozen base in group-wise INT4 (QLoRA-style)")
    base_group_size: int = Field(64, ge=2, le=MAX_DIM, description="inputs per INT4 scale of a 4-bit base")
    row_init: Literal["auto", "zero", "residual"] = Field(
        "auto",
        description="rows: zero | residual (the rows of W - dequant(quant(W)), with base_bits 4); auto (default): "
        "residual on a 4-bit base, else zero",
    )
    merge: Literal["masked", "plain", "none"] = Field(
        "masked",
        description="at the end: masked (merged, the base's zeros kept) | plain (merged; LoRA refills pruned "
        "weights) | none (rows: kept apart in row_adapters.safetensors)",
    )

    @field_validator("exclude")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    @field_validator("row_init")
    @classmethod
    def _residual_needs_4_bits(cls, v: str, info: ValidationInfo) -> str:
        if v == "residual" and info.data.get("base_bits") != 4:
            raise ValueError("'residual' starts from the quantization residual: set base_bits 4")
        return v

    @property
    def residual_init(self) -> bool:
        """Whether row deltas start from the quantization residual (auto: with a 4-bit base)."""
        return self.row_init == "residual" or (self.row_init == "auto" and self.base_bits == 4)


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf / nan in any float field is an error

    # data
    dataset: str = Field(
        "gsm8k",
        description="gsm8k | file.jsonl (prompt/completion) | text dataset | self (text sampled from the teacher, "
        "or the model itself)",
    )
    self_samples: int = Field(64, ge=1, le=MAX_SAMPLES, description="sequences of seq_len tokens when dataset is self")
    self_mix: int = Field(
        0,
        ge=0,
        le=MAX_SAMPLES,
        description="with another dataset: sequences of seq_len tokens sampled from the teacher (or the model "
        "itself) that join its examples, general text against forgetting beside a task's (0: none)",
    )
    split: str = Field("train", description="dataset split")
    format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="supervised data: auto (default: the chat template when the model has one) | chat | plain"
    )
    text_field: str = Field("text", description="field of .jsonl / hub rows holding the text")
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    seq_len: int = Field(512, ge=2, le=MAX_SEQ_LEN, description="longest sequence")
    limit: int | None = Field(None, ge=1, le=10**12, description="use only the first N examples of the dataset")
    # length: exactly one of these; max_tokens converts to steps with the data's mean example length
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="optimizer steps")
    num_epochs: float | None = Field(
        None, gt=0, le=10**6, description="passes over the data (default 1 when no length is given)"
    )
    max_tokens: int | None = Field(None, ge=1, le=10**15, description="token budget, converted to steps")
    # optimization
    batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0, le=10, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = Field(
        None, ge=0, le=MAX_STEPS, description="linear warm-up steps (default 10% of the steps)"
    )
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="learning-rate schedule")
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="gradient clipping norm (0 disables)")
    bf16: Literal["auto", "true", "false"] = Field(
        "auto",
        description="bf16 autocast of training (default auto: on where the CPU or GPU computes bf16 natively)",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: ddp (replicas) | fsdp (sharded, FSDP2)"
    )
    seed: int = Field(0, ge=0, lt=2**32, description="data order and init (torch, random and numpy all take it)")
    # sparsity
    method: Literal["standard", "ast"] = Field(
        "standard",
        description="standard (the model's zeros held at zero, see masks) | ast (adaptive N:M masks with SR-STE, "
        "optionally SLoRB: the Adaptive Sparse Trainer)",
    )
    ast: ASTConfig = Field(default_factory=ASTConfig, description="options of method ast")
    peft: Literal["none", "rows", "lora"] = Field(
        "none",
        description="none (every weight trains) | rows (row deltas on the most important output rows) | lora "
        "(peft's LoRA); the base stays frozen",
    )
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="options of peft rows / lora")
    masks: Literal["auto", "zeros", "none"] = Field(
        "auto",
        description="hold the model's zeros at zero: auto (default: when the model is sparse) | zeros | none",
    )
    targets: list[str] | None = Field(None, description="regexes of masked layers (default: every decoder linear)")
    ignore: list[str] = Field([], description="regexes of layers left unmasked")
    gmp: GMPConfig | None = None
    # distillation (needs a teacher; a teacher with neither weight set distills with kl_weight 1)
    teacher: str | None = Field(None, description="dense teacher model (any --model spec)")
    ce_weight: float = Field(
        1.0, ge=0, le=1e6, description="task cross-entropy weight (default 1; 0.33 for method ast with a teacher)"
    )
    kl_weight: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="logit KL weight (default 0; 1 with a teacher alone; 0.67 for method ast with a teacher)",
    )
    square_head_weight: float = Field(0.0, ge=0, le=1e6, description="per-layer square-head weight")
    temperature: float = Field(
        1.0, gt=0, le=100, description="KL temperature (default 1; 2 for method ast with a teacher)"
    )
    distill_layers: list[int] | None = Field(None, description="decoder blocks for square-head (default all)")
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="teacher weights (default auto: bfloat16 when bf16 training is on)"
    )
    # bookkeeping (a resumed run may change these)
    checkpoint_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="steps between checkpoints (default 0: by time only)"
    )
    checkpoint_minutes: float = Field(
        15.0, ge=0, le=1e6, description="also checkpoint after this many minutes; 0: by steps only"
    )
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="newest checkpoints kept")
    log_every: int = Field(1, ge=1, le=MAX_STEPS)
    report_to: ReportTo = Field(
        "none",
        description="experiment tracker that also receives the training log, written under OUTPUT/tracking: "
        "none (default) | tensorboard | wandb (offline unless WANDB_MODE says otherwise) | trackio (its local "
        "database) | mlflow (a file store unless MLFLOW_TRACKING_URI is set)",
    )

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, v: list[str] | None) -> list[str] | None:
        return check_regexes(v)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        given = [k for k in ("max_steps", "num_epochs", "max_tokens") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of max_steps, num_epochs, max_tokens (got {', '.join(given)})")
        weights = {"ce_weight", "kl_weight", "square_head_weight"}
        if self.method == "ast" and self.teacher is not None and not weights & self.model_fields_set:
            # AST's distillation mix: CE 1/3, KL 2/3 at temperature 2
            self.ce_weight, self.kl_weight = 0.33, 0.67
            if "temperature" not in self.model_fields_set:
                self.temperature = 2.0
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
        if self.dataset == "self" and self.self_mix:
            raise ValueError("self_mix adds sampled text to another dataset; dataset self takes self_samples alone")
        if self.method == "ast" and self.ast.pruned_start in ("teacher", "capped") and self.teacher is None:
            raise ValueError(
                f"pruned_start '{self.ast.pruned_start}' (method ast) takes the pruned weights' values from a "
                "teacher: set teacher"
            )
        if self.method == "ast" and (self.gmp is not None or self.masks == "none"):
            raise ValueError("method ast computes its own N:M masks: drop gmp and masks='none'")
        if self.peft != "none" and (self.method == "ast" or self.gmp is not None):
            raise ValueError("peft trains adapters on a frozen base: drop method 'ast' and gmp")
        if self.peft == "lora" and self.adapter.merge == "none":
            raise ValueError("LoRA adapters are merged at the end: set adapter merge to 'masked' or 'plain'")
        # options set away from their defaults (a dumped config, as recipes pass on, sets every field)
        given = {
            k
            for k in self.adapter.model_fields_set
            if getattr(self.adapter, k) != AdapterConfig.model_fields[k].default
        }
        if self.peft == "none" and given:
            raise ValueError(f"adapter options ({', '.join(sorted(given))}) need peft 'rows' or 'lora'")
        other = given & (ROWS_ONLY if self.peft == "lora" else {"lora_alpha"} if self.peft == "rows" else set())
        if other:
            raise ValueError(f"adapter {', '.join(sorted(other))} does not apply to peft '{self.peft}'")
        if self.gmp is not None and self.masks == "none":
            raise ValueError("gmp prunes during training and needs masks: drop masks='none'")
        return self

    @property
    def sampled_rows(self) -> int:
        """Sequences of text sampled from the teacher (or the model) this run trains on."""
        return self.self_samples if self.dataset == "self" else self.self_mix

    @property
    def distilling(self) -> bool:
        return self.teacher is not None and (self.kl_weight > 0 or self.square_head_weight > 0)
