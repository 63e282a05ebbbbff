"""A vLLM rollout engine on the trainer's GPU (`rollout.engine: vllm`; `pip install 'rlhf[vllm]'`).

vLLM runs in the trainer's process, on the same GPU (colocated), and takes the policy's weights
before every rollout: `sync` after an update marks them stale, and `sample` loads them, by their
`transformers` names (adapters merged in), through vLLM's `apply_model` into the model's own
`load_weights`. Between rollouts the engine sleeps (`rollout.sleep`, vLLM's sleep mode level 2:
weights and KV cache released), so the update has the memory; it wakes the weights, loads them,
then wakes the KV cache.

vLLM computes in its own kernels and precision, so its log-probs are not the trainer's
(`trainer_logprobs` False): the trainer recomputes them, logs the mismatch, and weights the
policy-gradient loss by truncated importance sampling (`rollout.importance_weights`). The
engine asks for vLLM's processed log-probs, those after temperature, the distribution PPO
computes; with top-k or top-p on they are renormalised over the kept tokens, and the mismatch
logged includes that restriction.

Randomness: each prompt's request carries a seed drawn from the step's generator, so a run
with a seed samples the same tokens again on the same GPU and vLLM release.

The module imports vLLM only when an engine is built; the tests drive it through a stand-in
with vLLM's interface (tests/test_vllm_engine.py).
"""

from __future__ import annotations

import logging
import os

import torch

from rlhf.sampling import Samples, SamplingConfig

log = logging.getLogger(__name__)

INSTALL = "pip install 'rlhf[vllm]'"


def hf_weights(policy) -> dict[str, torch.Tensor]:
    """The policy's weights under the names of its `transformers` checkpoint, LoRA adapters merged
    in (what plain transformers loads after `save_model`). The adapters' products are added to
    copies; the policy's own weights are not touched (merging and unmerging in place would
    move them by a rounding at every sync)."""
    if not hasattr(policy, "get_base_model"):
        return {name: tensor.detach() for name, tensor in policy.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    key = f"{name}.weight"
                    deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter).detach()
    weights = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or "original_module" in name:
            continue
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        weights[name] = tensor.detach() + deltas[name] if name in deltas else tensor.detach()
    return weights


class VLLMEngine:
    """`RolloutEngine` on vLLM's `LLM`, colocated with the trainer (see the module doc)."""

    trainer_logprobs = False

    def __init__(
        self, model_path: str, policy, pad_id: int, stop_ids: list[int], sampling: SamplingConfig, *,
        gpu_memory_utilization: float, sleep: bool, dtype: str, max_model_len: int, seed: int,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights load without copies
        import vllm

        self.vllm, self.pad_id, self.stop_ids, self.sampling, self.sleeps = vllm, pad_id, stop_ids, sampling, sleep
        self.llm = vllm.LLM(
            model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep,
            max_model_len=max_model_len, seed=seed, logprobs_mode="processed_logprobs", enable_prefix_caching=False,
        )
        self.policy, self.stale, self.asleep = policy, True, False
        log.info("vLLM %s rollout engine on %s (gpu_memory_utilization %s, sleep %s)", vllm.__version__, model_path, gpu_memory_utilization, sleep)

    def sync(self, policy) -> None:
        self.policy, self.stale = policy, True

    def sample(self, prompts: list[list[int]], generator: torch.Generator | None = None) -> Samples:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        if self.stale:
            self.load(self.policy)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        seeds = torch.randint(2**31 - 1, (len(prompts),), generator=generator, device=generator.device if generator is not None else "cpu").tolist()
        config = self.sampling
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        params = [
            self.vllm.SamplingParams(
                n=1, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or -1, max_tokens=config.max_new_tokens,
                stop_token_ids=list(self.stop_ids), ignore_eos=True, logprobs=0, detokenize=False, seed=int(seed),
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleeps:
            self.llm.sleep(level=2)  # the weights are loaded again before the next rollout
            self.asleep = self.stale = True
        return samples_from_outputs(outputs, self.pad_id, self.stop_ids)

    def load(self, policy) -> None:
        """Load the policy's weights into vLLM's model, by their transformers names."""
        weights = hf_weights(policy)
        self.llm.apply_model(lambda model: model.load_weights(weights.items()))
        self.llm.reset_prefix_cache()
        self.stale = False


def samples_from_outputs(outputs, pad_id: int, stop_ids: list[int]) -> Samples:
    """`Samples` from vLLM's request outputs: token ids up to and including the first stop id,
    padded; the log-probs vLLM gave for the sampled tokens, 0 after."""
    rows, logprobs = [], []
    stops = set(stop_ids)
    for output in outputs:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        end = next((i + 1 for i, token in enumerate(ids) if token in stops), len(ids))
        rows.append(ids[:end])
        logprobs.append([step[token].logprob for step, token in zip(completion.logprobs[:end], ids[:end])])
    width = max(1, max(len(r) for r in rows))
    responses = torch.full((len(rows), width), pad_id, dtype=torch.long)
    values = torch.zeros(len(rows), width)
    for i, (row, row_logprobs) in enumerate(zip(rows, logprobs)):
        responses[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        values[i, : len(row)] = torch.tensor(row_logprobs, dtype=torch.float32)
    ended = torch.tensor([bool(row) and row[-1] in stops for row in rows])
    return Samples(responses, ended, values)
