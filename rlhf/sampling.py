"""Sampling completions: left-padded prompt batches, temperature / top-p / top-k, stop at EOS.

A response ends at its first stop token: any id of `stop_ids`, which callers take from
`rlhf.models.stop_token_ids` (the tokenizer's EOS, the chat template's end of turn, the
checkpoint's generation_config EOS ids). "EOS" below means any of them. `sample` returns response
token ids (B, T) in which everything after a sequence's first EOS is padding, and a (B,) flag
telling which responses ended with EOS; `sample_with_logprobs` also returns the log-probs of the
sampled tokens, which PPO uses instead of a second forward pass.

The sampler runs its own loop over a KV cache: the prompt is computed once, each step feeds one
token per unfinished sequence, finished sequences leave the batch (once they are a quarter of
it), and temperature, top-k and top-p are applied inside the loop. A GPT-2 model (with or without
LoRA adapters) steps through its own modules over a preallocated cache (`GPT2Decoder`), where the
per-token cost of a general forward pass would dominate at small sizes; another causal LM steps
through its forward over a `DynamicCache` (`CacheDecoder`; `rlhf/causal_lm.py` finds how that
forward takes a cache). A model whose forward fills no cache falls back to `generate`, set up from
`SamplingConfig` and `stop_ids` alone (nothing else of the checkpoint's generation_config), with log-probs computed from
the logits it returns. Which path a model class takes is logged once (INFO, `rlhf.sampling`).

Randomness: each step draws one uniform number per prompt of the batch (finished or not) from
`generator`, or torch's default generator when none is given, and takes the token at which the
cumulative distribution, in token-id order, first exceeds the prompt's number. Prompts sampled
a few at a time (`SamplingConfig.batch_size`, bounding the memory) replay the same draws from the
same generator state and read their own numbers, so they get the same tokens. The same seed therefore gives the
same tokens whichever decoder computed the logits, up to logits that differ in the last bits
(tests/test_sampling.py). `generate` draws its own way, seeded from `generator` when one is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlhf import causal_lm
from rlhf.config import NonNegative, NonNegativeInt, PositiveInt, Probability
from rlhf.encoding import pad, render_prompt
from rlhf.models import position_ids, stop_token_ids
from rlhf.ops import logprobs_from_logits

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    temperature: NonNegative = 0.7
    """Softmax temperature (checklist item 19: fixed for rollouts)."""
    top_p: Probability = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1: off)."""
    top_k: NonNegativeInt = 0
    """Keep only the k most likely tokens (0: off)."""
    max_new_tokens: PositiveInt = 64
    """Longest response; one that reaches it without EOS is truncated."""
    batch_size: NonNegativeInt = 0
    """Prompts sampled at once, in turn (0: all of them at once): the sampler's memory (the KV
    cache, the logits) grows with it rather than with the rollout batch. The tokens do not depend on it."""


