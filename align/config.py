"""Typed recipes: YAML files loaded into dataclasses, with strict keys and dotted overrides.

A typo in a recipe must fail before a job starts, naming the key and the closest valid one,
so every key is checked against the dataclass fields and every value against its type hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe that cannot be loaded; the message names the file and the key path."""


# ----------------------------------------------------------------------------- sections
@dataclasses.dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclasses.dataclass
class ModelConfig:
    """Where weights come from: `builtin:tiny|small`, a hub name, or a local directory."""

    name_or_path: str = "builtin:small"
    tokenizer: str | None = None  # defaults to the model's own (the built-in one for builtin:*)
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


@dataclasses.dataclass
class SourceConfig:
    """One data source: a .jsonl/.parquet file, a saved HF dataset dir, a hub dataset, or `synthetic`."""

    path: str = "synthetic"
    split: str = "train"
    format: Literal["auto", "messages", "sharegpt"] = "auto"
    max_rows: int | None = None


@dataclasses.dataclass
class SyntheticConfig:
    seed: int = 0
    digits: int = 3
    train_rows: int = 6000
    eval_rows: int = 300
    concise_share: float = 0.7
    system_share: float = 0.5  # SFT rows opening with a generic system prompt (robust to the RM's condition prompts)


@dataclasses.dataclass
class DataConfig:
    train: list[SourceConfig] = dataclasses.field(default_factory=lambda: [SourceConfig()])
    eval: list[SourceConfig] = dataclasses.field(default_factory=list)
    system_prompt: str | None = None  # added to conversations that have none
    max_length: int = 512
    packing: bool = True
    truncation: Literal["right", "drop", "error"] = "right"
    max_truncated_share: float = 0.05  # more truncated rows than this is an error
    on_bad_row: Literal["error", "skip"] = "error"
    loss_reduction: Literal["token", "sample", "sqrt"] = "token"
    # preference pairs: compute the shared prompt once per pair ([prefix | chosen | rejected] with a 4-D mask);
    # null (auto) = on unless the attention cannot take a 4-D mask (flash-attention)
    share_prefix: bool | None = None
    pair_row_tokens: int | None = None  # tokens per packed row of pairs; default 2·max_length (the longest pair)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

    def eval_sources(self) -> list[SourceConfig]:
        """`eval` if given; else the synthetic suite's held-out split when training on it; else none."""
        if self.eval:
            return list(self.eval)
        return [SourceConfig(path="synthetic", split="eval")] if any(s.path == "synthetic" for s in self.train) else []


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0


@dataclasses.dataclass
class TrainConfig:
    micro_batch_size: int = 8  # rows per rank per micro-step (packed rows when packing)
    gradient_accumulation_steps: int | None = None  # derived from global_batch_size when unset
    global_batch_size: int | None = None  # micro × accumulation × world size
    epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    save_every: int = 0  # optimizer steps; 0 = no intermediate checkpoints
    keep_last: int = 2
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    resume: bool = True  # continue from the newest checkpoint in output_dir/checkpoints


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
    num_prompts: int = 300
    max_new_tokens: int = 48
    batch_size: int = 100


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


@dataclasses.dataclass
class PolicySamplingConfig:
    """Samples drawn from the starting policy in `setup`, scored by the task verifier, kept in a rollout buffer."""

    enabled: bool = False
    prompts_path: str | None = None  # JSONL rows {messages, condition, answer, unsafe}; default: synthetic train prompts
    num_prompts: int = 400
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 64  # prompts per generate call


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
    gamma: float = 2.0  # difficulty decay of the focal ranking loss
    barrier_weight: float = 0.02  # λ of the log barrier (paper 0.02; xtuner 0.01); 0 turns it off
    bound: float = 5.0  # scores are kept inside (−bound, bound)
    near_barrier: float = 0.9  # report the share of |score| ≥ near_barrier·bound
    reward_token: str | None = None  # appended token whose hidden state is scored (InternLM2); must exist in the vocab
    conditions: dict[str, str] = dataclasses.field(default_factory=_default_conditions)


@dataclasses.dataclass
class RMRecipe(RunRecipe):
    output_dir: str = "runs/rm"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path="runs/sft-quickstart/model"))
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)


def _mpo_losses() -> dict[str, float]:
    return {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}


@dataclasses.dataclass
class SampledPairsConfig(PolicySamplingConfig):
    """MMPR-style pairs from the policy's own samples, built before training (InternVL2.5-MPO).

    `rounds` > 1 makes `align mpo` online (InternVL-MPO's iterative rounds): round k is a whole MPO job in
    `output_dir/round-k` whose policy is round k−1's export, so its pairs come from the policy as trained so far.
    """

    max_pairs_per_prompt: int = 3  # correctness pairs (the paper: up to 15)
    dropout_ntp_share: float = 0.0  # prompts with a correct sample that also get a Dropout-NTP pair
    rounds: int = 1  # sample → train rounds; a finished round (its summary.json exists) is skipped on rerun
    update_reference: bool = False  # each round's reference is that round's starting policy (default: the first round's)
    round_index: int = 0  # set by the online runner for each round's job (sampling seed, rollout round); leave at 0


