"""`lora-lab train`'s settings: one frozen dataclass, its presets, and the flags it drives (as gpt-fast's ModelArgs).

    TrainSettings()                                  # the defaults: the tiny model, r=8, lr 2e-3, 200 steps
    TrainSettings.from_name("course")                # the course's QLoRA settings for Llama 3.1 8B
    TrainSettings.from_name("course").replace(r=16)  # an explicit flag overrides a preset's value

A run's settings are saved as a plain dict (``as_dict``) in metrics.json and resume.pt, and read back with
``TrainSettings(**saved)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class TrainSettings:
    model: str = "tiny"  # 'tiny' (the cached pre-trained tiny Llama) or a local Hugging Face Llama folder
    data: str = "builtin"  # 'builtin' (synthetic products) or a JSONL file of {"text", "price"} rows
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # examples per micro-batch, split across --nproc processes
    grad_accum: int = 1  # micro-batches per optimizer step
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA alpha: the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated linear layers to adapt
    lr: float = 2e-3  # peak AdamW learning rate
    scheduler: str = "cosine"  # the learning rate's decay after warmup: cosine, constant or linear
    warmup_ratio: float = 0.03  # share of the steps spent warming the learning rate up
    backend: str = "reference"  # the QLoRA layer: the readable reference, or triton (a CUDA GPU)
    out: str = "runs/train"  # output folder
    seed: int = 0  # seed for the adapters, the data order and the split
    eval_size: int = 200  # held-out prompts for the price evaluation
    pretrain_steps: int | None = None  # --model tiny only: pre-training steps of the cached base model (None: its own)
    bf16: bool = False  # the base model and the quantized layers' compute in bf16; adapters and AdamW stay fp32
    gradient_checkpointing: bool = False  # recompute each decoder block in backward instead of keeping activations

    @classmethod
    def from_name(cls, name: str) -> TrainSettings:
        """A preset by name (``--preset``); ``ValueError`` naming the presets for any other name."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    def replace(self, **changes) -> TrainSettings:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def default(cls, name: str):
        return next(f.default for f in fields(cls) if f.name == name)


# The course's QLoRA settings for Llama 3.1 8B: r=32, alpha=64 on q/k/v/o, dropout 0.1, lr 1e-4, cosine, 3% warmup.
PRESETS = {
    "course": dict(r=32, alpha=64.0, targets="q_proj,k_proj,v_proj,o_proj", dropout=0.1, lr=1e-4, scheduler="cosine",
                   warmup_ratio=0.03),
}