def truncate_at_eos(responses: torch.Tensor, stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad everything after the first EOS of each row (B, T); also return (B,) whether EOS occurred."""
    is_eos = torch.isin(responses, torch.as_tensor(stop_ids, dtype=torch.long, device=responses.device))
    ended = is_eos.any(-1)
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return responses.masked_fill(after, pad_id), ended


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """(B, T) 1 on response tokens up to and including the first EOS, 0 after (checklist item 3)."""
    is_eos = torch.isin(responses, torch.as_tensor(stop_ids, dtype=torch.long, device=responses.device)).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


@dataclass
class Samples:
    """What the sampler returns; T is the longest response (the loop stops when all have ended)."""

    responses: torch.Tensor  # (B, T) sampled ids, pad after the first EOS
    ended: torch.Tensor  # (B,) True where the response emitted EOS
    logprobs: torch.Tensor  # (B, T) log-probs of the sampled tokens at the sampling temperature, 0 after EOS


@torch.no_grad()
def sample(
    model, prompts: list[list[int]], pad_id: int, stop_ids: list[int], config: SamplingConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per prompt, each ending at its first id of `stop_ids`; returns (responses, ended_with_eos)."""
    samples = sample_with_logprobs(model, prompts, pad_id, stop_ids, config, generator)
    return samples.responses, samples.ended


@torch.no_grad()
def sample_with_logprobs(
    model, prompts: list[list[int]], pad_id: int, stop_ids: list[int], config: SamplingConfig, generator: torch.Generator | None = None
) -> Samples:
    """Sample one response per prompt, with the log-probs of the sampled tokens (see the module
    doc), `config.batch_size` prompts at a time.

    The random numbers come from `generator` (on any device), or from torch's default generator
    when it is None. Each step draws one number per prompt of the whole batch; the prompts
    sampled a few at a time each start from the same generator state and read their own
    columns, so a prompt's tokens do not depend on the prompts sampled beside it, and the
    generator ends where sampling the whole batch at once leaves it."""
    device = next(model.parameters()).device
    size = config.batch_size or len(prompts)
    if size >= len(prompts):
        return _sample(model, prompts, 0, len(prompts), pad_id, stop_ids, config, generator, device)
    if generator is None:
        generator = default_generator(device)
    start_state, parts, end_state = generator.get_state(), [], None
    for start in range(0, len(prompts), size):
        generator.set_state(start_state)
        part = _sample(model, prompts[start : start + size], start, len(prompts), pad_id, stop_ids, config, generator, device)
        if not parts or part.responses.shape[1] > max(p.responses.shape[1] for p in parts):
            end_state = generator.get_state()  # the longest part drew as many steps as the whole batch would
        parts.append(part)
    generator.set_state(end_state)
    width = max(part.responses.shape[1] for part in parts)
    return Samples(
        torch.cat([F.pad(part.responses, (0, width - part.responses.shape[1]), value=pad_id) for part in parts]),
        torch.cat([part.ended for part in parts]),
        torch.cat([F.pad(part.logprobs, (0, width - part.logprobs.shape[1])) for part in parts]),
    )


def default_generator(device: torch.device) -> torch.Generator:
    """torch's default generator of `device` (what `torch.rand(..., device=device)` draws from)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _sample(
    model, prompts: list[list[int]], first: int, width: int, pad_id: int, stop_ids: list[int], config: SamplingConfig,
    generator: torch.Generator | None, device: torch.device,
) -> Samples:
    """The prompts numbered `first` on of a batch of `width`: each step draws `width` numbers and reads theirs."""
    ids, mask = pad(prompts, pad_id, side="left")
    ids, mask = ids.to(device), mask.to(device)
    B, T = len(prompts), config.max_new_tokens
    decoder = make_decoder(model, B, ids.shape[1] + T)
    positions = position_ids(mask)
    logits = decoder.prefill(ids, mask, positions)  # (B, V) next-token logits of each prompt; None: no cache filled
    log_path(model, decoder.path, slow=logits is None)
    if logits is None:
        return generate_with_hf(model, ids, mask, pad_id, stop_ids, config, generator)
    stream = generator.device if generator is not None else device
    stops = torch.as_tensor(stop_ids, dtype=torch.long, device=device)
    next_position = positions[:, -1] + 1
    responses = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, T, device=device)
    rows = torch.arange(B, device=device)  # the prompt each decoder row belongs to
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # per decoder row
    for t in range(T):
        uniform = torch.rand(width, generator=generator, device=stream)[first : first + B].to(device)  # one per prompt of the batch, every step
        tokens, token_logprobs = draw(logits, uniform[rows], config)
        responses[rows, t] = tokens.masked_fill(finished, pad_id)
        logprobs[rows, t] = token_logprobs.masked_fill(finished, 0.0)
        finished = finished | torch.isin(tokens, stops)
        done = int(finished.sum())
        if done == len(rows) or t == T - 1:
            break
        if decoder.can_drop and done * 4 >= len(rows):
            # Dropping rows copies the cache, so finished rows wait until they are a quarter of the batch.
            keep = (~finished).nonzero().squeeze(1)
            decoder.keep(keep)
            rows, tokens, finished = rows[keep], tokens[keep], finished[keep]
        logits = decoder.step(tokens, next_position[rows] + t)
    responses, logprobs = responses[:, : t + 1], logprobs[:, : t + 1]
    return Samples(responses, torch.isin(responses, stops).any(-1), logprobs)


def draw(logits: torch.Tensor, uniform: torch.Tensor, config: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logprobs), both (N,), from next-token logits (N, V) and uniform numbers (N,) in [0, 1).

    The token is the first whose cumulative probability, in token-id order, exceeds `uniform`
    (inverse-CDF sampling) under the tempered distribution restricted by top-k and top-p;
    temperature 0 is greedy. The log-prob is that of the tempered, unrestricted distribution,
    the one PPO computes from logits (checklist item 10).
    """
    logits, temperature = logits.float(), config.temperature or 1.0
    logprobs = (logits / temperature if temperature != 1.0 else logits).log_softmax(-1)
    if config.temperature == 0:
        tokens = logprobs.argmax(-1)
    else:
        probs = restrict(logprobs.exp(), config.top_k, config.top_p)
        cdf = probs.cumsum(-1)
        target = (uniform * cdf[:, -1]).unsqueeze(-1)
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def restrict(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the probabilities (N, V) outside the k most likely tokens, then outside the smallest set of
    most likely tokens holding `top_p` of the remaining mass (the most likely token always stays)."""
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, -1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        outside = before >= top_p * sorted_probs.sum(-1, keepdim=True)
        probs = probs.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), 0.0)
    return probs


def generate_with_hf(
    model, ids: torch.Tensor, mask: torch.Tensor, pad_id: int, stop_ids: list[int], config: SamplingConfig, generator: torch.Generator | None
) -> Samples:
    """`transformers` generate, for the models the sampler's own loop cannot drive, sampling from
    `config` and stopping at `stop_ids` alone; the log-probs are those `draw` gives, from the
    unprocessed logits."""
    from transformers import GenerationConfig

    greedy = config.temperature == 0
    settings = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else config.temperature,
        top_p=None if greedy else config.top_p,
        top_k=None if greedy else config.top_k,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=[int(i) for i in stop_ids] or None,
        use_cache=False,  # generate hands its cache to the forward as the sampler does: it would stay empty
        output_logits=True,
        return_dict_in_generate=True,
    )
    # generate fills every setting left unset in the config it is given from the model's own
    # generation_config, and many settings are off only while unset (min_new_tokens, bad_words_ids,
    # suppress_tokens, forced_eos_token_id, ...). So the model's is set aside for the call: a
    # repetition penalty in a checkpoint must not make rollouts that the policy did not sample.
    base = causal_lm.base_model(model)
    own, base.generation_config = base.generation_config, settings
    # With a generator, generate's draws come from a seed taken from it, and the default generators
    # are put back as they were.
    seed = None if generator is None else int(torch.randint(2**62, (), generator=generator, device=generator.device))
    devices = [ids.device] if ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
    finally:
        base.generation_config = own
    responses, ended = truncate_at_eos(output.sequences[:, ids.shape[1] :], stop_ids, pad_id)
    logits = torch.stack(output.logits, 1)  # (B, T, V), before generate's temperature, top-k and top-p
    logprobs = logprobs_from_logits(logits, responses, config.temperature or 1.0)
    return Samples(responses, ended, logprobs.masked_fill(response_mask(responses, stop_ids) == 0, 0.0))


_paths_logged: set[tuple[type, type]] = set()


def log_path(model, path: str, slow: bool) -> None:
    """Say, once per model class, which way its samples are computed (a warning for the slow
    `generate` fallback)."""
    key = causal_lm.model_class(model)
    if key not in _paths_logged:
        _paths_logged.add(key)
        base = causal_lm.base_model(model)
        name = type(base).__name__ if base is model else f"{type(base).__name__} under {type(model).__name__}"
        log.log(logging.WARNING if slow else logging.INFO, "%s: %s", name, path)


def make_decoder(model, batch: int, length: int):
    """The fastest decoder for `model` (see the module doc); its `prefill` returns None where it cannot drive the model."""
    base = causal_lm.base_model(model)
    if type(base).__name__ == "GPT2LMHeadModel" and not base.config.add_cross_attention:
        return GPT2Decoder(base, batch, length)
    return CacheDecoder(model)


class CacheDecoder:
    """Any causal LM whose forward fills a DynamicCache: that forward, one token a step, over the cache."""

    can_drop = False
    path = ""  # which path the model takes, known after the prefill

    def __init__(self, model):
        self.model = model

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        self.mask = mask
        filled = causal_lm.prefill(self.model, dict(input_ids=ids, attention_mask=mask, position_ids=positions))
        if filled is None:
            self.path = "falling back to transformers' generate because its forward fills no DynamicCache passed as " + " or ".join(
                repr(name) for name in causal_lm.CACHE_KEYWORDS
            )
            return None
        logits, self.cache = filled
        self.path = f"sampling with the KV-cache decoder (cache keyword {causal_lm.cache_keyword(self.model)!r})"
        # Rows can leave the batch where every cache layer knows how to drop them.
        self.can_drop = all(hasattr(layer, "batch_select_indices") for layer in getattr(self.cache, "layers", [None]))
        return logits

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], 1)
        return causal_lm.extend(self.model, self.cache, dict(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=positions[:, None]))

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]


class GPT2Decoder:
    """A GPT-2 model's forward pass written out for decoding: its own modules (LoRA layers included),
    the attention over a cache preallocated for the whole sequence, and nothing else per token.

    It computes what GPT2LMHeadModel computes in eval mode (dropout off): the same modules in
    the same order, attention by scaled_dot_product_attention with the model's scaling. One
    kernel differs: `gelu_new`, six elementwise operations in transformers, runs as torch's fused
    tanh GELU, the same function to float rounding.
    """

    can_drop = True
    path = "sampling with the GPT-2 decoder"

    def __init__(self, model, batch: int, length: int):
        from transformers.activations import NewGELUActivation

        self.model, self.transformer = model, model.transformer
        config = model.config
        self.heads, self.width = config.n_head, config.n_embd
        shape = (batch, self.heads, length, self.width // self.heads)
        weight = self.transformer.wte.weight
        self.keys = [weight.new_empty(shape) for _ in self.transformer.h]
        self.values = [weight.new_empty(shape) for _ in self.transformer.h]
        self.masked = weight.new_zeros(batch, 1, 1, length)  # the attention mask of a new token: -inf on padding
        self.length = 0
        act = self.transformer.h[0].mlp.act
        self.act = (lambda x: F.gelu(x, approximate="tanh")) if isinstance(act, NewGELUActivation) else act

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        P = ids.shape[1]
        self.masked[:, 0, 0, :P].masked_fill_(mask == 0, float("-inf"))
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        # A padding position may see itself, so that no softmax is over nothing (NaN); no real token sees it.
        itself = torch.eye(P, dtype=torch.bool, device=ids.device)
        attend = (causal & mask.bool()[:, None, :]) | itself
        return self.model.lm_head(self.forward(ids, positions, attend[:, None])[:, -1])

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.forward(tokens[:, None], positions[:, None], self.masked[..., : self.length + 1])[:, -1])

    def keep(self, rows: torch.Tensor) -> None:
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.masked = self.masked[rows]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, S, d) of `ids` (B, S) placed after the cached tokens; `attend` is
        the attention mask over the cache, (B, 1, S, cached + S)."""
        transformer, B, S = self.transformer, ids.shape[0], ids.shape[1]
        start, end = self.length, self.length + S
        x = transformer.wte(ids) + transformer.wpe(positions)
        for i, block in enumerate(transformer.h):
            attention = block.attn
            q, k, v = attention.c_attn(block.ln_1(x)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            keys, values = self.keys[i][:, :, :end], self.values[i][:, :, :end]
            # On a CPU in the cache's precision, the weights', also under bf16 autocast, as the training
            # passes compute attention there (causal_lm.fp32_attention_on_cpu); the output goes back to q's.
            with torch.autocast("cpu", enabled=False):
                query = q.to(keys.dtype) if q.device.type == "cpu" else q
                out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attend, scale=attention.scaling).to(q.dtype)
            x = x + attention.c_proj(out.transpose(1, 2).reshape(B, S, self.width))
            mlp = block.mlp
            x = x + mlp.c_proj(self.act(mlp.c_fc(block.ln_2(x))))
        self.length = end
        return transformer.ln_f(x)


def sample_texts(model, tokenizer, prompts: list, config: SamplingConfig, batch_size: int = 32, desc: str = "sampling") -> list[str]:
    """One completion per prompt (a string or a conversation), up to the model's first stop token, decoded without special tokens."""
    texts: list[str] = []
    stop_ids = stop_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, dynamic_ncols=True):
        batch = [render_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
        responses, _ = sample(model, batch, tokenizer.pad_token_id, stop_ids, config)
        texts.extend(tokenizer.batch_decode(responses, skip_special_tokens=True))
    model.train(was_training)
    return texts


@torch.no_grad()
def response_logprobs(
    model, query: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor, temperature: float, batch_size: int = 32
) -> torch.Tensor:
    """(B, T) log-probs of response tokens under a causal LM, prompts left-padded (B, P)."""
    out = []
    P = query.shape[1]
    for i in range(0, len(query), batch_size):
        rows = slice(i, i + batch_size)
        ids = torch.cat([query[rows], responses[rows]], 1)
        attention = torch.cat([query_mask[rows], mask[rows]], 1)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
        out.append(logprobs_from_logits(logits[:, P - 1 : -1], responses[rows], temperature))
    return torch.cat(out)