@dataclasses.dataclass
class MPOConfig:
    """Mixed preference optimisation (InternVL2.5-MPO): weighted registered losses over policy/reference log-ratios."""

    beta: float = 0.1
    # name → weight; names from align/losses/preference.py (sigmoid, bco_pair, sft, sft_sequence, ipo, hinge)
    losses: dict[str, float] = dataclasses.field(default_factory=_mpo_losses)
    running_delta: bool = True  # BCO's δ = running mean of past rewards; false pins δ = 0 (TRL 1.16's bco_pair)
    # where reference log-probs come from: a frozen copy (ZeRO-3 eval partitioning under DeepSpeed),
    # the policy with its LoRA adapters disabled, or one pass before training cached on disk
    reference: Literal["model", "adapters", "precomputed"] = "model"
    reference_path: str | None = None  # default: model.name_or_path (the starting policy)
    cache_dir: str = "runs/.cache/reference_logprobs"  # precomputed log-probs, keyed by data and model identity
    sampled_pairs: SampledPairsConfig = dataclasses.field(default_factory=SampledPairsConfig)


@dataclasses.dataclass
class MPORecipe(RunRecipe):
    output_dir: str = "runs/mpo"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path="runs/sft-quickstart/model"))
    mpo: MPOConfig = dataclasses.field(default_factory=MPOConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def _rlhf_routes() -> dict[str, dict[str, float]]:
    return {"math": {"rm": 1.0, "task": 1.0}, "concise": {"rm": 1.0, "task": 1.0}, "harmless": {"rm": 1.0, "task": 1.0}}


@dataclasses.dataclass
class DetectorConfig:
    """Reward-hacking detectors run between rounds on the round's early vs. late samples (COOL RLHF fast path)."""

    accuracy_drop: float = 0.02  # reward rose while verifier accuracy fell by more than this
    length_ratio: float = 1.5  # late mean response length over early
    truncated_share: float = 0.2  # late share of responses cut at max_new_tokens
    repetition_share: float = 0.1  # late share of responses repeating a word 3-gram three times or more


@dataclasses.dataclass
class PPOConfig:
    """COOL RLHF (InternLM2 §4.2): conditional online PPO against the reward router, in rounds."""

    reward_model: str = "runs/rm-quickstart/model"  # a conditional RM from `align rm`; also the critic's start
    routes: dict[str, dict[str, float]] = dataclasses.field(default_factory=_rlhf_routes)  # condition → {rm | verifier: weight}
    prompts_path: str | None = None  # JSONL rows {messages, condition, answer, unsafe}; default: the synthetic train prompts
    num_prompts: int = 2000  # prompt pool, cycled in a seeded order
    rounds: int = 1
    iterations_per_round: int = 20
    prompts_per_iteration: int = 32  # across all ranks; divisible by the world size
    samples_per_prompt: int = 1
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per PPO epoch; train.micro_batch_size rollouts per micro-step
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    generation_batch_size: int = 64  # prompts per generate call
    truncated: Literal["penalty", "drop"] = "penalty"  # responses that hit max_new_tokens: add the penalty, or train on none of their tokens
    truncation_penalty: float = -1.0
    kl_coef: float = 0.01
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = 1.0
    lam: float = 0.99
    clip: float = 0.2
    value_clip: float | None = None  # off in InternLM2
    whiten_advantages: bool = False
    reward_clip: float = 5.0
    normalize_reward: bool = True  # running mean/std of the clipped score, over all ranks (xtuner)
    critic_lr: float = 5e-6
    critic_warmup_iterations: int = 50  # critic-only iterations before the actor moves
    ptx_coef: float = 0.5  # pretraining (SFT) loss on data.train
    ptx_rows: int = 1  # packed data.train rows per rank per micro-step
    comparisons_dir: str | None = None  # slow path: externally labelled comparison JSONL files ingested between rounds
    rm_update_steps: int = 0  # fast path: reward-model steps on early-vs-late comparisons (+ ingested ones) between rounds
    rm_update_lr: float = 1e-5
    rm_update_batch: int = 16  # pairs per reward-model step
    detectors: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)


@dataclasses.dataclass
class RLHFRecipe(RunRecipe):
    output_dir: str = "runs/rlhf"
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path="runs/sft-quickstart/model"))
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)  # the RM's condition prompts
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


RECIPES: dict[str, type] = {"sft": SFTRecipe, "rm": RMRecipe, "mpo": MPORecipe, "rlhf": RLHFRecipe}  # command → recipe type


# ----------------------------------------------------------------------------- loading
def read_yaml_mapping(path: str | Path, what: str = "config file", error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (safe_load); a missing file, bad YAML or a list is an error naming the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read `path` (YAML), apply `key.sub=value` overrides, and build a checked `cls`."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        raw = read_yaml_mapping(path, "config file")
    for item in overrides:
        apply_override(raw, item, source)
    return build(cls, raw, source=source)


def apply_override(raw: dict, item: str, source: str = "--set") -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-5, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-5")
    key, _, text = item.partition("=")
    value = yaml.safe_load(text) if text.strip() else None
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def build(cls: type[T], data: Any, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and mistyped values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {_join(prefix, close[0])!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key {_join(prefix, key)!r}{hint}")
    kwargs = {name: _coerce(hints[name], data[name], source, _join(prefix, name)) for name in names if name in data}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(hint: Any, value: Any, source: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {path}: {value!r} does not fit {hint}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: {path}: {value!r} is not one of {list(args)}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path}: expected a mapping, got {type(value).__name__}")
        return {k: _coerce(args[1], v, source, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-5` as a string; accept it as the number it is
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{source}: {path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(recipe: Any) -> dict:
    return dataclasses.asdict(recipe)


def flat_dict(recipe: Any) -> dict[str, Any]:
    """{"optim.lr": 1e-4, ...}: the dotted form sweeps and trackers use."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(_join(prefix, key), value)
        else:
            out[prefix] = node

    walk("", to_dict(recipe))
    return out


def save_resolved(recipe: Any, path: Path) -> None:
    """Write the recipe as run, so a run directory says exactly what produced it."""
    path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
