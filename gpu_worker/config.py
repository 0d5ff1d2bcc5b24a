"""Engine configuration dataclasses: the model's shape, the engine's knobs, and per-request sampling params."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from gpu_worker.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
# The engine's own bound on stop strings per request, whatever the web tier's RUVON_MAX_STOP_SEQUENCES allows:
# every generated token is checked against each of them.
MAX_STOP_SEQUENCES = 256
MAX_STOP_TOKEN_IDS = 256
# logit_bias entries per request: the sampler lays each one out on the host at every step, for every choice, so a
# whole vocabulary of them (with n) held the engine's loop, and every tenant's requests, for seconds a step.
MAX_LOGIT_BIAS = 300


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling (HF rope_type "llama3"): long wavelengths are stretched by
    `factor`, short ones kept, the band between the two wavelength bounds interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Architecture-neutral description of a decoder-only transformer; a family is its arch (which modules
    compose it, gpu_worker/models) plus the fields below."""

    arch: Literal["gpt2", "llama", "qwen2", "mistral"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2), the output projection never does
    sliding_window: int | None = None  # Mistral: each token attends to the last this many (itself included)
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine instance; the KV pool is sized from num_blocks or from free memory."""

    model: str = "smollm2"
    dtype: str = "auto"  # auto: float32 on CPU, float16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0
    # Weight-only quantisation of the projections (gpu_worker.quant.SCHEMES): none, int8, int4 (g128), int4-g32...
    quantization: str = "none"
    # The token embedding (and the LM head tied to it) in int8, one scale per row: about half its bytes.
    quantize_embeddings: bool = False
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from gpu_memory_utilization (CUDA) or cpu_kv_cache_gib
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gib: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # None: the model's own context length
    enable_prefix_caching: bool = True
    # "tenant": cached prefixes are shared only within a tenant (and cache_salt); "global": across tenants.
    prefix_cache_scope: str = "tenant"
    enforce_eager: bool = False  # True: no CUDA graphs (they are only used on CUDA anyway)
    cuda_graph_max_batch: int = 512
    max_waiting: int = 10_000  # admission bound on queued requests
    max_waiting_tokens: int | None = None  # ... and on their tokens (prompt + max completion); None: no bound
    # Decode-only steps run as launches of `decode_steps` tokens per sequence, fed back on the device
    # (model_runner.DecodeLaunch) when decode_steps > 1 or async_decode is on. >1 amortises the host's
    # per-step work over several tokens; the stream then arrives in bursts of that many tokens.
    decode_steps: int = 1
    # Queue the next decode launch before reading the last one back, so the host's bookkeeping overlaps the
    # device's work. None: on for CUDA, off on CPU (where it would only waste the lookahead's compute).
    async_decode: bool | None = None
    # Speculative decoding (gpu_worker/spec/): "none", "ngram" (prompt lookup), "draft:<model spec>" (a
    # smaller model of the same tokenizer) or "self[:int4|:layers=N]" (the target's int4 copy or its first N
    # layers, spec/self_draft.py). Each decoding sequence gets up to num_speculative_tokens drafts,
    # verified in the next scheduled step. Above speculative_max_batch running sequences it is off (drafts
    # cost more than they save in a full batch); speculative_batch_table names a JSON file {"batch size": k}
    # that overrides both (k of the largest size not above the batch; 0 turns it off).
    speculative: str = "none"
    num_speculative_tokens: int = 3
    speculative_max_batch: int = 32
    speculative_batch_table: str | None = None
    # LoRA (gpu_worker/lora/): enable_lora wraps every adapter target in a LoRALinear with max_loras device
    # slots of rank up to max_lora_rank, over an LRU of max_cpu_loras adapters in host memory. `loras` are
    # "NAME=PATH" adapters read at start-up, served as "<served model>:NAME"; with merge_lora the one of
    # them is folded into the weights instead (before quantisation).
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int = 32
    loras: tuple[str, ...] = ()
    merge_lora: bool = False


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, in OpenAI's vocabulary (plus vLLM's top_k, min_p, min_tokens,
    repetition_penalty, stop_token_ids, include_stop_str_in_output and skip_special_tokens)."""

    n: int = 1
    max_tokens: int | None = 16  # None: up to the context length; 0: the prompt only (scoring, with logprobs)
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end a choice before this many tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and HF's rule: the logit of a token seen in the prompt or the output so far is divided by it when
    # positive and multiplied by it when negative; 1.0: off.
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = (
        False  # the matched stop string (or stop token's text) stays in the text
    )
    skip_special_tokens: bool = True  # False: special tokens' text (e.g. "<|im_end|>") is part of the output
    logprobs: int | None = None  # top-n logprobs of each generated token (0: chosen token only)
    prompt_logprobs: int | None = None  # likewise for the prompt tokens
    speculative: bool = True  # False: this request never gets drafts, whatever the engine's setting
    # Structured output: a JSON schema (as JSON text) the output must match, enforced token by token by a
    # grammar (gpu_worker/structured/). Such a request takes no drafts.
    json_schema: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        checks: list[tuple[bool, str, str]] = [
            (self.n >= 1, "n", "n must be at least 1"),
            (
                self.max_tokens is None or self.max_tokens >= 0,
                "max_tokens",
                "max_tokens must not be negative",
            ),
            (self.min_tokens >= 0, "min_tokens", "min_tokens must not be negative"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "min_tokens must not be more than max_tokens",
            ),
            (self.temperature >= 0.0, "temperature", "temperature must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "top_k must be -1, 0 (disabled) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "presence_penalty must be in [-2, 2]"),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty",
                "frequency_penalty must be in [-2, 2]",
            ),
            (
                0.0 < self.repetition_penalty < math.inf,
                "repetition_penalty",
                "repetition_penalty must be a positive number (1: off)",
            ),
            (
                all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                "logit_bias",
                "logit_bias values must be in [-100, 100]",
            ),
            (
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                "logit_bias",
                f"logit_bias may set at most {MAX_LOGIT_BIAS} tokens",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                "logprobs",
                f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                "prompt_logprobs",
                f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty"),
            (
                len(self.stop) <= MAX_STOP_SEQUENCES,
                "stop",
                f"at most {MAX_STOP_SEQUENCES} stop sequences",
            ),
            (
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
                "stop_token_ids",
                f"at most {MAX_STOP_TOKEN_IDS} stop token ids",
            ),
            *(
                (isinstance(getattr(self, name), bool), name, f"{name} must be true or false")
                for name in ("include_stop_str_in_output", "skip_special_tokens")
            ),
            (isinstance(self.speculative, bool), "speculative", "speculative must be true or false"),
            (
                self.json_schema is None or isinstance(self.json_schema, str),
                "json_schema",
                "json_schema must be a JSON schema as text",
            ),
            # A complete output may only be followed by EOS: min_tokens or ignore_eos could leave no token.
            (
                self.json_schema is None or not (self.min_tokens or self.ignore_eos),
                "json_schema",
                "a JSON schema cannot be combined with min_tokens or ignore_eos",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise InvalidRequestError if a field names more tokens than the vocabulary has."""
        if self.top_k > vocab_size:
            raise InvalidRequestError(
                f"top_k must be -1 or 0 (off) or at most the vocabulary size {vocab_size}; got {self.top_k}",
                param="top_k",
            )
        if any(not 0 <= t < vocab_size for t in self.logit_bias):
            raise InvalidRequestError(
                f"logit_bias keys must be token ids in [0, {vocab_size})", param="logit_bias"
            )
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be token ids in [0, {vocab_size})", param="stop_token_ids"
            )

    # Cached (the fields are frozen): each step asks these of every running request.
    @cached_property
    def device_only(self) -> bool:
        """Whether the next token depends on nothing the host has to supply (no penalties over earlier output,
        no logprobs to read back), so decode steps can be chained on the device. min_tokens is the scheduler's
        to judge: it depends on how far the sequence has come. A grammar's mask is built on the host each step."""
        return self.logprobs is None and not self.penalised and self.json_schema is None

    @cached_property
    def takes_drafts(self) -> bool:
        """Whether speculative decoding may draft for this request (a grammar's requests never do)."""
        return self.speculative and self.json_schema is None

    @cached_property
    def penalised(self) -> bool:
        """Whether the logits depend on the tokens seen so far (presence, frequency or repetition penalty)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @cached_property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code, which clients test for


def check_context(
    num_prompt_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    prompt_param: str = "prompt",
    max_tokens_param: str = "max_tokens",
) -> None:
    """Raise InvalidRequestError if the prompt (plus max_tokens) cannot fit the model's context. The web tier
    and the engine both call this, so a client gets the same answer from either."""
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens, and your prompt has "
            f"{num_prompt_tokens} tokens. Please shorten the prompt.",
            param=prompt_param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or {max_tokens_param}.",
            param=max_tokens_param,
            code=CONTEXT_LENGTH_EXCEEDED,
        )
